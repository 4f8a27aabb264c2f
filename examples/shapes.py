"""Detection in miniature: classify a shape and regress its bounding box.

Each 32x32 image holds one shape (a square, a disk or a triangle) of random
size and position on Gaussian noise, generated here, so nothing is
downloaded. A small CNN with a shared trunk has two heads, as a detector
does:

- `shape`: the class, sparse categorical crossentropy;
- `box`: the bounding box `(top, left, bottom, right) / 32` on sigmoid
  outputs, trained as detectors train it on two loss terms: a Huber loss on
  the coordinates and an IoU loss (1 - IoU) on the overlap. Each term is a
  task of its own (`box_huber`, `box_iou_loss`), weighted and logged.

The three losses live on different scales, and which one should lead changes
during training: the detection literature moves weight from localisation to
classification as training goes on. The same network is trained from the
same initial weights with

- equal weights;
- uncertainty weighting (Kendall et al., 2018);
- GradNorm (Chen et al., 2018), which balances the gradient norms of the
  weighted task losses with learned weights;
- a progress schedule (`keras_dwo.callbacks.LossWeightScheduler`) that moves
  the weights linearly from (shape 0.2, each box term 0.9) to (1.8, 0.1).

It prints each method's held-out accuracy, mean box IoU and final weights,
and saves the weights and losses over training to `--plot`.

    python examples/shapes.py
    KERAS_BACKEND=jax python examples/shapes.py --epochs 20

`--quick` trains on fewer images for a few epochs and checks that every
method learned both tasks: its accuracy must beat the most frequent class and
its mean IoU must beat always predicting the mean training box. It exits with
a non-zero status otherwise.
"""

import argparse
import sys

import keras
import numpy as np

import keras_dwo

SEED = 0
SIZE = 32
SHAPES = ("square", "disk", "triangle")
DEFAULT_EPOCHS = 12
QUICK_EPOCHS = 3
DEFAULT_IMAGES = 6000
QUICK_IMAGES = 1500
BATCH_SIZE = 64


def shape_mask(kind, center_row, center_col, radius):
    rows, cols = np.mgrid[:SIZE, :SIZE]
    if kind == "square":
        return (np.abs(rows - center_row) <= radius) & (
            np.abs(cols - center_col) <= radius
        )
    if kind == "disk":
        return (rows - center_row) ** 2 + (cols - center_col) ** 2 <= radius**2
    # A triangle pointing up, as wide at its base as it is tall.
    depth = rows - (center_row - radius)
    return (
        (depth >= 0) & (depth <= 2 * radius) & (np.abs(cols - center_col) <= depth / 2)
    )


def generate(num_images, rng):
    """Returns images, class indices and boxes `(top, left, bottom, right) / SIZE`."""
    images = rng.normal(scale=0.3, size=(num_images, SIZE, SIZE, 1)).astype("float32")
    labels = rng.integers(len(SHAPES), size=num_images).astype("int32")
    boxes = np.empty((num_images, 4), "float32")
    for index, label in enumerate(labels):
        radius = rng.integers(4, 9)
        center_row, center_col = rng.integers(radius, SIZE - radius, size=2)
        mask = shape_mask(SHAPES[label], center_row, center_col, radius)
        images[index, mask, 0] += 1.0
        rows, cols = np.nonzero(mask)
        boxes[index] = [rows.min(), cols.min(), rows.max() + 1, cols.max() + 1]
    return images, labels, boxes / SIZE


def box_iou(predicted, true):
    """Intersection over union of `(top, left, bottom, right)` boxes, per row."""
    ops = keras.ops
    top = ops.maximum(predicted[:, 0], true[:, 0])
    left = ops.maximum(predicted[:, 1], true[:, 1])
    bottom = ops.minimum(predicted[:, 2], true[:, 2])
    right = ops.minimum(predicted[:, 3], true[:, 3])
    intersection = ops.relu(bottom - top) * ops.relu(right - left)

    def area(boxes):
        return ops.relu(boxes[:, 2] - boxes[:, 0]) * ops.relu(boxes[:, 3] - boxes[:, 1])

    union = area(predicted) + area(true) - intersection
    return intersection / ops.maximum(union, 1e-7)


def iou_loss(y_true, y_pred):
    """One minus the box IoU: the box loss term that scores overlap."""
    return 1.0 - box_iou(y_pred, keras.ops.cast(y_true, y_pred.dtype))


# Two loss terms on the box, as detectors train it: each term is a task.
LOSSES = {"shape": "sparse_categorical_crossentropy", "box": ["huber", iou_loss]}
TASKS = ("shape", "box_huber", "box_iou_loss")


def mean_iou(predicted, true):
    return float(keras.ops.convert_to_numpy(keras.ops.mean(box_iou(predicted, true))))


