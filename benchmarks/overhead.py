"""Training-step overhead of DynamicWeightedModel against a plain keras.Model.

For each Keras backend, the script builds the same multi-task MLP several
times from the same initial weights: a plain functional `keras.Model`
compiled with static `loss_weights` (the baseline), a second such model (the
control: its ratio to the first is the noise of the measurement), and
`keras_dwo.DynamicWeightedModel` with `weighting="equal"`, `"uncertainty"`,
FAMO as in the paper (a second forward pass per step) and FAMO with
`update="next_batch"` (none). One more variant, "hand_uncertainty", is
uncertainty weighting written by hand in a plain `keras.Model`: a
`compute_loss` that returns `sum_i exp(-s_i) L_i + s_i` over two learned
log-variances, as a user would write it without keras-dwo (no bounds, no
non-finite guard, no per-task logs, and none of the loss bookkeeping of
`compile(loss=...)`, which the plain model has). "uncertainty" against it
(the last column) is what keras-dwo costs over the shortest hand-written
version of the same method. The network has
64 inputs, a shared trunk of two 256-unit ReLU layers and two heads: a
10-class softmax trained with sparse categorical crossentropy and a 1-unit
regression trained with mean squared error. Every variant trains with Adam on
the same synthetic batch of 256 samples.

Each step runs the train function that Keras itself builds
(`model.make_train_function()`, after a warm-up that builds the model and
compiles the function), called the way `fit` calls it, without the data
pipeline and callbacks around it. One repetition times `--steps` consecutive
steps of one variant (on JAX it waits for the results before it reads the
clock); the repetitions of the variants are interleaved, in a rotating
order, so that machine noise hits them alike. The script reports each
variant's median time per step over `--repeats` repetitions, and the ratio of
each DynamicWeightedModel median to the plain model's.

Keras picks its backend when it is imported, so every backend runs in a
subprocess of this script with `KERAS_BACKEND` set. On the PyTorch backend
the subprocess calls `torch.set_num_threads(1)`, which is several times
faster on small CPU machines.

Run it from the repository root:

    python benchmarks/overhead.py
    python benchmarks/overhead.py --backend jax --steps 50 --repeats 40
    python benchmarks/overhead.py --json overhead.json

Targets: equal weighting at most 1.03 and uncertainty weighting at most
1.05 of the plain model on every backend, that is, dynamic weighting costs
at most 3% (5% with the learned log-variances) more time per training step
than static loss weights.
"""

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

BACKENDS = ("tensorflow", "jax", "torch")
VARIANTS = (
    "plain",
    "control",
    "equal",
    "uncertainty",
    "hand_uncertainty",
    "famo",
    "famo_next_batch",
)
# The largest ratio to the plain model's step that each variant may reach.
TARGET_RATIOS = {"equal": 1.03, "uncertainty": 1.05}
BATCH_SIZE = 256
INPUT_DIM = 64
HIDDEN_UNITS = 256
NUM_CLASSES = 10
SEED = 0


