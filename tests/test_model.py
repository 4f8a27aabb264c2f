"""DynamicWeightedModel: tasks, compile, per-task losses and logs, bad input."""

import keras
import numpy as np
import pytest

import keras_dwo

from conftest import TWO_TASK_LOSSES
from conftest import to_numpy
from conftest import two_task_data
from conftest import two_task_model
from conftest import variable_values


def compiled(weighting="equal", **compile_kwargs):
    model = two_task_model(weighting)
    compile_kwargs.setdefault("loss", TWO_TASK_LOSSES)
    model.compile(optimizer=keras.optimizers.SGD(0.05), **compile_kwargs)
    return model


def test_task_names_from_dict_and_list():
    inputs = keras.Input(shape=(3,))
    a = keras.layers.Dense(1, name="alpha")(inputs)
    b = keras.layers.Dense(1, name="beta")(inputs)
    by_dict = keras_dwo.DynamicWeightedModel(inputs, {"first": a, "second": b})
    by_list = keras_dwo.DynamicWeightedModel(inputs, [a, b])
    assert by_dict.task_names == ("first", "second")
    assert by_list.task_names == ("alpha", "beta")
    assert tuple(to_numpy(by_list.task_weights)) == (1.0, 1.0)
    assert not by_list.task_weights.trainable


def test_fewer_than_two_tasks_is_an_error():
    inputs = keras.Input(shape=(3,))
    output = keras.layers.Dense(1, name="only")(inputs)
    # One output is one task unless `compile` gives it several loss terms.
    for outputs in (output, {"only": output}):
        model = keras_dwo.DynamicWeightedModel(inputs, outputs)
        with pytest.raises(ValueError, match="at least two tasks"):
            model.compile(loss="mse")


def test_from_model_shares_layers_and_weights():
    inputs = keras.Input(shape=(6,))
    hidden = keras.layers.Dense(8)(inputs)
    plain = keras.Model(
        inputs,
        {
            "label": keras.layers.Dense(3)(hidden),
            "value": keras.layers.Dense(1)(hidden),
        },
    )
    wrapped = keras_dwo.DynamicWeightedModel.from_model(plain, weighting="uncertainty")
    assert wrapped.task_names == ("label", "value")
    assert {id(v) for v in plain.weights} <= {id(v) for v in wrapped.weights}
    x, _ = two_task_data(8)
    np.testing.assert_allclose(
        to_numpy(wrapped(x)["value"]), to_numpy(plain(x)["value"]), rtol=1e-6
    )


def test_compile_validates_losses_by_output_name():
    model = two_task_model()
    with pytest.raises(ValueError, match=r"No loss for output\(s\) \['value'\]"):
        model.compile(loss={"label": "sparse_categorical_crossentropy"})
    with pytest.raises(ValueError, match=r"unknown output\(s\) \['mass'\]"):
        model.compile(loss={**TWO_TASK_LOSSES, "mass": "mse"})
    with pytest.raises(ValueError, match="one loss per output"):
        model.compile(loss=["mse"])
    with pytest.raises(ValueError, match="`loss` is required"):
        model.compile(optimizer="sgd")


def test_unknown_weighting_is_an_error():
    with pytest.raises(ValueError, match="Unknown weighting 'nope'"):
        two_task_model("nope")


def test_targets_that_do_not_match_the_outputs_name_the_output():
    model = compiled()
    x, y = two_task_data(16)
    with pytest.raises(ValueError, match=r"No target for output\(s\) \['value'\]"):
        model.fit(x, {"label": y["label"]}, epochs=1, verbose=0)
    with pytest.raises(ValueError, match=r"unknown output\(s\) \['extra'\]"):
        model.fit(x, {**y, "extra": y["value"]}, epochs=1, verbose=0)


def test_loss_weights_set_initial_task_weights():
    model = compiled(loss_weights={"label": 0.5, "value": 2.0})
    np.testing.assert_allclose(to_numpy(model.task_weights), [0.5, 2.0])
    with pytest.raises(ValueError, match="loss weight"):
        compiled(loss_weights={"label": 1.0})


def test_logs_hold_task_losses_weights_and_metrics():
    model = compiled(
        loss_weights=[0.5, 2.0], metrics={"label": ["accuracy"], "value": ["mae"]}
    )
    x, y = two_task_data()
    history = model.fit(
        x, y, epochs=2, batch_size=32, verbose=0, validation_data=(x, y)
    )
    for key in ("loss", "label_loss", "value_loss", "label_weight", "value_weight"):
        assert key in history.history and f"val_{key}" in history.history
    assert "label_accuracy" in history.history and "value_mae" in history.history
    assert history.history["label_weight"] == [0.5, 0.5]
    assert history.history["value_weight"] == [2.0, 2.0]


