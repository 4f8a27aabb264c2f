"""compare: every method from the same initial weights, in one table."""

import keras
import numpy as np
import pytest

import keras_dwo
from keras_dwo.comparison import _network_variables

from conftest import TWO_TASK_LOSSES
from conftest import two_task_data
from conftest import two_task_model
from conftest import variable_values


def build(method):
    model = two_task_model(method)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=TWO_TASK_LOSSES,
        metrics={"label": ["accuracy"]},
    )
    return model


class InitialWeights(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.seen = []

    def on_train_begin(self, logs=None):
        self.seen.append(variable_values(_network_variables(self.model)))


def test_one_row_per_method_from_the_same_initial_weights(capsys):
    x, y = two_task_data(64)
    validation = two_task_data(32, seed=1)
    initial = InitialWeights()
    methods = ["equal", "uncertainty", "upgrad"]
    result = keras_dwo.compare(
        build,
        methods,
        x,
        y,
        validation_data=validation,
        epochs=2,
        batch_size=16,
        callbacks=[initial],
    )
    assert [row["method"] for row in result.rows] == methods
    for row in result.rows:
        assert {"val_label_loss", "val_value_loss", "val_label_accuracy"} <= set(row)
        assert {"label_weight", "value_weight", "ms_per_step"} <= set(row)
        assert row["ms_per_step"] > 0
    assert len(initial.seen) == 3
    for seen in initial.seen[1:]:
        for a, b in zip(seen, initial.seen[0]):
            np.testing.assert_array_equal(a, b)
    printed = capsys.readouterr().out
    assert all(f"{method}:" in printed for method in methods)
    assert result.format().splitlines()[0].split()[0] == "method"
    assert set(result.histories) == set(methods)


def test_a_row_is_what_fit_gives_and_runs_repeat():
    x, y = two_task_data(64)
    first = keras_dwo.compare(build, {"eq": "equal"}, x, y, epochs=2, verbose=0)
    again = keras_dwo.compare(build, {"eq": "equal"}, x, y, epochs=2, verbose=0)
    keras.utils.set_random_seed(0)
    model = build("equal")
    keras.utils.set_random_seed(0)
    history = model.fit(x, y, epochs=2, verbose=0).history
    for result in (first, again):
        (row,) = result.rows
        np.testing.assert_allclose(row["label_loss"], history["label_loss"][-1], 1e-6)
        np.testing.assert_allclose(
            row["label_accuracy"], history["label_accuracy"][-1], 1e-6
        )
        assert "val_label_loss" not in row


def test_bad_arguments_are_named():
    x, y = two_task_data(16)
    with pytest.raises(ValueError, match="`methods` is empty"):
        keras_dwo.compare(build, [], x, y)

    def other_network(method):
        model = build(method) if method == "equal" else build_wider(method)
        return model

    def build_wider(method):
        inputs = keras.Input(shape=(6,))
        hidden = keras.layers.Dense(32, activation="relu")(inputs)
        model = keras_dwo.DynamicWeightedModel(
            inputs,
            {
                "label": keras.layers.Dense(3, activation="softmax")(hidden),
                "value": keras.layers.Dense(1)(hidden),
            },
            weighting=method,
        )
        model.compile(optimizer="adam", loss=TWO_TASK_LOSSES)
        return model

    with pytest.raises(ValueError, match="another network for 'rlw'"):
        keras_dwo.compare(other_network, ["equal", "rlw"], x, y, verbose=0)
