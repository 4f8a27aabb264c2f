"""Partial labels: samples that lack the target of some task."""

import keras
import numpy as np
import pytest

import keras_dwo

from conftest import TWO_TASK_LOSSES
from conftest import to_numpy
from conftest import two_task_data
from conftest import two_task_model
from conftest import variable_values

SAMPLES = 64


def partial_targets(missing_value=np.nan):
    """Targets whose regression label is missing for every third sample."""
    x, y = two_task_data(SAMPLES)
    present = np.arange(SAMPLES) % 3 != 0
    value = y["value"].copy()
    value[~present] = missing_value
    return x, {"label": y["label"], "value": value}, present


def test_task_loss_is_the_mean_over_labelled_samples():
    x, y, present = partial_targets()
    model = two_task_model(missing_label=np.nan)
    model.compile(optimizer="sgd", loss=TWO_TASK_LOSSES)
    logs = model.evaluate(x, y, batch_size=SAMPLES, return_dict=True, verbose=0)
    predicted = to_numpy(model(x)["value"])
    expected = np.mean((predicted[present] - y["value"][present]) ** 2)
    assert np.isfinite(logs["value_loss"])
    np.testing.assert_allclose(logs["value_loss"], expected, rtol=1e-5)


@pytest.mark.parametrize("weighting", ["equal", "upgrad"])
def test_a_step_matches_a_plain_model_that_reweights_the_labelled_samples(weighting):
    # Unlabelled samples must add nothing to the gradient; the labelled ones
    # count as in a mean over them alone. With two tasks whose gradients do
    # not conflict, UPGrad's step is the equal step.
    x, y, present = partial_targets()
    model = two_task_model(weighting, missing_label=np.nan)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=TWO_TASK_LOSSES)
    twin = two_task_model()
    twin.set_weights(model.get_weights())
    plain = keras.Model(
        twin.inputs, {name: twin.get_layer(name).output for name in ("label", "value")}
    )
    plain.compile(optimizer=keras.optimizers.SGD(0.1), loss=TWO_TASK_LOSSES)
    reweighted = present * SAMPLES / present.sum()
    filled = {"label": y["label"], "value": np.nan_to_num(y["value"])}

    model.train_on_batch(x, y)
    plain.train_on_batch(
        x,
        filled,
        sample_weight={"label": np.ones(SAMPLES), "value": reweighted},
    )
    if weighting == "equal":
        for name in ("trunk", "label", "value"):
            for ours, theirs in zip(
                model.get_layer(name).get_weights(), twin.get_layer(name).get_weights()
            ):
                np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-6)
    for value in variable_values(model.trainable_variables):
        assert np.all(np.isfinite(value))


def test_a_zero_per_task_sample_weight_marks_a_missing_label():
    x, y, present = partial_targets(missing_value=123.0)
    by_value = two_task_model(missing_label=123.0)
    by_weight = two_task_model(missing_label=np.nan)
    by_weight.set_weights(by_value.get_weights())
    for model in (by_value, by_weight):
        model.compile(optimizer="sgd", loss=TWO_TASK_LOSSES)
    from_value = by_value.evaluate(
        x, y, batch_size=SAMPLES, return_dict=True, verbose=0
    )
    weights = {"label": np.ones(SAMPLES), "value": present.astype("float32")}
    from_weight = by_weight.evaluate(
        x, y, sample_weight=weights, batch_size=SAMPLES, return_dict=True, verbose=0
    )
    np.testing.assert_allclose(
        from_weight["value_loss"], from_value["value_loss"], rtol=1e-5
    )


def test_integer_labels_with_a_sentinel():
    x, y = two_task_data(SAMPLES)
    label = y["label"].copy()
    label[:10] = -1
    model = two_task_model(missing_label=-1)
    model.compile(optimizer="sgd", loss=TWO_TASK_LOSSES)
    logs = model.evaluate(
        x, {**y, "label": label}, batch_size=SAMPLES, return_dict=True, verbose=0
    )
    probabilities = to_numpy(model(x)["label"])
    expected = -np.mean(np.log(probabilities[np.arange(10, SAMPLES), label[10:]]))
    np.testing.assert_allclose(logs["label_loss"], expected, rtol=1e-5)


def test_metrics_skip_unlabelled_samples():
    x, y, present = partial_targets()
    model = two_task_model(missing_label=np.nan)
    model.compile(optimizer="sgd", loss=TWO_TASK_LOSSES, metrics={"value": ["mae"]})
    logs = model.evaluate(x, y, batch_size=SAMPLES, return_dict=True, verbose=0)
    predicted = to_numpy(model(x)["value"])
    expected = np.mean(np.abs(predicted[present] - y["value"][present]))
    np.testing.assert_allclose(logs["value_mae"], expected, rtol=1e-5)


def test_a_batch_without_labels_of_a_task_trains_the_others():
    x, y, _ = partial_targets()
    y["value"][:] = np.nan
    model = two_task_model("pcgrad", missing_label=np.nan)
    model.compile(optimizer="adam", loss=TWO_TASK_LOSSES)
    history = model.fit(x, y, batch_size=32, epochs=3, verbose=0).history
    assert history["value_loss"] == [0.0, 0.0, 0.0]
    assert history["label_loss"][-1] < history["label_loss"][0]
    for value in variable_values(model.trainable_variables):
        assert np.all(np.isfinite(value))


def test_fit_learns_from_partially_labelled_data():
    x, y, _ = partial_targets()
    model = two_task_model("uncertainty", missing_label=np.nan)
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss=TWO_TASK_LOSSES)
    history = model.fit(x, y, batch_size=16, epochs=5, verbose=0).history
    for task in ("label", "value"):
        losses = history[f"{task}_loss"]
        assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]


def test_missing_label_survives_save_and_load(tmp_path):
    x, y, _ = partial_targets()
    model = two_task_model(missing_label=np.nan)
    model.compile(optimizer="sgd", loss=TWO_TASK_LOSSES)
    expected = model.evaluate(x, y, batch_size=SAMPLES, return_dict=True, verbose=0)
    path = str(tmp_path / "partial.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert np.isnan(loaded.missing_label)
    logs = loaded.evaluate(x, y, batch_size=SAMPLES, return_dict=True, verbose=0)
    np.testing.assert_allclose(logs["value_loss"], expected["value_loss"], rtol=1e-6)


def test_metrics_given_twice_are_refused():
    model = two_task_model(missing_label=np.nan)
    with pytest.raises(ValueError, match="not both"):
        model.compile(
            loss=TWO_TASK_LOSSES,
            metrics={"value": ["mae"]},
            weighted_metrics={"value": ["mse"]},
        )


def test_from_model_takes_missing_label():
    base = two_task_model()
    functional = keras.Model(base.inputs, base.outputs)
    model = keras_dwo.DynamicWeightedModel.from_model(functional, missing_label=-1)
    assert model.missing_label == -1.0
