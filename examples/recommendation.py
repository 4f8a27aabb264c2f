"""Click and conversion: two binary heads with very different base rates.

A ranking model predicts, for a user and an item, whether the user clicks
(about 15 per cent of the impressions) and whether they buy (about 3 per
cent; only after a click). The conversion head sees five times fewer
positives, its loss is much smaller, and with equal weights the trunk serves
mostly the click task: the textbook case for balancing.

The data are generated with a known structure, so nothing is downloaded: 16
user and item features drawn from a standard normal; the click and the
conversion-after-click probabilities are logistic in their own random linear
combinations of the features, which share one direction (users who click
also tend to buy).

The same network (a shared trunk of two 64-unit layers, a sigmoid head per
task, binary crossentropy) is trained from the same initial weights with
equal weights, uncertainty weighting (Kendall et al., 2018), FAMO (Liu et al.,
2023; as in the paper, and with `update="next_batch"`, which learns from the
next batch's losses instead of a second forward pass) and MGDA-UB (Sener and
Koltun, 2018; the min-norm combination of the gradients of the shared
representation). The script prints the held-out
ROC AUC and log loss of each head, and the final task weights, and saves the
weights and losses over training to `--plot`.

    python examples/recommendation.py
    KERAS_BACKEND=torch python examples/recommendation.py --epochs 10

`--quick` trains on 10,000 impressions for 2 epochs and checks that every
method learned both tasks: each head's AUC must exceed 0.6 and its log loss
must beat predicting the training base rate. It exits with a non-zero status otherwise.
"""

import argparse
import sys

import keras
import numpy as np

import keras_dwo

SEED = 0
NUM_FEATURES = 16
NUM_TRAIN = 40_000
QUICK_TRAIN = 10_000
NUM_TEST = 10_000
DEFAULT_EPOCHS = 6
QUICK_EPOCHS = 2
BATCH_SIZE = 256
TASKS = ("click", "conversion")
LOSSES = {task: "binary_crossentropy" for task in TASKS}


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def generate(num_samples, rng, structure):
    """Returns features and click and conversion labels."""
    shared, click_direction, buy_direction = structure
    x = rng.normal(size=(num_samples, NUM_FEATURES)).astype("float32")
    click_logit = x @ (shared + click_direction) - 2.6
    buy_logit = x @ (shared + buy_direction) - 2.6
    click = rng.random(num_samples) < sigmoid(click_logit)
    conversion = click & (rng.random(num_samples) < sigmoid(buy_logit))
    return x, {
        "click": click.astype("float32")[:, None],
        "conversion": conversion.astype("float32")[:, None],
    }


def load_data(seed, num_train):
    rng = np.random.default_rng(seed)
    structure = [rng.normal(scale=0.35, size=NUM_FEATURES) for _ in range(3)]
    return generate(num_train, rng, structure), generate(NUM_TEST, rng, structure)


def build_model(weighting):
    inputs = keras.Input(shape=(NUM_FEATURES,))
    hidden = keras.layers.Dense(64, activation="relu")(inputs)
    hidden = keras.layers.Dense(64, activation="relu")(hidden)
    outputs = {
        task: keras.layers.Dense(1, activation="sigmoid", name=task)(hidden)
        for task in TASKS
    }
    return keras_dwo.DynamicWeightedModel(inputs, outputs, weighting=weighting)


def roc_auc(labels, scores):
    """The probability that a positive outranks a negative (ties count half)."""
    ranks = np.empty(len(scores))
    order = np.argsort(scores, kind="mergesort")
    ranks[order] = np.arange(1, len(scores) + 1)
    # Tied scores share their mean rank.
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    ranks = (sums / counts)[inverse]
    positives = labels.astype(bool)
    num_positive, num_negative = positives.sum(), (~positives).sum()
    return (ranks[positives].sum() - num_positive * (num_positive + 1) / 2) / (
        num_positive * num_negative
    )


