"""Forecasting several horizons at once: one head per horizon on real CO2 data.

The weekly atmospheric CO2 concentration at Mauna Loa, 1958 to 2001 (2,284
weeks), ships with statsmodels (`statsmodels.api.datasets.co2`), so nothing is
downloaded; the 59 missing weeks are interpolated. From the last 52 weeks, a
shared trunk forecasts the change in concentration 1, 4, 13 and 52 weeks
ahead, one head and one mean squared error per horizon. The short horizons
are easy and their losses fall fast; the 13-week change rides the seasonal
cycle and stays hardest. The weeks are split in time: the first 80 per cent
train, the rest is held out.

The same network is trained from the same initial weights with equal
weights, DWA (Liu et al., 2019, the `DynamicWeightAverage` callback, which
raises the weight of the horizons whose loss falls slowest) and a schedule
(`LossWeightScheduler`) that starts on the short horizons and evens the
weights out by the last epoch. The script prints each method's held-out mean
absolute error in ppm per horizon and the final weights, and saves the
weights and losses over training to `--plot`.

    python examples/forecast.py
    KERAS_BACKEND=torch python examples/forecast.py --epochs 60

`--quick` trains for a few epochs and checks that every method beats, at
every horizon, the trivial forecast of the mean change over the training
weeks. It exits with a non-zero status otherwise. Needs
`pip install keras-dwo[examples]` (statsmodels).
"""

import argparse
import sys

import keras
import numpy as np
import statsmodels.api as sm

import keras_dwo

SEED = 0
WINDOW = 52
HORIZONS = (1, 4, 13, 52)
TASKS = tuple(f"h{horizon}" for horizon in HORIZONS)
TRAIN_FRACTION = 0.8
DEFAULT_EPOCHS = 40
QUICK_EPOCHS = 4
BATCH_SIZE = 64
FIRST_WEIGHTS = np.array([1.6, 1.4, 0.6, 0.4])


def load_series():
    co2 = sm.datasets.co2.load_pandas().data["co2"]
    return co2.interpolate().to_numpy("float32")


def task_name(horizon):
    """Returns the name of the task and head for a horizon in weeks."""
    return f"h{horizon}"


def windows(series, horizons=HORIZONS):
    """Returns inputs (the last WINDOW weeks, relative to the current one) and
    the change to each horizon, keyed by task name, for every week with a full
    window and all horizons in the series."""
    last = len(series) - max(horizons)
    starts = np.arange(WINDOW - 1, last)
    x = np.stack([series[t - WINDOW + 1 : t + 1] - series[t] for t in starts])
    y = {
        task_name(horizon): (series[starts + horizon] - series[starts])[:, None]
        for horizon in horizons
    }
    return x, y


def load_data(horizons=HORIZONS):
    """Returns chronological train and held-out splits for the given horizons
    (in weeks), standardised with the training statistics, and the targets'
    scales (ppm per unit), keyed by task name."""
    x, y = windows(load_series(), horizons)
    # Held-out targets must lie after every training target: a gap of the
    # longest horizon keeps the longest changes of the two splits apart.
    split = int(TRAIN_FRACTION * len(x))
    train_idx = np.arange(split - max(horizons))
    test_idx = np.arange(split, len(x))
    x_scale = x[train_idx].std()
    scales = {task: target[train_idx].std() for task, target in y.items()}

    def part(indices):
        return (
            x[indices] / x_scale,
            {task: y[task][indices] / scales[task] for task in y},
        )

    return part(train_idx), part(test_idx), scales


def mean_change_errors(train, test, scales):
    """Returns, per task, the held-out mean absolute error in ppm of the
    trivial forecast: the mean change over the training weeks."""
    _, y_train = train
    _, y_test = test
    return {
        task: np.mean(np.abs(y_train[task].mean() - y_test[task])) * scales[task]
        for task in y_test
    }


