"""Searched static weights against dynamic weighting, on the Palmer penguins.

The careful alternative to a balancing method is to search the static loss
weights: train one model per weight vector and keep the one that does best
on validation data. This script runs that search with KerasTuner's grid
search over `keras_dwo.tuning.simplex_grid` (the weights sum to 2; equal
weights are one of the points), choosing by the unweighted sum of the
validation task losses, then compares the chosen weights with equal weights,
uncertainty weighting and DWA on the held-out penguins. Every model trains
for the same number of epochs; the search trains one model per grid point,
and the table says how many epochs each row cost in all.

The data, the network and the scores are those of `examples/penguins.py`,
whose functions this script imports; the search holds out a quarter of the
training penguins as its validation set.

    python examples/tuned_weights.py
    KERAS_BACKEND=jax python examples/tuned_weights.py --resolution 10

`--quick` trains for a few epochs over a coarse grid and checks that every
row beats the trivial predictors. Needs `pip install keras-dwo[examples]`
(KerasTuner).
"""

import argparse
import sys
import tempfile

import keras
import keras_tuner
from penguins import DEFAULT_EPOCHS
from penguins import LOSSES
from penguins import QUICK_EPOCHS
from penguins import SEED
from penguins import build_model
from penguins import check_learned
from penguins import load_data
from penguins import print_table
from penguins import stratified_split
from penguins import train_and_evaluate

import keras_dwo

DEFAULT_RESOLUTION = 6
QUICK_RESOLUTION = 3
VALIDATION_FRACTION = 0.25


def search_static_weights(train, epochs, resolution, directory):
    """Returns the grid weights with the lowest validation task-loss sum."""
    fit_idx, val_idx = stratified_split(train["species"], VALIDATION_FRACTION, SEED)

    def targets(indices):
        return {"species": train["species"][indices], "mass": train["mass"][indices]}

    hypermodel = keras_dwo.tuning.static_weights_hypermodel(
        lambda: build_model(train["x"].shape[1], "equal"),
        {"optimizer": keras.optimizers.Adam(1e-2), "loss": LOSSES},
        resolution=resolution,
    )
    tuner = keras_tuner.GridSearch(
        hypermodel,
        objective=keras_tuner.Objective("val_task_loss_sum", "min"),
        directory=directory,
        project_name="penguin_weights",
        seed=SEED,
    )
    keras.utils.set_random_seed(SEED)
    tuner.search(
        train["x"][fit_idx],
        targets(fit_idx),
        validation_data=(train["x"][val_idx], targets(val_idx)),
        epochs=epochs,
        verbose=0,
    )
    best = tuner.get_best_hyperparameters()[0]
    return hypermodel.weights_of(best), len(tuner.oracle.trials)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    parser.add_argument("--resolution", type=int, default=DEFAULT_RESOLUTION)
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"{QUICK_EPOCHS} epochs, resolution {QUICK_RESOLUTION}, and check "
        "every row beats the trivial predictors",
    )
    args = parser.parse_args()
    epochs = QUICK_EPOCHS if args.quick else args.epochs
    resolution = QUICK_RESOLUTION if args.quick else args.resolution

    train, test = load_data(SEED)
    print(
        f"Backend {keras.backend.backend()}: {len(train['x'])} training and "
        f"{len(test['x'])} held-out penguins, {epochs} epochs per model\n"
    )
    with tempfile.TemporaryDirectory() as directory:
        weights, trials = search_static_weights(train, epochs, resolution, directory)
    print(
        f"Grid search over {trials} weight vectors chose species "
        f"{weights['species']:.3f}, mass {weights['mass']:.3f}\n"
    )
    tuned = keras_dwo.weighting.Static([weights["species"], weights["mass"]])
    results = {
        "searched": train_and_evaluate(train, test, epochs, tuned),
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
    print(
        f"\nEpochs spent: searched {(trials + 1) * epochs} ({trials} trials and "
        f"the final model), every other row {epochs}."
    )

    if args.quick:
        failures = check_learned(results, train, test)
        if failures:
            print("\nQuick check FAILED:", *failures, sep="\n  ", file=sys.stderr)
            sys.exit(1)
        print("Quick check passed: every row beats both trivial predictors.")


if __name__ == "__main__":
    main()