def log_loss(labels, probabilities):
    probabilities = np.clip(probabilities, 1e-7, 1 - 1e-7)
    return -np.mean(
        labels * np.log(probabilities) + (1 - labels) * np.log(1 - probabilities)
    )


def train_and_evaluate(train, test, epochs, weighting):
    keras.utils.set_random_seed(SEED)
    model = build_model(weighting)
    model.compile(optimizer=keras.optimizers.Adam(2e-3), loss=LOSSES)
    history = model.fit(*train, batch_size=BATCH_SIZE, epochs=epochs, verbose=0)
    x_test, y_test = test
    predictions = model.predict(x_test, batch_size=4096, verbose=0)
    scores = {"history": history}
    for task in TASKS:
        labels, predicted = y_test[task][:, 0], predictions[task][:, 0]
        scores[f"{task}_auc"] = roc_auc(labels, predicted)
        scores[f"{task}_log_loss"] = log_loss(labels, predicted)
        scores[f"{task}_weight"] = history.history[f"{task}_weight"][-1]
    return scores


def print_table(results):
    columns = [
        (f"{task} {what}", f"{task}_{key}")
        for task in TASKS
        for what, key in (
            ("AUC", "auc"),
            ("log loss", "log_loss"),
            ("weight", "weight"),
        )
    ]
    print(f"{'method':<12}" + "".join(f"{title:>20}" for title, _ in columns))
    for method, scores in results.items():
        print(f"{method:<12}" + "".join(f"{scores[key]:>20.4f}" for _, key in columns))


def save_plot(results, path):
    runs = {method: scores["history"] for method, scores in results.items()}
    keras_dwo.plot_weights(runs).savefig(path)
    print(f"\nWeights and losses over training saved to {path}")


def check_learned(results, train):
    _, y_train = train
    base_losses = {
        task: log_loss(y_train[task][:, 0], np.full(len(y_train[task]), rate))
        for task, rate in ((task, y_train[task].mean()) for task in TASKS)
    }
    print(
        "Base rates (training): "
        + ", ".join(f"{task} {y_train[task].mean():.3f}" for task in TASKS)
    )
    failures = []
    for method, scores in results.items():
        for task in TASKS:
            if scores[f"{task}_auc"] <= 0.6:
                failures.append(f"{method}: {task} AUC {scores[f'{task}_auc']:.3f}")
            if scores[f"{task}_log_loss"] >= base_losses[task]:
                failures.append(
                    f"{method}: {task} log loss {scores[f'{task}_log_loss']:.4f} "
                    f"against {base_losses[task]:.4f} for the base rate"
                )
    return failures


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    mode.add_argument(
        "--quick",
        action="store_true",
        help=f"train {QUICK_EPOCHS} epochs and check every method learned",
    )
    parser.add_argument("--plot", default="recommendation_weights.png", help="PNG path")
    args = parser.parse_args()
    epochs = QUICK_EPOCHS if args.quick else args.epochs
    num_train = QUICK_TRAIN if args.quick else NUM_TRAIN

    train, test = load_data(SEED, num_train)
    print(
        f"Backend {keras.backend.backend()}: {num_train} training and {NUM_TEST} "
        f"held-out impressions, {epochs} epochs per method\n"
    )
    methods = {
        "equal": "equal",
        "uncertainty": "uncertainty",
        "famo": "famo",
        # FAMO without its second forward pass per step.
        "famo_next": keras_dwo.weighting.FAMO(update="next_batch"),
        "mgda_ub": "mgda_ub",
    }
    results = {
        name: train_and_evaluate(train, test, epochs, weighting)
        for name, weighting in methods.items()
    }
    print_table(results)
    save_plot(results, args.plot)

    if args.quick:
        failures = check_learned(results, train)
        if failures:
            print("\nQuick check FAILED:", *failures, sep="\n  ", file=sys.stderr)
            sys.exit(1)
        print("Quick check passed: every head beats its base rate.")


if __name__ == "__main__":
    main()
