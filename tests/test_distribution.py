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


def run_script(weighting):
    return subprocess.run(
        [sys.executable, str(SCRIPT), weighting],
        capture_output=True,
        text=True,
        cwd=SCRIPT.parent,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        timeout=600,
    )


@pytest.mark.skipif(
    BACKEND == "torch",
    reason="Keras 3 offers no multi-device data-parallel fit on the torch backend",
)
@pytest.mark.parametrize(
    "weighting",
    ["uncertainty", "famo", "gls", "mgda", "gradnorm", "upgrad", "pcgrad"]
    + (["mgda_ub"] if BACKEND == "jax" else []),
)
def test_two_devices_match_one(weighting):
    completed = run_script(weighting)
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads(completed.stdout.strip().splitlines()[-1])
    one, two = results["one_device"], results["two_devices"]
    for key in ("loss", "label_loss", "value_loss", "label_weight", "value_weight"):
        np.testing.assert_allclose(two["history"][key], one["history"][key], rtol=1e-4)
    assert one["state"].keys() == two["state"].keys()
    for path, value in one["state"].items():
        np.testing.assert_allclose(two["state"][path], value, rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(
    BACKEND != "tensorflow",
    reason="the refusal concerns tf.distribute strategies only",
)
def test_representation_gradients_are_refused_under_a_tf_strategy():
    completed = run_script("mgda_ub")
    assert completed.returncode != 0
    assert "wrt='representation' is not supported under a tf.distribute" in (
        completed.stderr
    )
