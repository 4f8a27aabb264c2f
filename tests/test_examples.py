"""Quick modes of the examples and reproductions: each checks its outcome.

The examples run on any backend, and the library features they use are
tested on every backend elsewhere. Each example takes from 10 to 40 seconds
in quick mode, so to keep the test run short every example runs on one
backend. The reproductions run on the default backend, TensorFlow, whose
test run then takes one example, transfer.py; torch, the fastest here, takes
seven.
"""

import os
import pathlib
import subprocess
import sys

import pytest

from conftest import BACKEND

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
# Paper reproductions run on the default backend.
BACKEND_OF_REPRODUCTION = {
    "gradnorm_synthetic.py": "tensorflow",
    "toy_landscape.py": "tensorflow",
    "uncertainty_weighting.py": "tensorflow",
}
BACKEND_OF_EXAMPLE = {
    "penguins.py": "torch",
    "tuned_weights.py": "torch",
    "digits.py": "jax",
    "shapes.py": "jax",
    "recommendation.py": "torch",
    "forecast.py": "torch",
    "horizons.py": "torch",
    "transfer.py": "tensorflow",
    "gan.py": "torch",
    "which_method.py": "torch",
}


def test_every_example_is_assigned_a_backend():
    scripts = {path.name for path in EXAMPLES.glob("*.py")}
    assert scripts == set(BACKEND_OF_EXAMPLE)


@pytest.mark.parametrize(
    "path, backend",
    [(EXAMPLES / script, backend) for script, backend in BACKEND_OF_EXAMPLE.items()]
    + [
        (ROOT / "benchmarks" / script, backend)
        for script, backend in BACKEND_OF_REPRODUCTION.items()
    ],
    ids=lambda value: value.name if isinstance(value, pathlib.Path) else value,
)
def test_quick_mode_checks_its_outcome(path, backend, tmp_path):
    if backend != BACKEND:
        pytest.skip(f"{path.name} runs in the {backend} test run")
    environment = {**os.environ, "KERAS_BACKEND": BACKEND}
    completed = subprocess.run(
        [sys.executable, str(path), "--quick"],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "Quick check passed" in completed.stdout
