"""GradNorm's synthetic regression tasks (Chen et al. 2018, section 4).

T regression tasks share their input: `f_i(x) = sigma_i * tanh((B + eps_i) x)`
with `x` in R^250 drawn uniformly from [-1, 1] and scaled to unit L2 norm,
outputs in R^100, `B` and `eps_i` fixed matrices with entries drawn from
normal distributions of standard deviation 10 and 3.5. The tasks differ only
by their scale `sigma_i`, so their losses differ by `sigma_i^2`. The network
is the paper's: a trunk of four 100-unit ReLU layers and one linear 100-unit
head per task, squared loss, Adam, GradNorm with `alpha = 0.12`.

Two cases: T = 2 with sigma = (1, 100), and T = 10 with sigma = (48, 3, 54,
16, 9, 30, 52, 26, 47, 81). Metric, as in the paper: the sum over tasks of
`L_i(t) / L_i(0)` on a fixed test set (lower is better; T at the start).
Methods: equal weights, uncertainty weighting, GradNorm, DWA, MGDA, IMTL-G,
FAMO, DB-MTL, MoCo, ExcessMTL, MoDo and SDMGrad, all through
`DynamicWeightedModel.fit`.

The paper reports that with equal weights the large-sigma tasks dominate,
that GradNorm raises the weights of the small-sigma tasks and beats equal
weights, and that uncertainty weighting first trains fast, then degrades.

    python benchmarks/gradnorm_synthetic.py            # full: 40 epochs
    python benchmarks/gradnorm_synthetic.py --quick    # equal, GradNorm: 6 epochs, T=2

It writes `gradnorm_synthetic.png` (the metric over training, and each
method's weights) and `gradnorm_synthetic.json` (the numbers) into
`--output`, and in `--quick` mode checks GradNorm's direction: the final
weight of the sigma = 1 task must exceed that of the sigma = 100 task, and
GradNorm's metric must beat equal weights'.
"""

import argparse
import json
import pathlib
import sys

import keras
import numpy as np
from matplotlib.figure import Figure

import keras_dwo

SEED = 0
INPUT_DIM = 250
OUTPUT_DIM = 100
NUM_TRAIN = 10_000
NUM_TEST = 2_000
BATCH_SIZE = 100
LEARNING_RATE = 1e-3
CASES = {
    "T=2": (1.0, 100.0),
    "T=10": (48.0, 3.0, 54.0, 16.0, 9.0, 30.0, 52.0, 26.0, 47.0, 81.0),
}
METHODS = {
    "equal": ("equal", False),
    "uncertainty": ("uncertainty", False),
    "gradnorm": (keras_dwo.weighting.GradNorm(alpha=0.12), False),
    "dwa": ("equal", True),
    "mgda": ("mgda", False),
    "imtl_g": ("imtl_g", False),
    "famo": ("famo", False),
    "db_mtl": ("db_mtl", False),
    "moco": ("moco", False),
    "excess_mtl": ("excess_mtl", False),
    "modo": ("modo", False),
    "sdmgrad": ("sdmgrad", False),
}
# What `--quick` compares, unless --methods names others.
QUICK_METHODS = ("equal", "gradnorm")


def make_tasks(sigmas, rng):
    """Returns train and test inputs and per-task targets."""
    base = rng.normal(scale=10.0, size=(OUTPUT_DIM, INPUT_DIM))
    offsets = [rng.normal(scale=3.5, size=(OUTPUT_DIM, INPUT_DIM)) for _ in sigmas]

    def sample(count):
        x = rng.uniform(-1.0, 1.0, size=(count, INPUT_DIM))
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        targets = {
            f"task_{i}": (sigma * np.tanh(x @ (base + offset).T)).astype("float32")
            for i, (sigma, offset) in enumerate(zip(sigmas, offsets))
        }
        return x.astype("float32"), targets

    return sample(NUM_TRAIN), sample(NUM_TEST)


def build_model(num_tasks, weighting):
    inputs = keras.Input(shape=(INPUT_DIM,))
    hidden = inputs
    for _ in range(4):
        hidden = keras.layers.Dense(100, activation="relu")(hidden)
    outputs = {
        f"task_{i}": keras.layers.Dense(OUTPUT_DIM, name=f"task_{i}")(hidden)
        for i in range(num_tasks)
    }
    return keras_dwo.DynamicWeightedModel(inputs, outputs, weighting=weighting)


