"""Which method for my problem? Measure the conflicts, then compare methods.

The two steps a user takes on their own model, on the penguins of
`examples/penguins.py` (species and body mass from a shared trunk):

1. Train with equal weights and `keras_dwo.callbacks.GradientConflict`,
   which logs, on a held-out batch, the cosine similarity of the two tasks'
   gradients of the shared layers, each task's gradient norm over the mean,
   and how often the gradients conflicted (a negative cosine) over the
   epoch. `keras_dwo.plot_conflicts` draws them.
2. `keras_dwo.compare` trains the same network from the same initial
   weights with each method and prints one table: each task's validation
   loss and metrics, the time per step and the final weights.
   `Comparison.plot()` draws the weights and losses of every run.

    python examples/which_method.py
    KERAS_BACKEND=jax python examples/which_method.py --epochs 60

`--quick` trains for a few epochs and checks that the table has one row per
method and that every method beat predicting the most frequent species; it
exits with a non-zero status otherwise.
"""

import argparse
import sys

import keras
import numpy as np
from penguins import LOSSES
from penguins import build_model
from penguins import load_data

import keras_dwo

SEED = 0
DEFAULT_EPOCHS = 40
QUICK_EPOCHS = 5
BATCH_SIZE = 32
METHODS = ["equal", "uncertainty", "famo", "upgrad", "mgda", "nash_mtl"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    mode.add_argument("--quick", action="store_true")
    parser.add_argument("--output", default="which_method", help="PNG path prefix")
    args = parser.parse_args()
    epochs = QUICK_EPOCHS if args.quick else args.epochs

    train, test = load_data(SEED)
    x, y = train["x"], {"species": train["species"], "mass": train["mass"]}
    validation = (test["x"], {"species": test["species"], "mass": test["mass"]})

    def build(method):
        model = build_model(x.shape[1], method)
        model.compile(
            optimizer=keras.optimizers.Adam(1e-2),
            loss=LOSSES,
            metrics={"species": ["accuracy"], "mass": ["mae"]},
        )
        return model

    print(f"Backend {keras.backend.backend()}, {epochs} epochs per run\n")
    print("1. Do the tasks conflict? Equal weights, with GradientConflict:")
    keras.utils.set_random_seed(SEED)
    conflict = keras_dwo.callbacks.GradientConflict(*validation, every=5)
    history = build("equal").fit(
        x, y, batch_size=BATCH_SIZE, epochs=epochs, callbacks=[conflict], verbose=0
    )
    logs = history.history
    print(
        f"   cosine of the two gradients, first and last epoch: "
        f"{logs['cosine_species_mass'][0]:.3f}, {logs['cosine_species_mass'][-1]:.3f}\n"
        f"   epochs with a conflicting measurement: "
        f"{np.mean(np.array(logs['conflicting_fraction']) > 0):.0%}; "
        f"mean conflicting fraction {np.mean(logs['conflicting_fraction']):.2f}\n"
        f"   gradient norm over the mean at the end: species "
        f"{logs['species_gradient_ratio'][-1]:.2f}, mass "
        f"{logs['mass_gradient_ratio'][-1]:.2f}\n"
    )
    keras_dwo.plot_conflicts(history).savefig(f"{args.output}_conflicts.png")

    print("2. Every method from the same initial weights:")
    result = keras_dwo.compare(
        build,
        METHODS,
        x,
        y,
        validation_data=validation,
        epochs=epochs,
        batch_size=BATCH_SIZE,
        seed=SEED,
    )
    result.plot().savefig(f"{args.output}_weights.png")
    print(f"\nPlots saved to {args.output}_conflicts.png and {args.output}_weights.png")

    if args.quick:
        majority = np.mean(test["species"] == np.bincount(train["species"]).argmax())
        failures = [
            f"{row['method']}: accuracy {row['val_species_accuracy']:.3f}"
            for row in result.rows
            if row["val_species_accuracy"] <= majority
        ]
        if [row["method"] for row in result.rows] != METHODS:
            failures.append("the table does not have one row per method")
        if failures:
            print("\nQuick check FAILED:", *failures, sep="\n  ", file=sys.stderr)
            sys.exit(1)
        print("Quick check passed: one row per method, each beats the majority.")


if __name__ == "__main__":
    main()
