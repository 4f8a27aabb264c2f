"""Partial labels: samples that lack the target of some task."""

import keras
import numpy as np
import pytest

import keras_dwo

from conftest import TWO_TASK_LOSSES
from conftest import built
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


@pytest.mark.parametrize("weighting", ["pcgrad", "mgda", "uncertainty", "famo"])
def test_a_batch_without_labels_of_a_task_trains_the_others(weighting):
    x, y, _ = partial_targets()
    y["value"][:] = np.nan
    model = two_task_model(weighting, missing_label=np.nan)
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss=TWO_TASK_LOSSES)
    method_state = variable_values(model.weighting.variables)
    history = model.fit(x, y, batch_size=32, epochs=3, verbose=0).history
    assert history["value_loss"] == [0.0, 0.0, 0.0]
    # MGDA, for one, found the minimum-norm point 0 of the hull that held
    # the absent task's zero gradient, and took no step.
    assert history["label_loss"][-1] < 0.9 * history["label_loss"][0]
    for value in variable_values(model.trainable_variables):
        assert np.all(np.isfinite(value))
    # What the method learned about the absent task stays as it was.
    for before, after in zip(method_state, variable_values(model.weighting.variables)):
        if before.shape == (2,) and before.dtype.kind == "f":
            assert after[1] == before[1]


def test_epoch_task_loss_is_the_mean_over_labelled_samples():
    x, y, present = partial_targets()
    # The first half of the batches have no label of `value` at all.
    present[: SAMPLES // 2] = False
    y["value"][~present] = np.nan
    model = two_task_model(missing_label=np.nan)
    model.compile(optimizer="sgd", loss=TWO_TASK_LOSSES)
    logs = model.evaluate(x, y, batch_size=8, return_dict=True, verbose=0)
    predicted = to_numpy(model(x)["value"])
    expected = np.mean((predicted[present] - y["value"][present]) ** 2)
    np.testing.assert_allclose(logs["value_loss"], expected, rtol=1e-5)


# Every method but RLW, whose random weights are drawn for all the tasks
# built (see the RLW test), and the aliases of the same classes.
METHODS_WITH_AN_ABSENT_TASK = sorted(
    set(keras_dwo.weighting.IDENTIFIERS) - {"rlw", "static", "log", "mgda_ub"}
)


@pytest.mark.parametrize("identifier", METHODS_WITH_AN_ABSENT_TASK)
def test_with_an_absent_task_a_method_acts_on_the_others_alone(identifier):
    # Tasks a, b, c, with b absent, must give what the method gives for the
    # two tasks a and c: the same direction or objective, the same weights
    # and the same state for them, and an untouched state for b.
    rng = np.random.default_rng(0)
    jacobian = rng.normal(size=(2, 5)).astype("float32")
    losses_before = np.array([0.7, 1.9], "float32")
    losses_after = np.array([0.6, 1.85], "float32")

    def with_absent_b(values):
        return keras.ops.convert_to_tensor(np.insert(to_numpy(values), 1, 0.0, axis=0))

    jacobian, losses_before, losses_after = (
        keras.ops.convert_to_tensor(values)
        for values in (jacobian, losses_before, losses_after)
    )

    def method_for(num_tasks):
        keras.utils.set_random_seed(0)
        return built(keras_dwo.weighting.get(identifier), num_tasks, num_columns=5)

    alone, among_three = method_for(2), method_for(3)
    fresh = variable_values(method_for(3).variables)
    present = keras.ops.convert_to_tensor([1.0, 0.0, 1.0])
    pair = [0, 2]
    if alone.needs_task_gradients:
        expected = alone.aggregate(jacobian, losses_before)
        actual = among_three.aggregate(
            with_absent_b(jacobian), with_absent_b(losses_before), present=present
        )
    else:
        expected = alone.call(losses_before, training=True)
        actual = among_three.call(
            with_absent_b(losses_before), training=True, present=present
        )
        alone.update(losses_before, losses_after)
        among_three.update(
            with_absent_b(losses_before), with_absent_b(losses_after), present
        )
    expected_result, expected_weights = (to_numpy(value) for value in expected)
    actual_result, actual_weights = (to_numpy(value) for value in actual)
    np.testing.assert_allclose(actual_result, expected_result, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(actual_weights[pair], expected_weights, rtol=1e-4)
    states = zip(
        variable_values(alone.variables),
        variable_values(among_three.variables),
        fresh,
    )
    for expected_state, state, initial in states:
        if state.shape == (3,):
            np.testing.assert_allclose(state[pair], expected_state, rtol=1e-4)
            assert state[1] == initial[1]
        elif state.shape == (3, 3):
            np.testing.assert_allclose(state[np.ix_(pair, pair)], expected_state)
            np.testing.assert_array_equal(state[1], initial[1])


def test_rlw_draws_weights_for_the_tasks_present_only():
    method = keras_dwo.weighting.get("rlw")
    method.build(["a", "b", "c"])
    present = keras.ops.convert_to_tensor([1.0, 0.0, 1.0])
    for training in (True, False):
        _, weights = method.call(
            keras.ops.convert_to_tensor([0.5, 0.0, 2.0]), training, present
        )
        weights = to_numpy(weights)
        assert weights[1] == 0.0
        assert weights.sum() == pytest.approx(1.0)


def test_a_method_without_a_present_argument_is_refused():
    class OldStyle(keras_dwo.weighting.LossWeighting):
        def call(self, losses, training=False):
            return keras.ops.sum(losses), keras.ops.ones_like(losses)

    with pytest.raises(ValueError, match="OldStyle.call takes no `present`"):
        two_task_model(OldStyle(), missing_label=np.nan)
    two_task_model(OldStyle())


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


@pytest.mark.parametrize("weighting", ["uncertainty", "imtl_l", "famo", "gradnorm"])
def test_an_absent_task_keeps_its_state_and_moments_bit_for_bit(weighting):
    """After steps with both tasks, a step without `value` labels moves
    nothing of `value`'s: neither its learned state nor its Adam moments."""
    x, y, _ = partial_targets()
    complete = {name: target.copy() for name, target in y.items()}
    complete["value"] = np.nan_to_num(complete["value"])
    absent = {**complete, "value": np.full_like(complete["value"], np.nan)}
    model = two_task_model(weighting, missing_label=np.nan)
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss=TWO_TASK_LOSSES)
    for _ in range(3):
        model.train_on_batch(x, complete)
    per_task = [
        v
        for v in [*model.weighting.variables, *model.optimizer.variables]
        if v.shape[:1] == (2,)
    ]
    before = variable_values(per_task)
    model.train_on_batch(x, absent)
    after = variable_values(per_task)
    assert per_task
    for old, new in zip(before, after):
        np.testing.assert_array_equal(new[1], old[1])
    assert any(not np.array_equal(new[0], old[0]) for old, new in zip(before, after))
