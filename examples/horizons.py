"""Many tasks on real data: the CO2 series forecast at every horizon, 1 to 52 weeks.

The weekly atmospheric CO2 concentration at Mauna Loa that statsmodels ships
(the data and the chronological split of `examples/forecast.py`) is
forecast 1, 2, ..., 52 weeks ahead from the last 52 weeks: 52 tasks, one
head and one mean squared error per horizon on a shared trunk. Neighbouring
horizons are nearly the same task; the changes over 13 to 26 weeks follow
the seasonal cycle, which the network learns and the mean change misses by
3.5 ppm, and the changes over 39 to 52 weeks are mostly the steady trend
and noise, where the network gains least over the mean change.

The same network is trained from the same initial weights with equal
weights, UPGrad (Quinton and Rey, 2024), MGDA-UB (Sener and Koltun, 2018),
FAMO (Liu et al., 2023) and uncertainty weighting (Kendall et al., 2018).
The script prints, per method, the held-out mean absolute error in ppm
averaged over the short (1 to 4 weeks), mid (13 to 26) and long (39 to 52)
horizons and the median time of a training step (the epochs after the
first, which also builds and compiles the step), and saves the final
weights across the horizons, each method's divided by their mean, to
`--plot`. On the PyTorch backend the script calls
`torch.set_num_threads(1)`, which is faster for a network this small on
CPU, as in the benchmarks.

    KERAS_BACKEND=torch python examples/horizons.py
    KERAS_BACKEND=torch python examples/horizons.py --methods equal UPGrad --epochs 60

`--quick` trains for 2 epochs and checks that every method beats, in each
of the three horizon groups, the trivial forecast of the mean change over
the training weeks, both errors averaged over the group's horizons. It
exits with a non-zero status otherwise. The check is per group, not per
horizon: after 2 epochs some methods are still slightly worse than the
mean change at 51 or 52 weeks, where it errs by only 0.7 ppm. Needs
`pip install keras-dwo[examples]` (statsmodels and matplotlib).
"""

import argparse
import sys
import time

import keras
import numpy as np
from forecast import SEED
from forecast import WINDOW
from forecast import load_data
from forecast import mean_change_errors
from forecast import task_name
from matplotlib.figure import Figure

import keras_dwo

HORIZONS = tuple(range(1, 53))
TASKS = tuple(task_name(horizon) for horizon in HORIZONS)
GROUPS = {
    "short": range(1, 5),
    "mid": range(13, 27),
    "long": range(39, 53),
}
DEFAULT_EPOCHS = 40
QUICK_EPOCHS = 2
# Four times the batch of forecast.py and ten times its learning rate: as
# accurate with equal weights in 40 epochs, at a quarter of the steps.
BATCH_SIZE = 256
LEARNING_RATE = 1e-2


METHODS = ("equal", "UPGrad", "MGDA-UB", "FAMO", "uncertainty")


def make_weighting(method):
    """Returns a new weighting method for a name in `METHODS`."""
    return {
        "equal": lambda: "equal",
        "UPGrad": keras_dwo.weighting.UPGrad,
        "MGDA-UB": lambda: keras_dwo.weighting.MGDA(wrt="representation"),
        "FAMO": keras_dwo.weighting.FAMO,
        "uncertainty": keras_dwo.weighting.Uncertainty,
    }[method]()


class EpochTimer(keras.callbacks.Callback):
    """Records the wall-clock time of every training epoch."""

    def on_train_begin(self, logs=None):
        self.seconds = []

    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self.start)


def build_model(weighting):
    inputs = keras.Input(shape=(WINDOW,))
    hidden = keras.layers.Dense(64, activation="relu")(inputs)
    hidden = keras.layers.Dense(64, activation="relu")(hidden)
    outputs = {task: keras.layers.Dense(1, name=task)(hidden) for task in TASKS}
    return keras_dwo.DynamicWeightedModel(inputs, outputs, weighting=weighting)


