"""Per-task weights and losses reach TensorBoard through keras.callbacks."""

import pathlib

import keras
import numpy as np
import pytest

from conftest import TWO_TASK_LOSSES
from conftest import two_task_data
from conftest import two_task_model

# keras.callbacks.TensorBoard writes with tf.summary on every backend.
tf = pytest.importorskip("tensorflow")


def scalars(log_dir):
    """Returns {tag: [values by step]} from the event files under `log_dir`."""
    found = {}
    for path in sorted(pathlib.Path(log_dir).glob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                found.setdefault(value.tag, []).append(
                    (event.step, float(tf.make_ndarray(value.tensor)))
                )
    return {tag: [value for _, value in sorted(steps)] for tag, steps in found.items()}


def test_task_weights_and_losses_are_tensorboard_scalars(tmp_path):
    x, y = two_task_data()
    model = two_task_model("uncertainty")
    model.compile(optimizer="adam", loss=TWO_TASK_LOSSES)
    history = model.fit(
        x,
        y,
        epochs=3,
        validation_split=0.25,
        callbacks=[keras.callbacks.TensorBoard(log_dir=str(tmp_path))],
        verbose=0,
    ).history
    train = scalars(tmp_path / "train")
    validation = scalars(tmp_path / "validation")
    for task in ("label", "value"):
        np.testing.assert_allclose(
            train[f"epoch_{task}_weight"], history[f"{task}_weight"], rtol=1e-6
        )
        np.testing.assert_allclose(
            train[f"epoch_{task}_loss"], history[f"{task}_loss"], rtol=1e-6
        )
        np.testing.assert_allclose(
            validation[f"epoch_{task}_loss"], history[f"val_{task}_loss"], rtol=1e-6
        )


def test_gradient_conflicts_are_tensorboard_scalars(tmp_path):
    import keras_dwo

    x, y = two_task_data()
    model = two_task_model()
    model.compile(optimizer="adam", loss=TWO_TASK_LOSSES)
    conflict = keras_dwo.callbacks.GradientConflict(
        x[:32], {k: v[:32] for k, v in y.items()}
    )
    history = model.fit(
        x,
        y,
        epochs=2,
        callbacks=[conflict, keras.callbacks.TensorBoard(log_dir=str(tmp_path))],
        verbose=0,
    ).history
    train = scalars(tmp_path / "train")
    for key in ("cosine_label_value", "value_gradient_ratio", "conflicting_fraction"):
        np.testing.assert_allclose(train[f"epoch_{key}"], history[key], rtol=1e-6)
