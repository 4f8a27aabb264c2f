"""Multi-task learning on the Palmer penguins: three ways to weight two losses.

One network with a shared trunk predicts, for each penguin, its species (3
classes, sparse categorical crossentropy) and its body mass (regression on the
standardised mass, mean squared error) from its bill length and depth, flipper
length, island and sex. The same architecture is trained from the same
initial weights with three loss weightings:

- equal: the objective is the plain sum of the two task losses;
- uncertainty: learned homoscedastic uncertainty (Kendall et al., 2018),
  `weighting="uncertainty"`;
- DWA: dynamic weight average (Liu et al., 2019), equal weighting with the
  `keras_dwo.callbacks.DynamicWeightAverage` callback.

The script prints one table with each method's held-out species accuracy, its
held-out body mass mean absolute error in grams, and the task weights logged
in the last training epoch (`history.history["<task>_weight"][-1]`). The
uncertainty weights keep growing as the task losses shrink, since the learned
weight of a task tends to the inverse of its loss. The data ship with the
`palmerpenguins` package, so nothing is downloaded.

Run it with the Keras backend of your choice (`KERAS_BACKEND`, TensorFlow by
default):

    python examples/penguins.py
    KERAS_BACKEND=jax python examples/penguins.py
    KERAS_BACKEND=torch python examples/penguins.py --epochs 100

`--quick` trains for a few epochs only and checks that every method learned
something: its accuracy must beat always predicting the most frequent species
and its mass error must beat always predicting the mean training mass. The
script exits with a non-zero status if a check fails.
"""

import argparse
import sys

import keras
import numpy as np
import pandas as pd
from palmerpenguins import load_penguins

import keras_dwo

SEED = 0
TEST_FRACTION = 0.25
DEFAULT_EPOCHS = 50
QUICK_EPOCHS = 10
BATCH_SIZE = 32
NUMERIC_FEATURES = ["bill_length_mm", "bill_depth_mm", "flipper_length_mm"]
CATEGORICAL_FEATURES = ["island", "sex"]
LOSSES = {"species": "sparse_categorical_crossentropy", "mass": "mse"}


