"""Trains the same model in one torch process or in several, and prints results.

`python torch_processes_training.py RANK PROCESSES PORT CASE...` joins a gloo
process group of PROCESSES processes on 127.0.0.1:PORT (none when PROCESSES
is 1) and, for each CASE (a weighting, `<weighting>:partial` for targets
with missing labels, or `<weighting>:short` where process 1 lacks its last
batch), trains on its shard of every global batch of 32: with
P processes, process r holds samples 32k + r * 32 / P onwards. Prints, for
each case, a line with a JSON object: the history, the evaluation, the final
variables and the weighting state, or the error that stopped the run.
"""

import datetime
import json
import os
import sys
import traceback

os.environ["KERAS_BACKEND"] = "torch"

import keras  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from conftest import TWO_TASK_LOSSES  # noqa: E402
from conftest import partially_labelled  # noqa: E402
from conftest import replica_test_optimizer  # noqa: E402
from conftest import two_task_data  # noqa: E402
from conftest import two_task_model  # noqa: E402

GLOBAL_BATCH = 32


def shard(array, rank, processes):
    """This process's rows of every global batch."""
    per_process = GLOBAL_BATCH // processes
    batches = array.reshape((-1, GLOBAL_BATCH) + array.shape[1:])
    return batches[:, rank * per_process : (rank + 1) * per_process].reshape(
        (-1,) + array.shape[1:]
    )


def train(case, rank, processes):
    weighting, _, variant = case.partition(":")
    keras.backend.clear_session()
    # A seed per process: process 0's initial variables must reach the others.
    keras.utils.set_random_seed(rank)
    x, y = two_task_data(128)
    options = {}
    if variant == "partial":
        options["missing_label"] = np.nan
        y = partially_labelled(y)
    model = two_task_model(weighting, **options)
    model.compile(
        optimizer=replica_test_optimizer(),
        loss=TWO_TASK_LOSSES,
        metrics={"label": "accuracy"},
    )
    x = shard(x, rank, processes)
    y = {name: shard(target, rank, processes) for name, target in y.items()}
    batch_size = GLOBAL_BATCH // processes
    if variant == "short" and rank == 1:
        x, y = x[:-batch_size], {k: v[:-batch_size] for k, v in y.items()}
    history = model.fit(
        x, y, epochs=3, batch_size=batch_size, shuffle=False, verbose=0
    ).history
    evaluation = model.evaluate(
        x, y, batch_size=batch_size, return_dict=True, verbose=0
    )
    return {
        "history": history,
        "evaluation": {k: float(v) for k, v in evaluation.items()},
        "variables": {
            v.path: keras.ops.convert_to_numpy(v).tolist() for v in model.variables
        },
        "state": {
            v.path: keras.ops.convert_to_numpy(v).tolist()
            for v in model.weighting.weights
        },
    }


if __name__ == "__main__":
    torch.set_num_threads(1)
    rank, processes, port = (int(a) for a in sys.argv[1:4])
    if processes > 1:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=processes,
            timeout=datetime.timedelta(seconds=300),
        )
    for case in sys.argv[4:]:
        try:
            result = train(case, rank, processes)
        except Exception:
            result = {"error": traceback.format_exc()}
        print(json.dumps({"case": case, **result}), flush=True)
    if processes > 1:
        dist.destroy_process_group()
