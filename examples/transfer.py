"""Transfer learning: two task heads on a pretrained backbone, then fine-tuning.

The usual recipe for a small dataset: take a `keras.applications` backbone
with pretrained weights, train new heads on it with the backbone frozen, then
unfreeze the top of the backbone and fine-tune at a lower learning rate. Here
the new heads are two tasks, and keras-dwo weights their losses.

Nothing is downloaded. The data are scikit-learn's 8x8 handwritten digits
(`sklearn.datasets.load_digits`, 1,797 images), upscaled to 32x32 RGB. The
backbone is `keras.applications.MobileNetV3Small` (minimalistic, 32x32
inputs, `weights=None`); to stand in for ImageNet weights, it is first
pretrained briefly to tell apart the digits 0 to 4 of the training split, a
related task: it never sees a digit from 5 to 9. The two tasks of the heads:

- `digit`: all ten digits, sparse categorical crossentropy;
- `ink`: how much ink the digit uses, the standardised sum of its pixel
  intensities, mean squared error. The pretraining never asked for it, so
  the frozen features serve it less well.

Each head reads the pooled backbone features through its own hidden layer,
so the backbone is all the tasks share. Stage 1 trains the heads with the
backbone frozen (`backbone.trainable = False`); stage 2 unfreezes its last
`FINE_TUNE_LAYERS` layers, keeping the BatchNormalization layers frozen (the
advice of the Keras transfer-learning guide), compiles again with a 10 times
lower learning rate and fine-tunes. The model is a plain functional
`keras.Model`, wrapped with `keras_dwo.DynamicWeightedModel.from_model`.

The recipe runs from the same initial weights with equal weights, uncertainty
weighting (Kendall et al., 2018), a loss-level method, and UPGrad (Quinton
and Rey, 2024), a gradient-level method. While the backbone is frozen the
tasks share no trainable variable, so UPGrad has no task gradients to
combine: each head trains on its weighted loss (as with equal weights), and
a warning says so once. Once the top is unfrozen and the model compiled
again, UPGrad combines the two tasks' gradients of the unfrozen layers.

The script prints each method's held-out accuracy and ink mean squared error
(in standardised units) after each stage, with the task weights logged in
the stage's last epoch, and the scores of the trivial predictors.

    python examples/transfer.py
    KERAS_BACKEND=jax python examples/transfer.py --epochs 10

On two CPU cores `--quick` takes under a minute on TensorFlow and torch, and
a few minutes on JAX, whose XLA compiles the backbone's training step slowly.

`--quick` trains for fewer epochs and checks that every method learned: its
accuracy must beat the most frequent digit after each stage, and once
fine-tuned its ink error must also beat predicting the training mean. It
exits with a non-zero status otherwise. Needs scikit-learn
(`pip install keras-dwo[examples]`).
"""

import argparse
import sys

import keras
import numpy as np
from sklearn.datasets import load_digits

import keras_dwo

SEED = 0
TEST_FRACTION = 0.25
SIZE = 32  # MobileNetV3's smallest input
PRETRAIN_CLASSES = 5  # the backbone is pretrained on the digits 0 to 4
PRETRAIN_EPOCHS = 4  # in both modes
PRETRAIN_LEARNING_RATE = 0.02
DEFAULT_EPOCHS = 8  # per stage
QUICK_EPOCHS = 2
BATCH_SIZE = 64
HEAD_LEARNING_RATE = 3e-3
FINE_TUNE_LEARNING_RATE = 3e-4
FINE_TUNE_LAYERS = 30  # the last three blocks and the final 1x1 convolution
LOSSES = {"digit": "sparse_categorical_crossentropy", "ink": "mse"}
METHODS = {"equal": "equal", "uncertainty": "uncertainty", "UPGrad": "upgrad"}


def whole_batches(num_samples):
    """Rounds down to whole batches: JAX compiles the step anew for a smaller one."""
    return num_samples // BATCH_SIZE * BATCH_SIZE