def synthetic_batch(seed=SEED):
    """One batch: inputs, a 10-class label and a regression target."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(BATCH_SIZE, INPUT_DIM)).astype("float32")
    projection = rng.normal(size=(INPUT_DIM, NUM_CLASSES + 1)).astype("float32")
    scores = x @ projection
    label = np.argmax(scores[:, :NUM_CLASSES], axis=1).astype("int32")
    value = scores[:, NUM_CLASSES:] + 0.1 * rng.normal(size=(BATCH_SIZE, 1))
    return x, {"label": label, "value": value.astype("float32")}


def hand_written_uncertainty(inputs, outputs, loss):
    """A plain `keras.Model` with Kendall et al.'s objective written by hand.

    Two learned log-variances `s_i`, trained with the network, and the loss
    `sum_i exp(-s_i) L_i + s_i`; nothing else.
    """
    import keras
    from keras import ops

    losses = {name: keras.losses.get(identifier) for name, identifier in loss.items()}

    class UncertaintyModel(keras.Model):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.log_variances = self.add_weight(
                shape=(len(losses),), initializer="zeros", name="log_variances"
            )

        def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, **_):
            task_losses = ops.stack(
                [ops.mean(fn(y[name], y_pred[name])) for name, fn in losses.items()]
            )
            return ops.sum(
                ops.exp(-self.log_variances) * task_losses + self.log_variances
            )

    return UncertaintyModel(inputs, outputs, name="hand_uncertainty")


def build_model(variant, seed=SEED):
    """The multi-task MLP as `variant`, compiled; same weights for every variant."""
    import keras

    import keras_dwo

    keras.utils.set_random_seed(seed)
    inputs = keras.Input(shape=(INPUT_DIM,), name="features")
    hidden = keras.layers.Dense(HIDDEN_UNITS, activation="relu", name="trunk_1")(inputs)
    hidden = keras.layers.Dense(HIDDEN_UNITS, activation="relu", name="trunk_2")(hidden)
    outputs = {
        "label": keras.layers.Dense(NUM_CLASSES, activation="softmax", name="label")(
            hidden
        ),
        "value": keras.layers.Dense(1, name="value")(hidden),
    }
    loss = {"label": "sparse_categorical_crossentropy", "value": "mse"}
    optimizer = keras.optimizers.Adam(learning_rate=1e-3)
    if variant in ("plain", "control"):
        model = keras.Model(inputs, outputs, name=variant)
        model.compile(
            optimizer=optimizer, loss=loss, loss_weights={"label": 1.0, "value": 1.0}
        )
    elif variant == "hand_uncertainty":
        model = hand_written_uncertainty(inputs, outputs, loss)
        model.compile(optimizer=optimizer)
    else:
        weighting = variant
        if variant == "famo_next_batch":
            weighting = keras_dwo.weighting.FAMO(update="next_batch")
        model = keras_dwo.DynamicWeightedModel(
            inputs, outputs, weighting=weighting, name=variant
        )
        model.compile(optimizer=optimizer, loss=loss)
    return model


def step_runner(model, batch):
    """Returns `run(steps)`: runs `steps` training steps and waits for them.

    The model is warmed up first: `train_on_batch` builds its variables and
    the optimizer's and compiles the train function, which `run` then calls
    as `fit` does.
    """
    import keras

    x, y = batch
    model.train_on_batch(x, y)
    model.make_train_function()
    train_function = model.train_function
    data = (x, y, None)

    if keras.backend.backend() == "jax":
        import jax

        # `fit` threads the state through the compiled step, which donates it.
        state = (
            [v.value for v in model.trainable_variables],
            [v.value for v in model.non_trainable_variables],
            [v.value for v in model.optimizer.variables],
            [v.value for v in model.metrics_variables],
        )

        def run(steps):
            nonlocal state
            for _ in range(steps):
                _, state = train_function(state, iter((data,)))
            jax.block_until_ready(state)

    else:

        def run(steps):
            for _ in range(steps):
                logs = train_function((data,))
            keras.ops.convert_to_numpy(logs["loss"])

    return run


def measure(steps, repeats):
    """Median seconds per step of every variant on this process's backend."""
    import keras

    backend = keras.backend.backend()
    if backend == "torch":
        import torch

        torch.set_num_threads(1)
    x, y = synthetic_batch()
    batch = (
        keras.ops.convert_to_tensor(x),
        {name: keras.ops.convert_to_tensor(t) for name, t in y.items()},
    )
    runners = {v: step_runner(build_model(v), batch) for v in VARIANTS}
    for run in runners.values():
        run(steps)

    times = {variant: [] for variant in VARIANTS}
    gc.collect()
    gc.disable()
    try:
        for repeat in range(repeats):
            shift = repeat % len(VARIANTS)
            for variant in VARIANTS[shift:] + VARIANTS[:shift]:
                start = time.perf_counter()
                runners[variant](steps)
                times[variant].append((time.perf_counter() - start) / steps)
    finally:
        gc.enable()

    medians = {variant: statistics.median(times[variant]) for variant in VARIANTS}
    return {
        "backend": backend,
        "keras": keras.__version__,
        "ms_per_step": {v: 1e3 * medians[v] for v in VARIANTS},
        "ratio": {v: medians[v] / medians["plain"] for v in VARIANTS[1:]},
        "uncertainty_over_hand_written": (
            medians["uncertainty"] / medians["hand_uncertainty"]
        ),
        "samples_ms": {v: [1e3 * t for t in times[v]] for v in VARIANTS},
    }


