"""Trains the same model on one device and on two, and prints both results.

Run as a script in a fresh process, because the devices must be configured
before the backend starts: `python distributed_training.py WEIGHTING...`. The
backend is KERAS_BACKEND's: TensorFlow uses `tf.distribute.MirroredStrategy`
over two logical CPUs; JAX uses `keras.distribution.DataParallel` over two
virtual CPU devices. Prints, for each weighting, a line with a JSON object:
the histories and the final weighting state of each run, or the error that
stopped them. One process serves every weighting, as starting the backend
takes longer than the training.
"""

import contextlib
import functools
import json
import os
import sys
import traceback

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")

import keras  # noqa: E402

from conftest import TWO_TASK_LOSSES  # noqa: E402
from conftest import two_task_data  # noqa: E402
from conftest import two_task_model  # noqa: E402

BACKEND = keras.backend.backend()


@functools.cache
def mirrored_strategy():
    # One for the process: the collective ops of a second strategy would
    # reuse the first one's instance keys for tensors of other shapes.
    import tensorflow as tf

    return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])


def two_device_scope():
    if BACKEND == "tensorflow":
        return mirrored_strategy().scope()
    devices = keras.distribution.list_devices("cpu")
    assert len(devices) == 2, devices
    keras.distribution.set_distribution(
        keras.distribution.DataParallel(devices=devices)
    )
    return contextlib.nullcontext()


def train(weighting, scope):
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    with scope():
        model = two_task_model(weighting)
        model.compile(optimizer=keras.optimizers.Adam(0.01), loss=TWO_TASK_LOSSES)
    x, y = two_task_data(128)
    history = model.fit(x, y, epochs=3, batch_size=32, shuffle=False, verbose=0)
    state = {
        v.path: keras.ops.convert_to_numpy(v).tolist() for v in model.weighting.weights
    }
    return {"history": history.history, "state": state}


if __name__ == "__main__":
    if BACKEND == "tensorflow":
        import tensorflow as tf

        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2
        )
    for weighting in sys.argv[1:]:
        try:
            # clear_session, at the start of each run, also unsets the
            # distribution that the previous two-device run set.
            result = {
                "one_device": train(weighting, contextlib.nullcontext),
                "two_devices": train(weighting, two_device_scope),
            }
        except Exception:
            result = {"error": traceback.format_exc()}
        print(json.dumps({"weighting": weighting, **result}), flush=True)
