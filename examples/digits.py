"""Image multi-task learning on scikit-learn's digits: a class and a measurement.

One small convolutional network reads the 8x8 handwritten digits that ship
with scikit-learn (`sklearn.datasets.load_digits`, 1,797 images, nothing is
downloaded) and predicts two things from a shared trunk:

- `digit`: the digit, 10 classes, sparse categorical crossentropy;
- `ink`: how much ink the digit uses, the standardised sum of its pixel
  intensities, mean squared error. A cheap target, but one that pulls the
  trunk toward stroke thickness, which the class head must ignore.

The same network is trained from the same initial weights with four
weightings: equal weights, uncertainty weighting (Kendall et al., 2018),
DWA (Liu et al., 2019, as the `DynamicWeightAverage` callback) and UPGrad
(Quinton and Rey, 2024), a gradient-level method that takes one gradient per
task. The script prints the held-out accuracy, the held-out ink error and the
final task weights of each, and saves the weights and losses over training of
every method to `--plot` (default `digits_weights.png`).

Run it with the Keras backend of your choice (`KERAS_BACKEND`):

    python examples/digits.py
    KERAS_BACKEND=jax python examples/digits.py --epochs 40

`--quick` trains for a few epochs and checks that every method learned both
tasks: its accuracy must beat the most frequent digit and its ink error must
beat predicting the training mean. It exits with a non-zero status otherwise.
Needs `pip install keras-dwo[examples]` (scikit-learn and matplotlib).
"""

import argparse
import sys

import keras
import numpy as np
from sklearn.datasets import load_digits

import keras_dwo

SEED = 0
TEST_FRACTION = 0.25
DEFAULT_EPOCHS = 20
QUICK_EPOCHS = 4
BATCH_SIZE = 64
LOSSES = {"digit": "sparse_categorical_crossentropy", "ink": "mse"}


def load_data(seed):
    """Returns train and held-out dicts with `x`, `digit`, `ink` and `ink_raw`.

    Pixels are scaled to [0, 1]; the ink target is standardised with the
    training split's statistics.
    """
    digits = load_digits()
    images = (digits.images / 16.0).astype("float32")[..., None]
    ink = images.sum(axis=(1, 2, 3))
    order = np.random.default_rng(seed).permutation(len(images))
    num_test = round(TEST_FRACTION * len(images))
    test_idx, train_idx = order[:num_test], order[num_test:]
    ink_mean, ink_std = ink[train_idx].mean(), ink[train_idx].std()

    def split(indices):
        return {
            "x": images[indices],
            "digit": digits.target[indices].astype("int32"),
            "ink_raw": ink[indices],
            "ink": ((ink[indices] - ink_mean) / ink_std)[:, None],
        }

    return split(train_idx), split(test_idx)


def build_model(weighting):
    """Returns a convolutional trunk with a `digit` and an `ink` head."""
    inputs = keras.Input(shape=(8, 8, 1))
    hidden = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(inputs)
    hidden = keras.layers.MaxPooling2D()(hidden)
    hidden = keras.layers.Conv2D(32, 3, padding="same", activation="relu")(hidden)
    hidden = keras.layers.Flatten()(hidden)
    hidden = keras.layers.Dense(64, activation="relu")(hidden)
    digit = keras.layers.Dense(10, activation="softmax", name="digit")(hidden)
    ink = keras.layers.Dense(1, name="ink")(hidden)
    return keras_dwo.DynamicWeightedModel(
        inputs, {"digit": digit, "ink": ink}, weighting=weighting
    )


def train_and_evaluate(train, test, epochs, weighting, callbacks=()):
    """Trains one model; returns its held-out scores, final weights and history."""
    keras.utils.set_random_seed(SEED)
    model = build_model(weighting)
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss=LOSSES)
    history = model.fit(
        train["x"],
        {"digit": train["digit"], "ink": train["ink"]},
        batch_size=BATCH_SIZE,
        epochs=epochs,
        callbacks=list(callbacks),
        verbose=0,
    )
    predictions = model.predict(test["x"], batch_size=len(test["x"]), verbose=0)
    ink_std = train["ink_raw"].std()
    return {
        "accuracy": np.mean(predictions["digit"].argmax(1) == test["digit"]),
        "ink_mae": np.mean(np.abs(predictions["ink"][:, 0] - test["ink"][:, 0]))
        * ink_std,
        "digit_weight": history.history["digit_weight"][-1],
        "ink_weight": history.history["ink_weight"][-1],
        "history": history,
    }


def print_table(results):
    print(
        f"{'method':<12} {'accuracy':>9} {'ink MAE':>8} "
        f"{'digit weight':>13} {'ink weight':>11}"
    )
    for method, scores in results.items():
        print(
            f"{method:<12} {scores['accuracy']:>9.3f} {scores['ink_mae']:>8.2f} "
            f"{scores['digit_weight']:>13.3f} {scores['ink_weight']:>11.3f}"
        )


def save_plot(results, path):
    runs = {method: scores["history"] for method, scores in results.items()}
    keras_dwo.plot_weights(runs).savefig(path)
    print(f"\nWeights and losses over training saved to {path}")


def check_learned(results, train, test):
    """Returns a message for each score that does not beat a trivial predictor."""
    majority_rate = np.mean(test["digit"] == np.bincount(train["digit"]).argmax())
    mean_ink_mae = np.mean(np.abs(train["ink_raw"].mean() - test["ink_raw"]))
    print(
        f"Trivial predictors: most frequent digit {majority_rate:.3f}, "
        f"mean-ink MAE {mean_ink_mae:.2f}"
    )
    failures = []
    for method, scores in results.items():
        if scores["accuracy"] <= majority_rate:
            failures.append(f"{method}: accuracy {scores['accuracy']:.3f}")
        if scores["ink_mae"] >= mean_ink_mae:
            failures.append(f"{method}: ink MAE {scores['ink_mae']:.2f}")
    return failures


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    mode.add_argument(
        "--quick",
        action="store_true",
        help=f"train {QUICK_EPOCHS} epochs and check every method beats the "
        "trivial predictors",
    )
    parser.add_argument("--plot", default="digits_weights.png", help="PNG path")
    args = parser.parse_args()
    epochs = QUICK_EPOCHS if args.quick else args.epochs

    train, test = load_data(SEED)
    print(
        f"Backend {keras.backend.backend()}: {len(train['x'])} training and "
        f"{len(test['x'])} held-out digits, {epochs} epochs per method\n"
    )
    results = {
        "equal": train_and_evaluate(train, test, epochs, "equal"),
        "uncertainty": train_and_evaluate(train, test, epochs, "uncertainty"),
        "DWA": train_and_evaluate(
            train,
            test,
            epochs,
            "equal",
            callbacks=[keras_dwo.callbacks.DynamicWeightAverage()],
        ),
        "UPGrad": train_and_evaluate(train, test, epochs, "upgrad"),
    }
    print_table(results)
    save_plot(results, args.plot)

    if args.quick:
        failures = check_learned(results, train, test)
        if failures:
            print(
                "\nQuick check FAILED, no better than trivial:",
                *failures,
                sep="\n  ",
                file=sys.stderr,
            )
            sys.exit(1)
        print("Quick check passed: every method beats both trivial predictors.")


if __name__ == "__main__":
    main()