def build_model(weighting):
    inputs = keras.Input(shape=(WINDOW,))
    hidden = keras.layers.Dense(64, activation="relu")(inputs)
    hidden = keras.layers.Dense(64, activation="relu")(hidden)
    outputs = {task: keras.layers.Dense(1, name=task)(hidden) for task in TASKS}
    return keras_dwo.DynamicWeightedModel(inputs, outputs, weighting=weighting)


def short_horizons_first(epochs):
    """Returns a schedule from FIRST_WEIGHTS to equal weights over `epochs`."""

    def schedule(epoch, weights):
        progress = epoch / max(epochs - 1, 1)
        return (1 - progress) * FIRST_WEIGHTS + progress * np.ones(len(TASKS))

    return schedule


def train_and_evaluate(train, test, scales, epochs, callbacks=()):
    keras.utils.set_random_seed(SEED)
    model = build_model("equal")
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss={task: "mse" for task in TASKS},
    )
    history = model.fit(
        *train,
        batch_size=BATCH_SIZE,
        epochs=epochs,
        callbacks=list(callbacks),
        verbose=0,
    )
    x_test, y_test = test
    predictions = model.predict(x_test, batch_size=1024, verbose=0)
    scores = {"history": history}
    for task in TASKS:
        error = (predictions[task] - y_test[task]) * scales[task]
        scores[f"{task}_mae"] = np.mean(np.abs(error))
        scores[f"{task}_weight"] = history.history[f"{task}_weight"][-1]
    return scores


def print_table(results):
    header = "".join(f"{task + ' MAE':>9}" for task in TASKS)
    header += "".join(f"{task + ' w':>8}" for task in TASKS)
    print(f"{'method':<10}{header}   (MAE in ppm)")
    for method, scores in results.items():
        row = "".join(f"{scores[f'{task}_mae']:>9.3f}" for task in TASKS)
        row += "".join(f"{scores[f'{task}_weight']:>8.2f}" for task in TASKS)
        print(f"{method:<10}{row}")


def check_learned(results, train, test, scales):
    trivial = mean_change_errors(train, test, scales)
    print(
        "Mean-change forecast MAE: "
        + ", ".join(f"{task} {trivial[task]:.3f}" for task in TASKS)
    )
    return [
        f"{method}: {task} MAE {scores[f'{task}_mae']:.3f}"
        for method, scores in results.items()
        for task in TASKS
        if scores[f"{task}_mae"] >= trivial[task]
    ]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    mode.add_argument(
        "--quick",
        action="store_true",
        help=f"train {QUICK_EPOCHS} epochs and check every method beats the "
        "mean-change forecast",
    )
    parser.add_argument("--plot", default="forecast_weights.png", help="PNG path")
    args = parser.parse_args()
    epochs = QUICK_EPOCHS if args.quick else args.epochs

    train, test, scales = load_data()
    print(
        f"Backend {keras.backend.backend()}: {len(train[0])} training and "
        f"{len(test[0])} held-out weeks, {epochs} epochs per method\n"
    )
    results = {
        "equal": train_and_evaluate(train, test, scales, epochs),
        "DWA": train_and_evaluate(
            train,
            test,
            scales,
            epochs,
            callbacks=[keras_dwo.callbacks.DynamicWeightAverage()],
        ),
        "schedule": train_and_evaluate(
            train,
            test,
            scales,
            epochs,
            callbacks=[
                keras_dwo.callbacks.LossWeightScheduler(short_horizons_first(epochs))
            ],
        ),
    }
    print_table(results)
    runs = {method: scores["history"] for method, scores in results.items()}
    keras_dwo.plot_weights(runs).savefig(args.plot)
    print(f"\nWeights and losses over training saved to {args.plot}")

    if args.quick:
        failures = check_learned(results, train, test, scales)
        if failures:
            print(
                "\nQuick check FAILED, no better than the mean change:",
                *failures,
                sep="\n  ",
                file=sys.stderr,
            )
            sys.exit(1)
        print("Quick check passed: every method beats the mean-change forecast.")


if __name__ == "__main__":
    main()