def run(method, sigmas, train, test, epochs):
    """Returns the metric per epoch (from 0) and the history of one method."""
    weighting, with_dwa = METHODS[method]
    if isinstance(weighting, keras_dwo.weighting.LossWeighting):
        weighting = weighting.__class__.from_config(weighting.get_config())
    keras.utils.set_random_seed(SEED)
    model = build_model(len(sigmas), weighting)
    model.compile(
        optimizer=keras.optimizers.Adam(LEARNING_RATE),
        loss={f"task_{i}": "mse" for i in range(len(sigmas))},
    )
    tasks = [f"task_{i}" for i in range(len(sigmas))]
    initial = model.evaluate(*test, batch_size=1000, return_dict=True, verbose=0)
    callbacks = [keras_dwo.callbacks.DynamicWeightAverage()] if with_dwa else []
    history = model.fit(
        *train,
        batch_size=BATCH_SIZE,
        epochs=epochs,
        validation_data=test,
        callbacks=callbacks,
        verbose=0,
    ).history
    ratios = np.array(
        [
            np.array(history[f"val_{task}_loss"]) / initial[f"{task}_loss"]
            for task in tasks
        ]
    )
    history["test_loss_ratios"] = ratios
    metric = [float(len(tasks))] + [float(total) for total in ratios.sum(axis=0)]
    return metric, history


def plot(results, path):
    figure = Figure(figsize=(18, 4 * len(results)), layout="constrained")
    rows = figure.subfigures(len(results), 1, squeeze=False)[:, 0]
    for row, (case, by_method) in zip(rows, results.items()):
        axes = row.subplots(
            1,
            1 + len(by_method),
            gridspec_kw={"width_ratios": [3] + [1] * len(by_method)},
        )
        for method, (metric, _) in by_method.items():
            axes[0].plot(metric, label=method)
        axes[0].set(
            title=f"{case}: sum of L_i(t)/L_i(0), test",
            xlabel="epoch",
            yscale="log",
        )
        axes[0].legend(fontsize="small")
        for axis, (method, (_, history)) in zip(axes[1:], by_method.items()):
            for i in range(len(CASES[case])):
                axis.plot(history[f"task_{i}_weight"], label=f"task_{i}")
            axis.set(title=method, xlabel="epoch")
        axes[1].set_ylabel("task weight")
        axes[-1].legend(fontsize="x-small")
    figure.savefig(path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--output", default=".", help="directory for PNG and JSON")
    parser.add_argument("--methods", nargs="+", choices=sorted(METHODS))
    args = parser.parse_args()
    epochs = 6 if args.quick else args.epochs
    methods = args.methods or list(QUICK_METHODS if args.quick else METHODS)
    if args.quick and not set(QUICK_METHODS) <= set(methods):
        parser.error("--quick compares GradNorm with equal weights: keep both.")
    cases = {"T=2": CASES["T=2"]} if args.quick else CASES
    output = pathlib.Path(args.output)
    output.mkdir(parents=True, exist_ok=True)

    results, summary = {}, {}
    for case, sigmas in cases.items():
        train, test = make_tasks(sigmas, np.random.default_rng(SEED))
        results[case] = {
            method: run(method, sigmas, train, test, epochs) for method in methods
        }
        print(f"\n{case}, sigma = {sigmas}, {epochs} epochs")
        print(
            f"{'method':<12} {'metric end':>10} {'metric min':>10} "
            f"{'at epoch':>8}  final L_i(t)/L_i(0); final weights"
        )
        summary[case] = {}
        for method, (metric, history) in results[case].items():
            weights = [history[f"task_{i}_weight"][-1] for i in range(len(sigmas))]
            best = int(np.argmin(metric))
            summary[case][method] = {
                "metric": metric,
                "final_weights": weights,
                "final_ratios": history["test_loss_ratios"][:, -1].tolist(),
            }
            print(
                f"{method:<12} {metric[-1]:>10.4f} {metric[best]:>10.4f} "
                f"{best:>8}  "
                + " ".join(f"{r:.2f}" for r in history["test_loss_ratios"][:, -1])
                + "; "
                + " ".join(f"{w:.3f}" for w in weights)
            )
    plot(results, output / "gradnorm_synthetic.png")
    (output / "gradnorm_synthetic.json").write_text(
        json.dumps(
            {
                "backend": keras.backend.backend(),
                "epochs": epochs,
                "sigmas": {case: list(cases[case]) for case in cases},
                "results": summary,
            },
            indent=1,
        )
    )
    print(f"\nWrote {output / 'gradnorm_synthetic.png'} and .json")

    if args.quick:
        gradnorm = summary["T=2"]["gradnorm"]
        failures = []
        if gradnorm["final_weights"][0] <= gradnorm["final_weights"][1]:
            failures.append(
                f"GradNorm's final weights {gradnorm['final_weights']} do not "
                "favour the sigma = 1 task"
            )
        if gradnorm["metric"][-1] >= summary["T=2"]["equal"]["metric"][-1]:
            failures.append("GradNorm's metric does not beat equal weights'")
        if failures:
            print("Quick check FAILED:", *failures, sep="\n  ", file=sys.stderr)
            sys.exit(1)
        print(
            "Quick check passed: GradNorm favours the sigma = 1 task and beats "
            "equal weights."
        )


if __name__ == "__main__":
    main()
