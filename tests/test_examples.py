"""The examples' quick mode: each trains every method and checks it learned."""

import os
import pathlib
import subprocess
import sys

import pytest

from conftest import BACKEND

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize(
    "script",
    [
        "penguins.py",
        "digits.py",
        "recommendation.py",
        "shapes.py",
        "forecast.py",
        "tuned_weights.py",
    ],
)
def test_quick_mode_beats_trivial_predictors(script, tmp_path):
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