def build_model(weighting):
    inputs = keras.Input(shape=(SIZE, SIZE, 1))
    hidden = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(inputs)
    hidden = keras.layers.MaxPooling2D()(hidden)
    hidden = keras.layers.Conv2D(32, 3, padding="same", activation="relu")(hidden)
    hidden = keras.layers.MaxPooling2D()(hidden)
    hidden = keras.layers.Flatten()(hidden)
    hidden = keras.layers.Dense(64, activation="relu")(hidden)
    shape = keras.layers.Dense(len(SHAPES), activation="softmax", name="shape")(hidden)
    box = keras.layers.Dense(4, activation="sigmoid", name="box")(hidden)
    return keras_dwo.DynamicWeightedModel(
        inputs, {"shape": shape, "box": box}, weighting=weighting
    )


def localisation_to_classification(epochs):
    """Returns a `LossWeightScheduler` schedule for a run of `epochs` epochs."""

    def schedule(epoch, weights):
        progress = epoch / max(epochs - 1, 1)
        box = 0.9 - 0.8 * progress
        return {"shape": 0.2 + 1.6 * progress, "box_huber": box, "box_iou_loss": box}

    return schedule


def train_and_evaluate(train, test, epochs, weighting, callbacks=()):
    keras.utils.set_random_seed(SEED)
    model = build_model(weighting)
    model.compile(optimizer=keras.optimizers.Adam(2e-3), loss=LOSSES)
    images, labels, boxes = train
    history = model.fit(
        images,
        {"shape": labels, "box": boxes},
        batch_size=BATCH_SIZE,
        epochs=epochs,
        callbacks=list(callbacks),
        verbose=0,
    )
    test_images, test_labels, test_boxes = test
    predictions = model.predict(test_images, batch_size=512, verbose=0)
    return {
        "accuracy": np.mean(predictions["shape"].argmax(1) == test_labels),
        "iou": mean_iou(predictions["box"], test_boxes),
        "weights": [history.history[f"{task}_weight"][-1] for task in TASKS],
        "history": history,
    }


def print_table(results):
    header = "".join(f" {task + ' weight':>19}" for task in TASKS)
    print(f"{'method':<12} {'accuracy':>9} {'mean IoU':>9}{header}")
    for method, scores in results.items():
        weights = "".join(f" {weight:>19.3f}" for weight in scores["weights"])
        print(f"{method:<12} {scores['accuracy']:>9.3f} {scores['iou']:>9.3f}{weights}")


def check_learned(results, train, test):
    _, train_labels, train_boxes = train
    _, test_labels, test_boxes = test
    majority_rate = np.mean(test_labels == np.bincount(train_labels).argmax())
    mean_box = np.broadcast_to(train_boxes.mean(0), test_boxes.shape)
    mean_box_iou = mean_iou(mean_box, test_boxes)
    print(
        f"Trivial predictors: most frequent class {majority_rate:.3f}, "
        f"mean-box IoU {mean_box_iou:.3f}"
    )
    failures = []
    for method, scores in results.items():
        if scores["accuracy"] <= majority_rate:
            failures.append(f"{method}: accuracy {scores['accuracy']:.3f}")
        if scores["iou"] <= mean_box_iou:
            failures.append(f"{method}: mean IoU {scores['iou']:.3f}")
    return failures


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    mode.add_argument(
        "--quick",
        action="store_true",
        help=f"train on {QUICK_IMAGES} images for {QUICK_EPOCHS} epochs and "
        "check every method beats the trivial predictors",
    )
    parser.add_argument("--plot", default="shapes_weights.png", help="PNG path")
    args = parser.parse_args()
    epochs = QUICK_EPOCHS if args.quick else args.epochs
    num_images = QUICK_IMAGES if args.quick else DEFAULT_IMAGES

    rng = np.random.default_rng(SEED)
    train, test = generate(num_images, rng), generate(num_images // 4, rng)
    print(
        f"Backend {keras.backend.backend()}: {num_images} training and "
        f"{num_images // 4} held-out images, {epochs} epochs per method\n"
    )
    scheduler = keras_dwo.callbacks.LossWeightScheduler(
        localisation_to_classification(epochs)
    )
    results = {
        "equal": train_and_evaluate(train, test, epochs, "equal"),
        "uncertainty": train_and_evaluate(train, test, epochs, "uncertainty"),
        "GradNorm": train_and_evaluate(train, test, epochs, "gradnorm"),
        "schedule": train_and_evaluate(
            train, test, epochs, "equal", callbacks=[scheduler]
        ),
    }
    print_table(results)
    runs = {method: scores["history"] for method, scores in results.items()}
    keras_dwo.plot_weights(runs).savefig(args.plot)
    print(f"\nWeights and losses over training saved to {args.plot}")

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
