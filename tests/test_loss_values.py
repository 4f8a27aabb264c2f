"""Each task's loss is the value of its Keras loss, by the shorter way too."""

import keras
import numpy as np
import pytest

from keras_dwo import tasks

from conftest import gradient_of
from conftest import to_numpy

BATCH = 6


def per_sample_squares(y_true, y_pred):
    return keras.ops.mean(keras.ops.square(y_pred - y_true), axis=-1)


def scalar_squares(y_true, y_pred):
    return keras.ops.mean(keras.ops.square(y_pred - y_true))


class CalledOwnWay(keras.losses.Loss):
    """A loss with a `__call__` of its own, which must be the one called."""

    def call(self, y_true, y_pred):
        return per_sample_squares(y_true, y_pred)

    def __call__(self, y_true, y_pred, sample_weight=None):
        return 2.0 * super().__call__(y_true, y_pred, sample_weight)


LOSSES = {
    "mse": lambda: "mse",
    "mae": lambda: "mae",
    "binary crossentropy": lambda: "binary_crossentropy",
    "sparse categorical crossentropy": lambda: "sparse_categorical_crossentropy",
    "Huber object": lambda: keras.losses.Huber(delta=0.5),
    "summed": lambda: keras.losses.MeanSquaredError(reduction="sum"),
    "function, per sample": lambda: per_sample_squares,
    "function, scalar": lambda: scalar_squares,
    "own __call__": lambda: CalledOwnWay(),
}


def loss_and_data(name):
    loss = tasks._resolve_loss(LOSSES[name](), name)
    rng = np.random.default_rng(0)
    if name == "sparse categorical crossentropy":
        prediction = rng.dirichlet(np.ones(4), size=BATCH).astype("float32")
        target = rng.integers(0, 4, size=(BATCH,)).astype("int32")
    else:
        prediction = rng.uniform(0.1, 0.9, size=(BATCH, 3)).astype("float32")
        target = rng.uniform(size=(BATCH, 3)).astype("float32")
    return loss, keras.ops.convert_to_tensor(target), prediction


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("name", LOSSES)
def test_the_task_loss_is_the_keras_loss(name, weighted):
    loss, target, prediction = loss_and_data(name)
    weight = None
    if weighted:
        weight = keras.ops.convert_to_tensor(np.linspace(0.0, 2.0, BATCH, "float32"))

    def keras_value(p):
        return loss(target, p, weight)

    def task_value(p):
        return tasks.reduced_loss(loss, target, p, weight)

    expected = to_numpy(keras_value(keras.ops.convert_to_tensor(prediction)))
    value = to_numpy(task_value(keras.ops.convert_to_tensor(prediction)))
    np.testing.assert_array_equal(value, expected)
    np.testing.assert_allclose(
        gradient_of(task_value, prediction),
        gradient_of(keras_value, prediction),
        rtol=1e-6,
    )


def test_a_plain_mean_does_not_take_the_keras_call(monkeypatch):
    loss, target, prediction = loss_and_data("mse")
    expected = to_numpy(loss(target, prediction))

    def refused(*args, **kwargs):
        raise AssertionError("Keras's Loss.__call__ was called")

    monkeypatch.setattr(keras.losses.Loss, "__call__", refused)
    value = tasks.reduced_loss(loss, target, keras.ops.convert_to_tensor(prediction))
    np.testing.assert_array_equal(to_numpy(value), expected)
    # With sample weights it is Keras's call that weighs them.
    with pytest.raises(AssertionError, match="was called"):
        tasks.reduced_loss(loss, target, prediction, np.ones(BATCH, "float32"))
