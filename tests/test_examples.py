"""The examples' quick mode: each trains every method and checks it learned.

The examples run on any backend, and the library features they use are
tested on every backend elsewhere. Each example takes from 10 to 40 seconds
in quick mode, so to keep the test run short each backend runs two of them,
and every example runs on one backend.
"""

import os
import pathlib
import subprocess
import sys

import pytest

from conftest import BACKEND

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"
BACKEND_OF_EXAMPLE = {
    "penguins.py": "tensorflow",
    "tuned_weights.py": "tensorflow",
    "digits.py": "jax",
    "shapes.py": "jax",
    "recommendation.py": "torch",
    "forecast.py": "torch",
}


def test_every_example_is_assigned_a_backend():
    scripts = {path.name for path in EXAMPLES.glob("*.py")}
    assert scripts == set(BACKEND_OF_EXAMPLE)


@pytest.mark.parametrize("script", sorted(BACKEND_OF_EXAMPLE))
def test_quick_mode_beats_trivial_predictors(script, tmp_path):
    if BACKEND_OF_EXAMPLE[script] != BACKEND:
        pytest.skip(f"{script} runs in the {BACKEND_OF_EXAMPLE[script]} test run")
    environment = {**os.environ, "KERAS_BACKEND": BACKEND}
    completed = subprocess.run(
        [sys.executable, str(EXAMPLES / script), "--quick"],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert f"Backend {BACKEND}" in completed.stdout
    assert "Quick check passed" in completed.stdout