def load_data(seed):
    """Returns train and held-out dicts with `x`, `digit` and `ink`.

    The 8x8 images are upscaled to SIZE x SIZE, repeated over three colour
    channels and scaled to [0, 255], the pixel range the backbone's own
    preprocessing expects. The ink target is standardised with the training
    split's statistics. The training split holds whole batches only.
    """
    digits = load_digits()
    scale = SIZE // digits.images.shape[1]
    images = digits.images.repeat(scale, axis=1).repeat(scale, axis=2)
    images = np.repeat(images[..., None] * (255.0 / 16.0), 3, axis=-1)
    ink = digits.images.sum(axis=(1, 2))
    order = np.random.default_rng(seed).permutation(len(images))
    num_train = whole_batches(round((1 - TEST_FRACTION) * len(images)))
    train_idx, test_idx = order[:num_train], order[num_train:]
    ink_mean, ink_std = ink[train_idx].mean(), ink[train_idx].std()

    def split(indices):
        return {
            "x": images[indices].astype("float32"),
            "digit": digits.target[indices].astype("int32"),
            "ink": ((ink[indices] - ink_mean) / ink_std)[:, None].astype("float32"),
        }

    return split(train_idx), split(test_idx)


def build_optimizer(model):
    """Creates the optimizer's variables now, before `fit`.

    On TensorFlow, `fit` otherwise creates them while it traces the training
    step, which makes TensorFlow trace the step a second time.
    """
    model.optimizer.build(model.trainable_variables)


def pretrain_backbone(train, epochs):
    """Returns a backbone trained to tell apart the digits 0 to 4.

    This stands in for downloading ImageNet weights: a related task on other
    classes, so the features are useful, but the backbone never sees a digit
    from 5 to 9 and is never asked about ink.
    """
    keras.utils.set_random_seed(SEED)
    backbone = keras.applications.MobileNetV3Small(
        input_shape=(SIZE, SIZE, 3),
        include_top=False,
        weights=None,
        minimalistic=True,
    )
    # Real pretrained weights come with settled BatchNormalization statistics.
    # This stand-in pretraining is short, so the moving statistics must follow
    # the batches faster than MobileNetV3's momentum of 0.999 allows.
    for layer in backbone.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.9
    inputs = keras.Input(shape=(SIZE, SIZE, 3))
    features = keras.layers.GlobalAveragePooling2D()(backbone(inputs))
    classes = keras.layers.Dense(PRETRAIN_CLASSES, activation="softmax")(features)
    model = keras.Model(inputs, classes)
    model.compile(
        optimizer=keras.optimizers.SGD(PRETRAIN_LEARNING_RATE, momentum=0.9),
        loss="sparse_categorical_crossentropy",
    )
    build_optimizer(model)
    known = np.flatnonzero(train["digit"] < PRETRAIN_CLASSES)
    known = known[: whole_batches(len(known))]
    model.fit(
        train["x"][known],
        train["digit"][known],
        batch_size=BATCH_SIZE,
        epochs=epochs,
        verbose=0,
    )
    return backbone


def build_model(backbone):
    """Returns a functional model with a `digit` and an `ink` head on `backbone`."""
    keras.utils.set_random_seed(SEED)
    inputs = keras.Input(shape=(SIZE, SIZE, 3))
    # training=False keeps the backbone's BatchNormalization layers in
    # inference mode, also once the backbone is unfrozen for fine-tuning.
    features = backbone(inputs, training=False)
    features = keras.layers.GlobalAveragePooling2D()(features)
    features = keras.layers.Dropout(0.2)(features)
    digit = keras.layers.Dense(64, activation="relu")(features)
    digit = keras.layers.Dense(10, activation="softmax", name="digit")(digit)
    ink = keras.layers.Dense(64, activation="relu")(features)
    ink = keras.layers.Dense(1, name="ink")(ink)
    return keras.Model(inputs, {"digit": digit, "ink": ink})


def unfreeze_top(backbone, num_layers):
    """Makes the last `num_layers` layers trainable, except BatchNormalization."""
    backbone.trainable = True
    for layer in backbone.layers[:-num_layers]:
        layer.trainable = False
    for layer in backbone.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False


def scores(model, history, test):
    predictions = model(test["x"], training=False)
    digit = keras.ops.convert_to_numpy(predictions["digit"])
    ink = keras.ops.convert_to_numpy(predictions["ink"])
    return {
        "accuracy": np.mean(digit.argmax(1) == test["digit"]),
        "ink_mse": np.mean((ink - test["ink"]) ** 2),
        "digit_weight": history.history["digit_weight"][-1],
        "ink_weight": history.history["ink_weight"][-1],
    }