def train_and_evaluate(train, test, scales, epochs, weighting):
    keras.utils.set_random_seed(SEED)
    model = build_model(weighting)
    model.compile(
        optimizer=keras.optimizers.Adam(LEARNING_RATE),
        loss={task: "mse" for task in TASKS},
    )
    timer = EpochTimer()
    history = model.fit(
        *train, batch_size=BATCH_SIZE, epochs=epochs, callbacks=[timer], verbose=0
    )
    x_test, y_test = test
    predictions = model.predict(x_test, batch_size=1024, verbose=0)
    errors = {
        task: np.mean(np.abs(predictions[task] - y_test[task])) * scales[task]
        for task in TASKS
    }
    steps = int(np.ceil(len(train[0]) / BATCH_SIZE))
    # The first epoch also builds (and on TensorFlow and JAX compiles) the
    # step; it is timed only when it is the only one.
    seconds = timer.seconds[1:] or timer.seconds
    return {
        "errors": errors,
        "weights": np.array([history.history[f"{task}_weight"][-1] for task in TASKS]),
        "step_ms": 1000 * np.median(seconds) / steps,
    }


def group_means(errors):
    """Averages per-task errors over each horizon group."""
    return {
        group: np.mean([errors[task_name(horizon)] for horizon in horizons])
        for group, horizons in GROUPS.items()
    }


def print_table(results, trivial):
    titles = [
        f"{group} {horizons[0]}-{horizons[-1]}" for group, horizons in GROUPS.items()
    ]
    print(
        f"{'method':<12}"
        + "".join(f"{title:>12}" for title in titles)
        + f"{'step ms':>10}   (MAE in ppm)"
    )
    rows = {**results, "mean change": {"errors": trivial}}
    for method, scores in rows.items():
        row = "".join(
            f"{value:>12.3f}" for value in group_means(scores["errors"]).values()
        )
        step = f"{scores['step_ms']:>10.1f}" if "step_ms" in scores else ""
        print(f"{method:<12}{row}{step}")


def save_plot(results, path):
    figure = Figure(figsize=(8, 4.5))
    axes = figure.add_subplot()
    for method, scores in results.items():
        weights = scores["weights"]
        axes.plot(HORIZONS, weights / weights.mean(), label=method, marker=".")
    axes.set_xlabel("horizon (weeks)")
    axes.set_ylabel("final weight / mean weight")
    axes.set_xlim(1, max(HORIZONS))
    axes.legend()
    axes.set_title("Final task weights across the 52 horizons")
    figure.tight_layout()
    figure.savefig(path)


def check_learned(results, trivial):
    trivial_means = group_means(trivial)
    return [
        f"{method}: {group} MAE {error:.3f} (mean change {trivial_means[group]:.3f})"
        for method, scores in results.items()
        for group, error in group_means(scores["errors"]).items()
        if error >= trivial_means[group]
    ]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    mode.add_argument(
        "--quick",
        action="store_true",
        help=f"train {QUICK_EPOCHS} epochs and check every method beats the "
        "mean-change forecast in every horizon group",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=METHODS,
        default=list(METHODS),
        help="the methods to train (default: all)",
    )
    parser.add_argument("--plot", default="horizon_weights.png", help="PNG path")
    args = parser.parse_args()
    epochs = QUICK_EPOCHS if args.quick else args.epochs
    if keras.backend.backend() == "torch":
        import torch

        # Several times faster than the default for a network this small on
        # CPU, as in the benchmarks.
        torch.set_num_threads(1)

    train, test, scales = load_data(HORIZONS)
    print(
        f"Backend {keras.backend.backend()}: {len(TASKS)} horizons, "
        f"{len(train[0])} training and {len(test[0])} held-out weeks, "
        f"{epochs} epochs per method\n"
    )
    results = {
        method: train_and_evaluate(train, test, scales, epochs, make_weighting(method))
        for method in METHODS
        if method in args.methods
    }
    trivial = mean_change_errors(train, test, scales)
    print_table(results, trivial)
    save_plot(results, args.plot)
    print(f"\nFinal weights across the horizons saved to {args.plot}")

    if args.quick:
        failures = check_learned(results, trivial)
        if failures:
            print(
                "\nQuick check FAILED, no better than the mean change:",
                *failures,
                sep="\n  ",
                file=sys.stderr,
            )
            sys.exit(1)
        print(
            "Quick check passed: every method beats the mean-change forecast "
            "in every horizon group."
        )


if __name__ == "__main__":
    main()