def test_evaluate_reports_unweighted_task_losses_and_the_objective():
    model = compiled(loss_weights=[0.5, 2.0])
    x, y = two_task_data()
    logs = model.evaluate(x, y, batch_size=len(x), verbose=0, return_dict=True)
    predictions = model.predict(x, verbose=0)
    label = to_numpy(
        keras.losses.sparse_categorical_crossentropy(y["label"], predictions["label"])
    ).mean()
    value = to_numpy(
        keras.losses.mean_squared_error(y["value"], predictions["value"])
    ).mean()
    np.testing.assert_allclose(logs["label_loss"], label, rtol=1e-5)
    np.testing.assert_allclose(logs["value_loss"], value, rtol=1e-5)
    np.testing.assert_allclose(logs["loss"], 0.5 * label + 2.0 * value, rtol=1e-5)


def test_sample_weight_per_task():
    model = compiled()
    x, y = two_task_data(64)
    mask = (np.arange(64) < 32).astype("float32")
    logs = model.evaluate(
        x,
        y,
        sample_weight={"label": np.ones(64, "float32"), "value": mask},
        batch_size=64,
        verbose=0,
        return_dict=True,
    )
    errors = (to_numpy(model.predict(x, verbose=0)["value"]) - y["value"])[:, 0] ** 2
    np.testing.assert_allclose(
        logs["value_loss"], (errors * mask).sum() / 64, rtol=1e-5
    )


def test_regularization_losses_are_part_of_the_objective():
    model = two_task_model(regularizer=keras.regularizers.L2(0.1))
    model.compile(optimizer="sgd", loss=TWO_TASK_LOSSES)
    x, y = two_task_data()
    logs = model.evaluate(x, y, batch_size=len(x), verbose=0, return_dict=True)
    penalty = 0.1 * np.sum(to_numpy(model.get_layer("trunk").kernel) ** 2)
    np.testing.assert_allclose(
        logs["loss"], logs["label_loss"] + logs["value_loss"] + penalty, rtol=1e-5
    )


def test_training_lowers_every_task_loss():
    model = compiled(weighting="uncertainty")
    x, y = two_task_data(256)
    before = model.evaluate(x, y, verbose=0, return_dict=True)
    model.fit(x, y, epochs=20, batch_size=32, verbose=0)
    after = model.evaluate(x, y, verbose=0, return_dict=True)
    assert after["label_loss"] < before["label_loss"]
    assert after["value_loss"] < 0.5 * before["value_loss"]


@pytest.mark.parametrize("weighting", ["uncertainty", "famo", "gradnorm", "pcgrad"])
def test_a_nan_task_loss_skips_the_step(weighting):
    model = compiled(weighting=weighting)
    x, y = two_task_data(32)
    model.fit(x, y, epochs=1, batch_size=32, verbose=0)
    state = model.trainable_variables + model.non_trainable_variables
    before = variable_values(state)
    optimizer_before = variable_values(model.optimizer.variables)
    poisoned = {"label": y["label"], "value": y["value"].copy()}
    poisoned["value"][3] = np.nan
    logs = model.train_on_batch(x, poisoned, return_dict=True)
    assert np.isnan(logs["value_loss"]) and np.isnan(logs["loss"])
    assert np.isfinite(logs["label_loss"])
    for old, new in zip(before, variable_values(state)):
        np.testing.assert_array_equal(old, new)
    for old, new in zip(optimizer_before, variable_values(model.optimizer.variables)):
        np.testing.assert_array_equal(old, new)
    logs = model.train_on_batch(x, y, return_dict=True)
    assert np.isfinite(logs["loss"])
    changed = [
        not np.array_equal(old, new)
        for old, new in zip(before, variable_values(model.trainable_variables))
    ]
    assert any(changed)


def test_terminate_on_nan_stops_training():
    model = compiled()
    x, y = two_task_data(64)
    y["value"][:] = np.nan
    history = model.fit(
        x,
        y,
        epochs=3,
        batch_size=32,
        verbose=0,
        callbacks=[keras.callbacks.TerminateOnNaN()],
    )
    assert len(history.history["loss"]) == 1
