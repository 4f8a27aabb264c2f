"""Peak memory of a training step, gradient-level against equal weighting.

A gradient-level method holds the T per-task gradients of the shared
parameters (the Jacobian, T x P numbers) during the step, where equal
weighting holds one gradient. This script measures what that costs: for
each backend (JAX and torch) and number of tasks T, it trains the same
network with `weighting="equal"` and with UPGrad, each in a fresh process,
and reports the step's peak resident memory above the memory at rest.

The network: 512 inputs, a shared trunk of two 2048-unit ReLU layers
(P = 5,246,976 shared parameters, 20 MB in float32) and T one-unit
regression heads; batch 256; SGD. After a first step (which builds and
compiles everything), the script resets the process's peak resident set
size (`/proc/self/clear_refs`, Linux), runs three more steps, and reads the
peak (`VmHWM`) against the resident size before them (`VmRSS`), with
glibc told to return every block of 64 kB or more when it is freed. On a
CPU machine that is the memory the step allocates on the host; the
Jacobian alone is T x 20 MB.

Run it from the repository root (Linux):

    python benchmarks/memory.py
    python benchmarks/memory.py --backend torch --tasks 2 8
"""

import argparse
import json
import os
import subprocess
import sys

import numpy as np

BACKENDS = ("jax", "torch")
METHODS = ("equal", "upgrad")
INPUTS = 512
UNITS = 2048
BATCH = 256
STEPS = 3


def shared_parameters():
    return INPUTS * UNITS + UNITS + UNITS * UNITS + UNITS


def _status_kilobytes(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(method, tasks):
    """Peak MB of `STEPS` training steps above the resident size before them."""
    import keras
    from communication import build_model

    if keras.backend.backend() == "torch":
        import torch

        torch.set_num_threads(1)
    keras.utils.set_random_seed(0)
    model = build_model(method, tasks, inputs=INPUTS, units=UNITS)
    rng = np.random.default_rng(0)
    x = rng.normal(size=((STEPS + 1) * BATCH, INPUTS)).astype("float32")
    y = {
        name: rng.normal(size=(len(x), 1)).astype("float32")
        for name in model.task_names
    }
    model.fit(x[:BATCH], {k: v[:BATCH] for k, v in y.items()}, verbose=0)
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    resting = _status_kilobytes("VmRSS")
    rest = slice(BATCH, None)
    model.fit(x[rest], {k: v[rest] for k, v in y.items()}, batch_size=BATCH, verbose=0)
    return (_status_kilobytes("VmHWM") - resting) / 1024


def run(backend, method, tasks):
    env = {
        **os.environ,
        "KERAS_BACKEND": backend,
        "TF_CPP_MIN_LOG_LEVEL": "3",
        # Blocks of 64 kB and more are mapped and unmapped by glibc on each
        # allocation and release, so that the resident size follows the
        # memory in use instead of what the allocator keeps.
        "MALLOC_MMAP_THRESHOLD_": str(64 * 1024),
    }
    command = [sys.executable, __file__, "--worker", method, str(tasks)]
    completed = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=1800
    )
    if completed.returncode:
        sys.stderr.write(completed.stderr)
        raise SystemExit(f"{backend} {method} T={tasks} failed")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=BACKENDS, action="append")
    parser.add_argument("--tasks", nargs="+", type=int, default=[2, 8, 32])
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.worker:
        method, tasks = arguments.worker
        print(json.dumps(measure(method, int(tasks))))
        return
    jacobian_mb = shared_parameters() * 4 / 2**20
    print(f"P = {shared_parameters():,} shared parameters ({jacobian_mb:.0f} MB)")
    print(
        f"{'backend':<8} {'T':>3} {'equal MB':>9} {'upgrad MB':>10} "
        f"{'extra MB':>9} {'extra / T':>10} {'/ P floats':>10}"
    )
    for backend in arguments.backend or BACKENDS:
        for tasks in arguments.tasks:
            peaks = {method: run(backend, method, tasks) for method in METHODS}
            extra = peaks["upgrad"] - peaks["equal"]
            print(
                f"{backend:<8} {tasks:>3} {peaks['equal']:>9.0f} "
                f"{peaks['upgrad']:>10.0f} {extra:>9.0f} {extra / tasks:>10.1f} "
                f"{extra / tasks / jacobian_mb:>10.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
