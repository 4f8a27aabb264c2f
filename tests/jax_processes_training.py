"""Trains the same model in one JAX process or in two, and prints the results.

`python jax_processes_training.py PROCESS_ID PROCESSES PORT WEIGHTING...`.
With PROCESSES 2, the process joins the others through
`keras.distribution.initialize` with its coordinator on 127.0.0.1:PORT and
trains under `keras.distribution.DataParallel` over one CPU device per
process, without automatic sharding of the data: process r passes its own
half of every global batch of 32, samples 32k + 16r to 32k + 16r + 15. With
PROCESSES 1 (PROCESS_ID 0, PORT unused), it trains on whole batches on one
device. Prints, for each weighting, a line with a JSON object: the device
counts, the history, the final variables and the weighting state, or the
error that stopped the run.
"""

import json
import os
import sys
import traceback

os.environ["KERAS_BACKEND"] = "jax"
os.environ["JAX_PLATFORMS"] = "cpu"
# One device per process, whatever the environment asks for: the devices of
# a multi-process run are then the processes.
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"

import jax  # noqa: E402
import keras  # noqa: E402

from conftest import TWO_TASK_LOSSES  # noqa: E402
from conftest import replica_test_optimizer  # noqa: E402
from conftest import two_task_data  # noqa: E402
from conftest import two_task_model  # noqa: E402

GLOBAL_BATCH = 32


def shard(array, process_id, processes):
    """This process's rows of every global batch."""
    per_process = GLOBAL_BATCH // processes
    batches = array.reshape((-1, GLOBAL_BATCH) + array.shape[1:])
    start = process_id * per_process
    rows = batches[:, start : start + per_process]
    return rows.reshape((-1,) + array.shape[1:])


def to_lists(variables):
    return {v.path: keras.ops.convert_to_numpy(v).tolist() for v in variables}


def train(weighting, process_id, processes):
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    if processes > 1:
        keras.distribution.set_distribution(
            keras.distribution.DataParallel(
                devices=keras.distribution.list_devices("cpu"),
                auto_shard_dataset=False,
            )
        )
    model = two_task_model(weighting)
    model.compile(optimizer=replica_test_optimizer(), loss=TWO_TASK_LOSSES)
    x, y = two_task_data(128)
    x = shard(x, process_id, processes)
    y = {name: shard(target, process_id, processes) for name, target in y.items()}
    history = model.fit(
        x,
        y,
        epochs=3,
        batch_size=GLOBAL_BATCH // processes,
        shuffle=False,
        verbose=0,
    ).history
    kernel = model.get_layer("trunk").kernel.value
    return {
        "devices": {
            "local": jax.local_device_count(),
            "global": jax.device_count(),
            "trunk_kernel": len(kernel.sharding.device_set),
        },
        "history": history,
        "variables": to_lists(model.variables),
        "state": to_lists(model.weighting.weights),
    }


if __name__ == "__main__":
    process_id, processes, port = (int(argument) for argument in sys.argv[1:4])
    if processes > 1:
        # The step's all-reduce crosses processes through gloo (JAX 0.10's
        # default on CPU); named so that a change of default cannot leave the
        # processes without cross-process collectives.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        keras.distribution.initialize(
            job_addresses=f"127.0.0.1:{port}",
            num_processes=processes,
            process_id=process_id,
        )
    for weighting in sys.argv[4:]:
        try:
            result = train(weighting, process_id, processes)
        except Exception:
            result = {"error": traceback.format_exc()}
        print(json.dumps({"weighting": weighting, **result}), flush=True)
