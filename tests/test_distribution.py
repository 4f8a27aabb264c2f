"""Distributed training equals training on one device.

On one process: two devices holding the whole model (TensorFlow's
MirroredStrategy, JAX's DataParallel), and on JAX the trunk's kernel split
over two devices (ModelParallel). Across processes on 127.0.0.1: two JAX
processes of one device each, and two TensorFlow workers of a
MultiWorkerMirroredStrategy, which Keras 3.15 cannot train.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from processes import describe
from processes import free_ports
from processes import parse_json_lines
from processes import run_together

from conftest import BACKEND

SCRIPT = Path(__file__).with_name("distributed_training.py")
JAX_PROCESSES_SCRIPT = Path(__file__).with_name("jax_processes_training.py")
MULTI_WORKER_SCRIPT = Path(__file__).with_name("multi_worker_training.py")
WEIGHTINGS = [
    "uncertainty",
    "famo",
    "gls",
    "mgda",
    "gradnorm",
    "upgrad",
    "pcgrad",
    # Labels missing unevenly over the replicas' halves of each batch.
    "uncertainty:partial",
    "upgrad:partial",
]
# Its gradients are taken at the trunk's output, whose rows are samples.
REPRESENTATION = "mgda_ub"
# A loss-level method, two gradient-level ones, and one whose gradients are
# taken at the representation that the sharded trunk computes.
MODEL_PARALLEL = ["uncertainty", "upgrad", "mgda", REPRESENTATION]
JAX_PROCESS_WEIGHTINGS = ["uncertainty", "upgrad", "mgda"]
HISTORY_KEYS = ("loss", "label_loss", "value_loss", "label_weight", "value_weight")
QUIET_TENSORFLOW = {"TF_CPP_MIN_LOG_LEVEL": "3"}


@pytest.fixture(scope="module")
def results():
    """{weighting: what the script printed for it}, from one process."""
    model_parallel = ["--model-parallel", *MODEL_PARALLEL] if BACKEND == "jax" else []
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), *WEIGHTINGS, REPRESENTATION, *model_parallel],
        capture_output=True,
        text=True,
        cwd=SCRIPT.parent,
        env={**os.environ, **QUIET_TENSORFLOW},
        timeout=1800,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    found = parse_json_lines(completed.stdout, "weighting")
    assert set(found) == {*WEIGHTINGS, REPRESENTATION}, completed.stderr[-3000:]
    return found


def _assert_same_training(actual, expected, what=""):
    """The same history and final weighting state, to float32 rounding."""
    for key in HISTORY_KEYS:
        np.testing.assert_allclose(
            actual["history"][key],
            expected["history"][key],
            rtol=1e-4,
            err_msg=f"{what} {key}",
        )
    assert actual["state"].keys() == expected["state"].keys(), what
    for path, value in expected["state"].items():
        np.testing.assert_allclose(
            actual["state"][path], value, rtol=1e-4, atol=1e-6, err_msg=f"{what} {path}"
        )


@pytest.mark.skipif(
    BACKEND == "torch",
    reason="Keras 3 has no multi-device fit on the torch backend; torch trains "
    "over processes, tested in test_torch_processes.py",
)
@pytest.mark.parametrize("weighting", [*WEIGHTINGS, REPRESENTATION])
def test_two_devices_match_one(weighting, results):
    result = results[weighting]
    assert "error" not in result, result["error"][-3000:]
    _assert_same_training(result["two_devices"], result["one_device"])


@pytest.mark.skipif(
    BACKEND != "jax",
    reason="Keras 3 lays variables out over devices (keras.distribution."
    "ModelParallel) on the JAX backend only",
)
@pytest.mark.parametrize("weighting", MODEL_PARALLEL)
def test_a_trunk_sharded_over_two_devices_matches_one_device(weighting, results):
    result = results[weighting]
    assert "error" not in result, result["error"][-3000:]
    _assert_same_training(result["model_parallel"], result["one_device"])
    # Still split by units after training, in the kernel and in the slot of
    # the optimizer (SGD's momentum).
    layouts = result["model_parallel"]["layouts"]
    assert sorted(layouts) == ["sgd/trunk_kernel_momentum", "trunk/kernel"]
    for path, layout in layouts.items():
        assert layout == {
            "spec": [None, "model"],
            "devices": [0, 1],
            "shards": [[6, 8], [6, 8]],
        }, path


@pytest.fixture(scope="module")
def jax_process_results():
    """(one process, [process 0, process 1]): {weighting: what was printed}."""
    (port,) = free_ports(1)
    weightings = JAX_PROCESS_WEIGHTINGS
    script = str(JAX_PROCESSES_SCRIPT)
    commands = [
        [sys.executable, script, "0", "1", "0", *weightings],
        *(
            [sys.executable, script, str(process_id), "2", str(port), *weightings]
            for process_id in (0, 1)
        ),
    ]
    env = {**os.environ, **QUIET_TENSORFLOW}
    finished = run_together(commands, [env] * len(commands))
    assert all(process.returncode == 0 for process in finished), describe(finished)
    found = [parse_json_lines(process.stdout, "weighting") for process in finished]
    for by_weighting in found:
        assert set(by_weighting) == set(weightings), describe(finished)
    return found[0], found[1:]


@pytest.mark.skipif(
    BACKEND != "jax",
    reason="keras.distribution.initialize joins processes on the JAX backend only; "
    "torch processes are tested in test_torch_processes.py",
)
@pytest.mark.parametrize("weighting", JAX_PROCESS_WEIGHTINGS)
def test_two_jax_processes_match_one(weighting, jax_process_results):
    one, two = jax_process_results
    for result in (one[weighting], *(by_process[weighting] for by_process in two)):
        assert "error" not in result, result["error"][-3000:]
    expected = one[weighting]
    assert expected["devices"] == {"local": 1, "global": 1, "trunk_kernel": 1}
    for process_id, by_process in enumerate(two):
        result = by_process[weighting]
        what = f"process {process_id}"
        # One device each, and the model replicated on both.
        assert result["devices"] == {"local": 1, "global": 2, "trunk_kernel": 2}, what
        _assert_same_training(result, expected, what)
        assert result["variables"].keys() == expected["variables"].keys(), what
        for path, value in expected["variables"].items():
            np.testing.assert_allclose(
                result["variables"][path],
                value,
                rtol=1e-4,
                atol=1e-6,
                err_msg=f"{what} {path}",
            )
    # Both processes hold exactly the same model and method state.
    first, second = (by_process[weighting] for by_process in two)
    assert first["variables"] == second["variables"]
    assert first["state"] == second["state"]


class KnownKerasMultiWorkerError(Exception):
    """A worker stopped on a known error of Keras 3.15's TensorFlow trainer."""


