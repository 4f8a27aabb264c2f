"""One device and two devices train to the same losses and weighting state."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import BACKEND

SCRIPT = Path(__file__).with_name("distributed_training.py")
WEIGHTINGS = ["uncertainty", "famo", "gls", "mgda", "gradnorm", "upgrad", "pcgrad"]
# Trained under a tf.distribute strategy, it must be refused.
REPRESENTATION = "mgda_ub"


@pytest.fixture(scope="module")
def results():
    """{weighting: what the script printed for it}, from one process."""
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), *WEIGHTINGS, REPRESENTATION],
        capture_output=True,
        text=True,
        cwd=SCRIPT.parent,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        timeout=1800,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    found = {}
    for line in completed.stdout.splitlines():
        if line.startswith("{"):
            result = json.loads(line)
            found[result.pop("weighting")] = result
    assert set(found) == {*WEIGHTINGS, REPRESENTATION}, completed.stderr[-3000:]
    return found


@pytest.mark.skipif(
    BACKEND == "torch",
    reason="Keras 3 offers no multi-device data-parallel fit on the torch backend",
)
@pytest.mark.parametrize(
    "weighting", WEIGHTINGS + ([REPRESENTATION] if BACKEND == "jax" else [])
)
def test_two_devices_match_one(weighting, results):
    result = results[weighting]
    assert "error" not in result, result["error"][-3000:]
    one, two = result["one_device"], result["two_devices"]
    for key in ("loss", "label_loss", "value_loss", "label_weight", "value_weight"):
        np.testing.assert_allclose(two["history"][key], one["history"][key], rtol=1e-4)
    assert one["state"].keys() == two["state"].keys()
    for path, value in one["state"].items():
        np.testing.assert_allclose(two["state"][path], value, rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(
    BACKEND != "tensorflow",
    reason="the refusal concerns tf.distribute strategies only",
)
def test_representation_gradients_are_refused_under_a_tf_strategy(results):
    error = results[REPRESENTATION].get("error", "")
    assert "wrt='representation' is not supported under a tf.distribute" in error
