"""Data-parallel training over torch.distributed processes equals one process.

Two processes of a gloo group on 127.0.0.1, each holding half of every
global batch, against one process on the whole batches: the same losses,
metrics, variables and method state, and the same on both processes.
"""

import os
import sys
from pathlib import Path

import numpy as np
import pytest
from processes import describe
from processes import free_ports
from processes import parse_json_lines
from processes import run_together

from conftest import BACKEND

pytestmark = pytest.mark.skipif(
    BACKEND != "torch",
    reason="torch.distributed process groups are the torch backend's; "
    "TensorFlow and JAX are tested in test_distribution.py",
)

SCRIPT = Path(__file__).with_name("torch_processes_training.py")
CASES = [
    "equal",
    "uncertainty",
    "famo",
    "rlw",
    "gradnorm",
    "upgrad",
    "mgda",
    "pcgrad",
    "mgda_ub",
    "uncertainty:partial",
    "upgrad:partial",
]
UNEQUAL = "equal:short"


@pytest.fixture(scope="module")
def results():
    """(one process, [process 0, process 1]): {case: what the script printed}."""
    (port,) = free_ports(1)
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "TF_CPP_MIN_LOG_LEVEL": "3"}
    script = str(SCRIPT)
    commands = [
        [sys.executable, script, "0", "1", "0", *CASES],
        *(
            [sys.executable, script, str(rank), "2", str(port), *CASES, UNEQUAL]
            for rank in (0, 1)
        ),
    ]
    finished = run_together(commands, [env] * len(commands))
    assert all(process.returncode == 0 for process in finished), describe(finished)
    found = [parse_json_lines(process.stdout, "case") for process in finished]
    return found[0], found[1:]


def _assert_close(actual, expected, what):
    assert actual.keys() == expected.keys(), what
    for key in expected:
        np.testing.assert_allclose(
            actual[key], expected[key], rtol=1e-5, atol=1e-5, err_msg=f"{what} {key}"
        )


@pytest.mark.parametrize("case", CASES)
def test_two_processes_train_as_one(case, results):
    one, two = results
    for result in (one[case], *(by_process[case] for by_process in two)):
        assert "error" not in result, result["error"][-3000:]
    expected = one[case]
    for rank, by_process in enumerate(two):
        result = by_process[case]
        _assert_close(result["history"], expected["history"], f"process {rank}")
        _assert_close(result["evaluation"], expected["evaluation"], f"process {rank}")
        _assert_close(result["variables"], expected["variables"], f"process {rank}")
        _assert_close(result["state"], expected["state"], f"process {rank}")
    # Every process holds exactly the same model and method state.
    first, second = (by_process[case] for by_process in two)
    assert first["variables"] == second["variables"]
    assert first["state"] == second["state"]


def test_an_unequal_number_of_steps_is_refused_on_every_process(results):
    _, two = results
    for by_process in two:
        error = by_process[UNEQUAL].get("error", "")
        assert "Every process must take the same number of steps" in error
        assert "from 3 to 4" in error