# (the error's message, the Keras function it was raised in), each as it
# appears in a worker's traceback.
KNOWN_MULTI_WORKER_ERRORS = [
    # The symbolic build before the first step reduces a PerReplica batch.
    (
        "ValueError: Attempt to convert a value (PerReplica:{",
        "in _maybe_symbolic_build",
    ),
    # With the build passed, the step's scalar logs are reduced along axis 0.
    (
        "Invalid reduction dimension 0 for input with 0 dimensions",
        "in reduce_per_replica",
    ),
]


def _known_multi_worker_error(stderr):
    for message, function in KNOWN_MULTI_WORKER_ERRORS:
        if message in stderr and function in stderr:
            return message
    return None


@pytest.mark.skipif(
    BACKEND != "tensorflow",
    reason="MultiWorkerMirroredStrategy is a tf.distribute strategy",
)
@pytest.mark.xfail(
    strict=True,
    raises=KnownKerasMultiWorkerError,
    reason="Keras 3.15's fit under MultiWorkerMirroredStrategy fails in trainer.py: "
    "'ValueError: Attempt to convert a value (PerReplica:{...}) ... to a Tensor' "
    "from _maybe_symbolic_build, or, past it, 'Invalid reduction dimension 0 for "
    "input with 0 dimensions' from reduce_per_replica",
)
def test_two_tensorflow_workers_train_together():
    addresses = [f"127.0.0.1:{port}" for port in free_ports(2)]
    envs = [
        {
            **os.environ,
            **QUIET_TENSORFLOW,
            "TF_CONFIG": json.dumps(
                {
                    "cluster": {"worker": addresses},
                    "task": {"type": "worker", "index": index},
                }
            ),
        }
        for index in range(len(addresses))
    ]
    command = [sys.executable, str(MULTI_WORKER_SCRIPT)]
    finished = run_together([command] * len(envs), envs)
    for index, worker in enumerate(finished):
        message = _known_multi_worker_error(worker.stderr)
        if message is not None:
            raise KnownKerasMultiWorkerError(
                f"worker {index}: {message}\n{worker.stderr[-3000:]}"
            )
    assert all(worker.returncode == 0 for worker in finished), describe(finished)
    histories = [parse_json_lines(worker.stdout, "worker") for worker in finished]
    assert [sorted(history) for history in histories] == [[0], [1]], histories
    first, second = histories[0][0]["history"], histories[1][1]["history"]
    np.testing.assert_allclose(second["loss"], first["loss"], rtol=1e-4)
