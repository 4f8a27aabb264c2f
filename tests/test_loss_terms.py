"""Several loss terms on one output: each term is a task."""

import keras
import numpy as np
import pytest
from subclassed import TwoHeads

import keras_dwo

from conftest import TWO_TASK_LOSSES
from conftest import every_on_torch
from conftest import to_numpy
from conftest import two_task_data
from conftest import two_task_model

TERMS = {"label": "sparse_categorical_crossentropy", "value": ["mse", "mae"]}
TERM_TASKS = ("label", "value_mse", "value_mae")


def squared_plus_absolute(y_true, y_pred):
    error = y_pred - y_true
    return keras.ops.mean(keras.ops.square(error) + keras.ops.abs(error), axis=-1)


def test_a_list_of_terms_makes_each_term_a_task():
    model = two_task_model("uncertainty")
    assert model.task_names == ("label", "value")
    model.compile(optimizer="adam", loss=TERMS, metrics={"value": ["mae"]})
    assert model.task_names == TERM_TASKS
    assert model.task_weights.shape == (3,)
    assert model.weighting.uncertainty.log_variances.shape == (3,)
    x, y = two_task_data(64)
    history = model.fit(x, y, epochs=2, batch_size=16, verbose=0).history
    for task in TERM_TASKS:
        assert f"{task}_loss" in history and f"{task}_weight" in history
    # Metrics stay per output.
    assert "value_mae" in history
    np.testing.assert_allclose(history["value_mae_loss"], history["value_mae"], 1e-5)
    predictions = to_numpy(model(x)["value"])
    logs = model.evaluate(x, y, batch_size=64, verbose=0, return_dict=True)
    expected_mse = np.mean((predictions - y["value"]) ** 2)
    expected_mae = np.mean(np.abs(predictions - y["value"]))
    np.testing.assert_allclose(logs["value_mse_loss"], expected_mse, rtol=1e-5)
    np.testing.assert_allclose(logs["value_mae_loss"], expected_mae, rtol=1e-5)


def test_equal_weighting_of_terms_trains_as_their_sum():
    x, y = two_task_data(64)
    terms = two_task_model()
    # The same layers: trained once as a plain model, once with terms.
    plain = keras.Model(terms.inputs, terms.outputs)
    initial = plain.get_weights()
    plain.compile(
        optimizer=keras.optimizers.SGD(0.05),
        loss={**TWO_TASK_LOSSES, "value": squared_plus_absolute},
    )
    summed = plain.fit(x, y, epochs=2, batch_size=16, shuffle=False, verbose=0)
    expected = plain.get_weights()
    plain.set_weights(initial)
    terms.compile(optimizer=keras.optimizers.SGD(0.05), loss=TERMS)
    balanced = terms.fit(x, y, epochs=2, batch_size=16, shuffle=False, verbose=0)
    np.testing.assert_allclose(
        balanced.history["loss"], summed.history["loss"], rtol=1e-5
    )
    for a, b in zip(expected, plain.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_terms_named_by_a_dict_and_loss_weights_by_task():
    model = two_task_model()
    model.compile(
        loss={
            "label": "sparse_categorical_crossentropy",
            "value": {"l2": "mse", "l1": keras.losses.MeanAbsoluteError()},
        },
        loss_weights={"label": 1.0, "value_l2": 0.5, "value_l1": 2.0},
    )
    assert model.task_names == ("label", "value_l2", "value_l1")
    np.testing.assert_allclose(to_numpy(model.task_weights), [1.0, 0.5, 2.0])


def test_one_output_with_two_terms_is_two_tasks():
    inputs = keras.Input(shape=(6,))
    hidden = keras.layers.Dense(8, activation="relu")(inputs)
    value = keras.layers.Dense(1, name="value")(hidden)
    model = keras_dwo.DynamicWeightedModel(inputs, {"value": value}, weighting="rlw")
    model.compile(optimizer="adam", loss={"value": ["mse", squared_plus_absolute]})
    assert model.task_names == ("value_mse", "value_squared_plus_absolute")
    x, y = two_task_data(32)
    history = model.fit(x, {"value": y["value"]}, epochs=1, verbose=0).history
    assert np.isfinite(history["value_squared_plus_absolute_loss"][0])


def _one_output_model(outputs_form, weighting):
    keras.utils.set_random_seed(3)
    inputs = keras.Input(shape=(6,))
    hidden = keras.layers.Dense(8, activation="relu")(inputs)
    value = keras.layers.Dense(1, name="value")(hidden)
    outputs = {"dict": {"value": value}, "list": [value], "tensor": value}
    return keras_dwo.DynamicWeightedModel(
        inputs, outputs[outputs_form], weighting=weighting
    )


@pytest.mark.parametrize("weighting", every_on_torch(["uncertainty", "upgrad"]))
@pytest.mark.parametrize(
    "outputs_form, loss, target_form",
    [
        ("dict", ["mse", "mae"], "bare"),
        ("list", {"value": ["mse", "mae"]}, "bare"),
        ("list", ["mse", "mae"], "list"),
        ("list", ["mse", "mae"], "dict"),
        ("tensor", {"output": ["mse", "mae"]}, "bare"),
        ("tensor", ["mse", "mae"], "list"),
    ],
)
def test_one_output_with_terms_takes_every_form_of_output_and_target(
    weighting, outputs_form, loss, target_form
):
    x, y = two_task_data(64)
    target = y["value"]
    reference = _one_output_model("dict", weighting)
    reference.compile(optimizer="sgd", loss={"value": ["mse", "mae"]})
    expected = reference.fit(
        x, {"value": target}, epochs=2, batch_size=16, shuffle=False, verbose=0
    ).history["loss"]
    model = _one_output_model(outputs_form, weighting)
    model.compile(optimizer="sgd", loss=loss)
    name = "output" if outputs_form == "tensor" else "value"
    assert model.task_names == (f"{name}_mse", f"{name}_mae")
    targets = {"bare": target, "list": [target], "dict": {name: target}}
    history = model.fit(
        x, targets[target_form], epochs=2, batch_size=16, shuffle=False, verbose=0
    ).history
    np.testing.assert_allclose(history["loss"], expected, rtol=1e-5)
    assert history["skipped_steps"][-1] == 0
    logs = model.evaluate(x, targets[target_form], verbose=0, return_dict=True)
    assert np.isfinite(logs[f"{name}_mae_loss"])


@pytest.mark.parametrize(
    "loss, message",
    [
        ({**TERMS, "value": []}, "empty list of loss terms"),
        ({**TERMS, "value": ["mse", "mse"]}, "must be unique"),
        ({**TERMS, "value": ["mse", lambda t, p: t - p]}, "must be named"),
        ({**TERMS, "value": ["mse", "nope"]}, "The loss of task 'value_nope': .*nope"),
    ],
)
def test_bad_terms_are_named(loss, message):
    with pytest.raises(ValueError, match=message):
        two_task_model().compile(loss=loss)


def test_recompiling_with_other_terms_is_refused():
    model = two_task_model()
    model.compile(loss=TERMS)
    model.compile(loss=TERMS)
    with pytest.raises(ValueError, match="The model's tasks are"):
        model.compile(loss=TWO_TASK_LOSSES)


@pytest.mark.parametrize("method", every_on_torch(["upgrad", "mgda_ub", "gradnorm"]))
def test_gradient_methods_balance_terms(method):
    x, y = two_task_data(128)
    model = two_task_model(method)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=TERMS)
    history = model.fit(x, y, epochs=4, batch_size=32, verbose=0).history
    for task in TERM_TASKS:
        losses = history[f"{task}_loss"]
        assert losses[-1] < losses[0], (task, losses)
    assert history["skipped_steps"][-1] == 0


