"""Save and resume: a reloaded model trains on as if it had never stopped."""

import keras
import numpy as np
import pytest

import keras_dwo

from conftest import TWO_TASK_LOSSES
from conftest import every_on_torch
from conftest import to_numpy
from conftest import two_task_data
from conftest import two_task_model


def state(model):
    return [to_numpy(v) for v in model.weights + model.optimizer.variables]


def fit(model, x, y, epochs, initial_epoch=0):
    return model.fit(
        x,
        y,
        epochs=epochs,
        initial_epoch=initial_epoch,
        batch_size=32,
        shuffle=False,
        verbose=0,
        callbacks=[keras_dwo.callbacks.DynamicWeightAverage()],
    ).history


# A method's state is its variables, which Keras saves and loads whatever the
# method. TensorFlow and JAX take one method of each step path, GradVac for
# the per-task gradients, and RLW: these two draw from a seed generator, whose
# state a compiled step carries in a way of its own on each backend.
METHODS = [
    "uncertainty",
    "famo",
    "rlw",
    "imtl_l",
    "gls",
    "gradnorm",
    "pcgrad",
    "gradvac",
    "nash_mtl",
    "stch",
    "db_mtl",
    "moco",
    "excess_mtl",
    "modo",
    "sdmgrad",
]


# MoCo stands for the methods whose state is made per shared parameter when
# the model plans its first step, and loaded from the shapes saved.
@pytest.mark.parametrize(
    "weighting",
    every_on_torch(
        METHODS, ["uncertainty", "famo", "rlw", "gradnorm", "gradvac", "moco"]
    ),
)
def test_two_plus_two_epochs_equal_four(weighting, tmp_path):
    x, y = two_task_data(128)

    def fresh():
        keras.utils.set_random_seed(0)
        model = two_task_model(weighting)
        model.compile(
            optimizer=keras.optimizers.Adam(0.01),
            loss=TWO_TASK_LOSSES,
            loss_weights={"label": 1.0, "value": 0.5},
            metrics={"value": ["mae"]},
        )
        return model

    straight = fresh()
    straight_history = fit(straight, x, y, epochs=4)

    first = fresh()
    fit(first, x, y, epochs=2)
    path = tmp_path / "model.keras"
    first.save(path)
    resumed = keras.models.load_model(path)
    assert isinstance(resumed, keras_dwo.DynamicWeightedModel)
    assert type(resumed.weighting) is type(straight.weighting)
    resumed_history = fit(resumed, x, y, epochs=4, initial_epoch=2)

    for key in ("loss", "label_loss", "value_loss", "label_weight", "value_weight"):
        np.testing.assert_allclose(
            resumed_history[key], straight_history[key][2:], rtol=1e-5, atol=1e-6
        )
    assert len(state(resumed)) == len(state(straight))
    for expected, actual in zip(state(straight), state(resumed)):
        np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)


def test_config_round_trip_keeps_tasks_and_weighting():
    model = two_task_model(keras_dwo.weighting.FAMO(learning_rate=0.1, gamma=0.0))
    clone = keras_dwo.DynamicWeightedModel.from_config(model.get_config())
    assert clone.task_names == model.task_names
    assert isinstance(clone.weighting, keras_dwo.weighting.FAMO)
    assert clone.weighting.learning_rate == 0.1 and clone.weighting.gamma == 0.0
    names = [layer.name for layer in model.layers]
    assert [layer.name for layer in clone.layers] == names


def test_reloaded_model_keeps_its_compile_configuration(tmp_path):
    model = two_task_model()
    model.compile(
        optimizer="adam",
        loss={"label": keras.losses.SparseCategoricalCrossentropy(), "value": "mae"},
        loss_weights=[2.0, 1.0],
    )
    x, y = two_task_data(64)
    model.fit(x, y, epochs=1, verbose=0)
    model.task_weights.assign([0.25, 4.0])
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    np.testing.assert_allclose(to_numpy(loaded.task_weights), [0.25, 4.0])
    expected = model.evaluate(x, y, verbose=0, return_dict=True)
    actual = loaded.evaluate(x, y, verbose=0, return_dict=True)
    for key in ("loss", "label_loss", "value_loss"):
        assert actual[key] == pytest.approx(expected[key], rel=1e-5)