def run_backend(backend, steps, repeats):
    """Measures one backend in a subprocess of this script."""
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
    command = [sys.executable, os.path.abspath(__file__), "--worker"]
    command += ["--steps", str(steps), "--repeats", str(repeats)]
    # The backends log to stderr while they load: show it only on failure.
    completed = subprocess.run(command, env=env, capture_output=True, text=True)
    if completed.returncode != 0:
        sys.stderr.write(completed.stderr)
        raise SystemExit(
            f"The {backend} benchmark failed (exit status {completed.returncode})."
        )
    # Keras or a backend may print to stdout too: the result is the last line.
    return json.loads(completed.stdout.strip().splitlines()[-1])


HAND_WRITTEN_RATIO = "uncertainty/hand"


def table_header():
    names = [f"{v} ms" for v in VARIANTS] + [f"{v}/plain" for v in VARIANTS[1:]]
    names.append(HAND_WRITTEN_RATIO)
    return " ".join([f"{'backend':<11}", *(f"{name:>{len(name)}}" for name in names)])


def table_row(result):
    ms, ratio = result["ms_per_step"], result["ratio"]
    cells = [f"{ms[v]:>{len(v) + 3}.3f}" for v in VARIANTS]
    cells += [f"{ratio[v]:>{len(v) + 6}.3f}" for v in VARIANTS[1:]]
    hand_written = result["uncertainty_over_hand_written"]
    cells.append(f"{hand_written:>{len(HAND_WRITTEN_RATIO)}.3f}")
    return " ".join([f"{result['backend']:<11}", *cells])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        action="append",
        help="Keras backend to measure; repeat for several (default: all three).",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=10,
        help="Training steps per repetition (default: %(default)s).",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=200,
        help="Timed repetitions per variant (default: %(default)s).",
    )
    parser.add_argument("--json", metavar="PATH", help="Also write the results here.")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 1 or args.repeats < 1:
        parser.error("--steps and --repeats must be positive.")

    if args.worker:
        print(json.dumps(measure(args.steps, args.repeats)))
        return

    print(
        f"Median ms per training step, batch {BATCH_SIZE}, {args.steps} steps x "
        f"{args.repeats} interleaved repetitions per variant.",
        flush=True,
    )
    print(table_header(), flush=True)
    results = []
    for backend in args.backend or BACKENDS:
        result = run_backend(backend, args.steps, args.repeats)
        print(table_row(result), flush=True)
        results.append(result)

    misses = [
        f"{result['backend']} {variant} ({result['ratio'][variant]:.3f})"
        for result in results
        for variant, target in TARGET_RATIOS.items()
        if result["ratio"][variant] > target
    ]
    verdict = "met" if not misses else "missed by " + ", ".join(misses)
    targets = " and ".join(f"{v} <= {t:.2f}" for v, t in TARGET_RATIOS.items())
    print(f"targets, ratio to plain: {targets}: {verdict}")

    if args.json:
        report = {
            "target_ratios": TARGET_RATIOS,
            "batch_size": BATCH_SIZE,
            "steps": args.steps,
            "repeats": args.repeats,
            "results": {result["backend"]: result for result in results},
        }
        with open(args.json, "w") as file:
            json.dump(report, file, indent=2)


if __name__ == "__main__":
    main()