def test_partial_labels_reach_every_term_of_an_output():
    x, y = two_task_data(64)
    value = y["value"].copy()
    value[::2] = np.nan
    model = two_task_model("equal", missing_label=float("nan"))
    model.compile(loss=TERMS)
    counts = to_numpy(model.count_task_labels({**y, "value": value}))
    np.testing.assert_array_equal(counts, [64, 32, 32])
    losses = to_numpy(model.compute_task_losses({**y, "value": value}, model(x)))
    predictions = to_numpy(model(x)["value"])[1::2]
    np.testing.assert_allclose(
        losses[2], np.mean(np.abs(predictions - y["value"][1::2])), rtol=1e-5
    )


def test_save_and_load_keep_the_terms_and_their_state(tmp_path):
    x, y = two_task_data(64)
    model = two_task_model("uncertainty")
    model.compile(optimizer="adam", loss=TERMS)
    model.fit(x, y, epochs=2, batch_size=16, verbose=0)
    model.save(tmp_path / "terms.keras")
    loaded = keras.models.load_model(tmp_path / "terms.keras")
    assert loaded.task_names == TERM_TASKS
    np.testing.assert_allclose(
        to_numpy(loaded.weighting.uncertainty.log_variances),
        to_numpy(model.weighting.uncertainty.log_variances),
    )
    after = model.fit(x, y, epochs=1, batch_size=16, shuffle=False, verbose=0)
    resumed = loaded.fit(x, y, epochs=1, batch_size=16, shuffle=False, verbose=0)
    np.testing.assert_allclose(
        resumed.history["value_mae_weight"],
        after.history["value_mae_weight"],
        rtol=1e-5,
    )


def test_subclassed_model_with_terms():
    x, y = two_task_data(32)
    model = TwoHeads(weighting="upgrad")
    model.compile(optimizer="adam", loss=TERMS)
    history = model.fit(x, y, epochs=1, verbose=0).history
    assert model.task_names == TERM_TASKS
    assert {f"{task}_weight" for task in TERM_TASKS} <= set(history)