def transfer(functional, backbone, initial_state, weighting, train, test, epochs):
    """Runs both stages with one method, from the `initial_state` of `functional`.

    Returns:
        The held-out scores after each stage, by stage.
    """
    # The weights, and the state of the dropout's random generator.
    for variable, value in zip(functional.variables, initial_state):
        variable.assign(value)
    keras.utils.set_random_seed(SEED)
    model = keras_dwo.DynamicWeightedModel.from_model(functional, weighting=weighting)
    targets = {"digit": train["digit"], "ink": train["ink"]}
    results = {}

    # Stage 1: train the heads on the frozen backbone.
    backbone.trainable = False
    model.compile(optimizer=keras.optimizers.Adam(HEAD_LEARNING_RATE), loss=LOSSES)
    build_optimizer(model)
    history = model.fit(
        train["x"], targets, batch_size=BATCH_SIZE, epochs=epochs, verbose=0
    )
    results["heads"] = scores(model, history, test)

    # Stage 2: unfreeze the top of the backbone, compile again, fine-tune.
    unfreeze_top(backbone, FINE_TUNE_LAYERS)
    model.compile(optimizer=keras.optimizers.Adam(FINE_TUNE_LEARNING_RATE), loss=LOSSES)
    build_optimizer(model)
    history = model.fit(
        train["x"], targets, batch_size=BATCH_SIZE, epochs=epochs, verbose=0
    )
    results["fine-tuned"] = scores(model, history, test)
    return results


def trivial_scores(train, test):
    majority = np.bincount(train["digit"]).argmax()
    return {
        "accuracy": np.mean(test["digit"] == majority),
        "ink_mse": np.mean((test["ink"] - train["ink"].mean()) ** 2),
    }


def print_table(results, trivial):
    print(
        f"{'method':<12} {'stage':<11} {'accuracy':>9} {'ink MSE':>8} "
        f"{'digit weight':>13} {'ink weight':>11}"
    )
    for method, stages in results.items():
        for stage, row in stages.items():
            print(
                f"{method:<12} {stage:<11} {row['accuracy']:>9.3f} "
                f"{row['ink_mse']:>8.3f} {row['digit_weight']:>13.3f} "
                f"{row['ink_weight']:>11.3f}"
            )
    print(
        f"{'trivial':<12} {'':<11} {trivial['accuracy']:>9.3f} "
        f"{trivial['ink_mse']:>8.3f}"
    )
    print("(trivial: the most frequent training digit, and the training mean ink)")


def check_learned(results, trivial):
    """Returns a message for each score that does not beat a trivial predictor.

    The accuracy is checked after both stages, the ink error after fine-tuning:
    how well the frozen features serve ink depends on the brief pretraining.
    """
    failures = []
    for method, stages in results.items():
        for stage, row in stages.items():
            if row["accuracy"] <= trivial["accuracy"]:
                failures.append(f"{method}, {stage}: accuracy {row['accuracy']:.3f}")
        ink_mse = stages["fine-tuned"]["ink_mse"]
        if ink_mse >= trivial["ink_mse"]:
            failures.append(f"{method}, fine-tuned: ink MSE {ink_mse:.3f}")
    return failures


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--epochs", type=int, default=DEFAULT_EPOCHS, help="epochs per stage"
    )
    mode.add_argument(
        "--quick",
        action="store_true",
        help=f"train {QUICK_EPOCHS} epochs per stage and check every method "
        "beats the trivial predictors",
    )
    args = parser.parse_args()
    epochs = QUICK_EPOCHS if args.quick else args.epochs

    train, test = load_data(SEED)
    print(
        f"Backend {keras.backend.backend()}: {len(train['x'])} training and "
        f"{len(test['x'])} held-out digits; backbone pretrained on 0-4 for "
        f"{PRETRAIN_EPOCHS} epochs, then {epochs} epochs per stage and method\n"
    )
    backbone = pretrain_backbone(train, PRETRAIN_EPOCHS)
    functional = build_model(backbone)
    initial_state = [keras.ops.convert_to_numpy(v) for v in functional.variables]
    results = {
        method: transfer(
            functional, backbone, initial_state, weighting, train, test, epochs
        )
        for method, weighting in METHODS.items()
    }
    trivial = trivial_scores(train, test)
    print_table(results, trivial)

    if args.quick:
        failures = check_learned(results, trivial)
        if failures:
            print(
                "\nQuick check FAILED, no better than trivial:",
                *failures,
                sep="\n  ",
                file=sys.stderr,
            )
            sys.exit(1)
        print(
            "Quick check passed: every method beats the most frequent digit "
            "after each stage, and both trivial predictors once fine-tuned."
        )


if __name__ == "__main__":
    main()
