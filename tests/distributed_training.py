"""Trains the same model on one device and on two, and prints both results.

Run as a script in a fresh process, because the devices must be configured
before the backend starts:
`python distributed_training.py WEIGHTING... [--model-parallel WEIGHTING...]`.
The backend is KERAS_BACKEND's: TensorFlow uses
`tf.distribute.MirroredStrategy` over two logical CPUs; JAX uses
`keras.distribution.DataParallel` over two virtual CPU devices. On JAX, each
weighting named after `--model-parallel` also trains under
`keras.distribution.ModelParallel`, with the trunk's kernel split over the
two devices by its units. Prints, for each weighting, a line with a JSON
object: the histories and the final weighting state of each run (and, for
the model-parallel run, where the trunk's kernel and its optimizer slots
lie), or the error that stopped them. One process serves every weighting,
as starting the backend takes longer than the training.
"""

import argparse
import contextlib
import functools
import json
import os
import traceback

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from conftest import TWO_TASK_LOSSES  # noqa: E402
from conftest import partially_labelled  # noqa: E402
from conftest import replica_test_optimizer  # noqa: E402
from conftest import two_task_data  # noqa: E402
from conftest import two_task_model  # noqa: E402

BACKEND = keras.backend.backend()


@functools.cache
def mirrored_strategy():
    # One for the process: the collective ops of a second strategy would
    # reuse the first one's instance keys for tensors of other shapes.
    import tensorflow as tf

    return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])


def two_device_cpus():
    devices = keras.distribution.list_devices("cpu")
    assert len(devices) == 2, devices
    return devices


def two_device_scope():
    if BACKEND == "tensorflow":
        return mirrored_strategy().scope()
    keras.distribution.set_distribution(
        keras.distribution.DataParallel(devices=two_device_cpus())
    )
    return contextlib.nullcontext()


def sharded_trunk_scope():
    """Every batch whole on both devices, the trunk's kernel split by units.

    The mesh's batch axis has one device, so only the layout of the
    variables differs from training on one device.
    """
    mesh = keras.distribution.DeviceMesh(
        shape=(1, 2), axis_names=("batch", "model"), devices=two_device_cpus()
    )
    layout_map = keras.distribution.LayoutMap(mesh)
    # The kernel is (inputs, units) = (6, 16): each device holds 8 units.
    layout_map["trunk/kernel"] = (None, "model")
    keras.distribution.set_distribution(
        keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name="batch")
    )
    return contextlib.nullcontext()


def trunk_kernel_layouts(model):
    """Where the trunk's kernel and its optimizer slots lie after training.

    Returns {variable path: {"spec": the mesh axis of each array axis,
    "devices": the ids of the devices that hold it, "shards": the shape of
    each device's part}}.
    """
    kernel = model.get_layer("trunk").kernel
    # Keras names an optimizer slot after the path of its variable.
    slot_prefix = kernel.path.replace("/", "_") + "_"
    slots = [v for v in model.optimizer.variables if v.name.startswith(slot_prefix)]
    layouts = {}
    for variable in [kernel, *slots]:
        array = variable.value
        layouts[variable.path] = {
            "spec": list(array.sharding.spec),
            "devices": sorted(device.id for device in array.sharding.device_set),
            "shards": [list(shard.data.shape) for shard in array.addressable_shards],
        }
    return layouts


def train(case, scope, with_layouts=False):
    """Trains `case`: a weighting, or `<weighting>:partial` for partial labels."""
    weighting, _, variant = case.partition(":")
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    x, y = two_task_data(128)
    options = {}
    if variant == "partial":
        options["missing_label"] = np.nan
        y = partially_labelled(y)
    with scope():
        model = two_task_model(weighting, **options)
        model.compile(optimizer=replica_test_optimizer(), loss=TWO_TASK_LOSSES)
    history = model.fit(x, y, epochs=3, batch_size=32, shuffle=False, verbose=0)
    state = {
        v.path: keras.ops.convert_to_numpy(v).tolist() for v in model.weighting.weights
    }
    result = {"history": history.history, "state": state}
    if with_layouts:
        result["layouts"] = trunk_kernel_layouts(model)
    return result


def parse_arguments():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("weightings", nargs="+", metavar="WEIGHTING")
    parser.add_argument(
        "--model-parallel",
        nargs="+",
        default=[],
        metavar="WEIGHTING",
        help="those of the weightings to train with a sharded trunk too (JAX only)",
    )
    arguments = parser.parse_args()
    if arguments.model_parallel and BACKEND != "jax":
        parser.error("--model-parallel needs the JAX backend")
    if not set(arguments.model_parallel) <= set(arguments.weightings):
        parser.error("--model-parallel names a weighting not among WEIGHTING")
    return arguments


if __name__ == "__main__":
    arguments = parse_arguments()
    if BACKEND == "tensorflow":
        import tensorflow as tf

        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2
        )
    for weighting in arguments.weightings:
        try:
            # clear_session, at the start of each run, also unsets the
            # distribution that the previous run set.
            result = {
                "one_device": train(weighting, contextlib.nullcontext),
                "two_devices": train(weighting, two_device_scope),
            }
            if weighting in arguments.model_parallel:
                result["model_parallel"] = train(
                    weighting, sharded_trunk_scope, with_layouts=True
                )
        except Exception:
            result = {"error": traceback.format_exc()}
        print(json.dumps({"weighting": weighting, **result}), flush=True)