def stratified_split(labels, test_fraction, seed):
    """Returns train and test indices with each label's share kept in both."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for label in np.unique(labels):
        indices = rng.permutation(np.flatnonzero(labels == label))
        num_test = round(test_fraction * len(indices))
        test.append(indices[:num_test])
        train.append(indices[num_test:])
    return np.concatenate(train), np.concatenate(test)


def load_data(seed):
    """Returns the train and held-out splits of the complete penguin records.

    The inputs are standardised, and the body mass is returned both in grams
    and standardised, with the statistics of the training split only.

    Returns:
        `(train, test)`, two dicts with the keys `x` (inputs), `species`
        (class indices), `mass_g` (grams) and `mass` (standardised).
    """
    penguins = load_penguins().dropna()
    features = pd.concat(
        [
            penguins[NUMERIC_FEATURES],
            pd.get_dummies(penguins[CATEGORICAL_FEATURES]),
        ],
        axis=1,
    ).to_numpy("float32")
    species = penguins["species"].astype("category").cat.codes.to_numpy("int32")
    mass_g = penguins["body_mass_g"].to_numpy("float32")

    train_idx, test_idx = stratified_split(species, TEST_FRACTION, seed)
    x_mean, x_std = features[train_idx].mean(0), features[train_idx].std(0)
    mass_mean, mass_std = mass_g[train_idx].mean(), mass_g[train_idx].std()

    def split(indices):
        return {
            "x": (features[indices] - x_mean) / x_std,
            "species": species[indices],
            "mass_g": mass_g[indices],
            "mass": ((mass_g[indices] - mass_mean) / mass_std)[:, None],
        }

    return split(train_idx), split(test_idx)


def build_model(num_features, weighting):
    """Returns a shared trunk with a `species` and a `mass` head."""
    inputs = keras.Input(shape=(num_features,))
    hidden = keras.layers.Dense(32, activation="relu")(inputs)
    hidden = keras.layers.Dense(32, activation="relu")(hidden)
    species = keras.layers.Dense(3, activation="softmax", name="species")(hidden)
    mass = keras.layers.Dense(1, name="mass")(hidden)
    return keras_dwo.DynamicWeightedModel(
        inputs, {"species": species, "mass": mass}, weighting=weighting
    )


def train_and_evaluate(train, test, epochs, weighting, callbacks=()):
    """Trains one model and returns its held-out scores and final task weights."""
    keras.utils.set_random_seed(SEED)
    model = build_model(train["x"].shape[1], weighting)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=LOSSES)
    history = model.fit(
        train["x"],
        {"species": train["species"], "mass": train["mass"]},
        batch_size=BATCH_SIZE,
        epochs=epochs,
        callbacks=list(callbacks),
        verbose=0,
    )
    predictions = model.predict(test["x"], batch_size=len(test["x"]), verbose=0)
    mass_mean, mass_std = train["mass_g"].mean(), train["mass_g"].std()
    predicted_mass_g = predictions["mass"][:, 0] * mass_std + mass_mean
    return {
        "accuracy": np.mean(predictions["species"].argmax(1) == test["species"]),
        "mae_g": np.mean(np.abs(predicted_mass_g - test["mass_g"])),
        "species_weight": history.history["species_weight"][-1],
        "mass_weight": history.history["mass_weight"][-1],
    }


def print_table(results):
    """Prints one row of scores and final task weights per method."""
    print(
        f"{'method':<12} {'accuracy':>9} {'mass MAE (g)':>13} "
        f"{'species weight':>15} {'mass weight':>12}"
    )
    for method, scores in results.items():
        print(
            f"{method:<12} {scores['accuracy']:>9.3f} {scores['mae_g']:>13.1f} "
            f"{scores['species_weight']:>15.3f} {scores['mass_weight']:>12.3f}"
        )


def check_learned(results, train, test):
    """Returns a message for each score that does not beat a trivial predictor."""
    counts = np.bincount(train["species"])
    majority_rate = np.mean(test["species"] == counts.argmax())
    mean_mae_g = np.mean(np.abs(train["mass_g"].mean() - test["mass_g"]))
    print(
        f"\nTrivial predictors: majority-class accuracy {majority_rate:.3f}, "
        f"mean-mass MAE {mean_mae_g:.1f} g"
    )
    failures = []
    for method, scores in results.items():
        if scores["accuracy"] <= majority_rate:
            failures.append(
                f"{method}: accuracy {scores['accuracy']:.3f} does not beat "
                f"the majority-class rate {majority_rate:.3f}"
            )
        if scores["mae_g"] >= mean_mae_g:
            failures.append(
                f"{method}: mass MAE {scores['mae_g']:.1f} g does not beat "
                f"predicting the training mean ({mean_mae_g:.1f} g)"
            )
    return failures


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--epochs",
        type=int,
        default=DEFAULT_EPOCHS,
        help=f"training epochs of each run (default: {DEFAULT_EPOCHS})",
    )
    mode.add_argument(
        "--quick",
        action="store_true",
        help=f"train for {QUICK_EPOCHS} epochs and check that every method "
        "beats the trivial predictors",
    )
    args = parser.parse_args()
    epochs = QUICK_EPOCHS if args.quick else args.epochs

    train, test = load_data(SEED)
    print(
        f"Backend {keras.backend.backend()}: {len(train['x'])} training and "
        f"{len(test['x'])} held-out penguins, {epochs} epochs per method\n"
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
    }
    print_table(results)

    if args.quick:
        failures = check_learned(results, train, test)
        if failures:
            print("\nQuick check FAILED:", *failures, sep="\n  ", file=sys.stderr)
            sys.exit(1)
        print("Quick check passed: every method beats both trivial predictors.")


if __name__ == "__main__":
    main()
