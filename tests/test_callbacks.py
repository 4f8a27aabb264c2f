"""Callbacks that set task weights: DWA, schedules, and changes mid-epoch."""

import keras
import numpy as np
import pytest

import keras_dwo

from conftest import BACKEND
from conftest import TWO_TASK_LOSSES
from conftest import to_numpy
from conftest import two_task_data
from conftest import two_task_model


def compiled(**kwargs):
    model = two_task_model()
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss=TWO_TASK_LOSSES, **kwargs)
    return model


def dwa_formula(two_epochs_ago, last_epoch, temperature):
    ratios = np.asarray(last_epoch) / np.asarray(two_epochs_ago)
    exp = np.exp(ratios / temperature)
    return len(ratios) * exp / exp.sum()


def test_dwa_weights_follow_the_formula_from_logged_losses():
    model = compiled()
    x, y = two_task_data(256)
    history = model.fit(
        x,
        y,
        epochs=6,
        batch_size=32,
        verbose=0,
        callbacks=[keras_dwo.callbacks.DynamicWeightAverage(temperature=2.0)],
    ).history
    losses = np.stack([history["label_loss"], history["value_loss"]], axis=1)
    weights = np.stack([history["label_weight"], history["value_weight"]], axis=1)
    np.testing.assert_allclose(weights[:2], 1.0)
    for epoch in range(2, 6):
        expected = dwa_formula(losses[epoch - 2], losses[epoch - 1], 2.0)
        np.testing.assert_allclose(weights[epoch], expected, rtol=1e-5)
        assert weights[epoch].sum() == pytest.approx(2.0, rel=1e-5)
    assert not np.allclose(weights[2:], 1.0)
    np.testing.assert_allclose(
        to_numpy(model.task_loss_history), losses[-2:], rtol=1e-5
    )


@pytest.mark.parametrize("temperature", [0, -1.0, float("nan")])
def test_dwa_rejects_a_temperature_that_is_not_positive(temperature):
    with pytest.raises(ValueError, match="`temperature` must be positive"):
        keras_dwo.callbacks.DynamicWeightAverage(temperature=temperature)


def test_loss_weight_scheduler_sets_weights_each_epoch():
    model = compiled()
    x, y = two_task_data(64)

    def schedule(epoch, weights):
        assert weights.shape == (2,)
        return {"value": 1.0 / (epoch + 1)}

    history = model.fit(
        x,
        y,
        epochs=3,
        batch_size=32,
        verbose=0,
        callbacks=[keras_dwo.callbacks.LossWeightScheduler(schedule)],
    ).history
    np.testing.assert_allclose(history["value_weight"], [1.0, 0.5, 1 / 3], rtol=1e-6)
    np.testing.assert_allclose(history["label_weight"], [1.0, 1.0, 1.0])


@pytest.mark.parametrize(
    "schedule, message",
    [
        (lambda epoch, w: [1.0], r"Got 1 task weight\(s\) for 2 task\(s\)"),
        (lambda epoch, w: {"mass": 1.0}, r"unknown task\(s\) \['mass'\]"),
        (lambda epoch, w: [1.0, -1.0], "must be finite and non-negative"),
    ],
)
def test_loss_weight_scheduler_rejects_bad_weights(schedule, message):
    model = compiled()
    x, y = two_task_data(32)
    callback = keras_dwo.callbacks.LossWeightScheduler(schedule)
    with pytest.raises(ValueError, match=message):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[callback])


class _SetWeightsAfterBatch(keras.callbacks.Callback):
    def __init__(self, batch, weights):
        super().__init__()
        self.batch, self.weights, self.logs = batch, weights, []

    def on_train_batch_end(self, batch, logs=None):
        self.logs.append(dict(logs))
        if batch == self.batch:
            self.model.task_weights.assign(self.weights)


def step_values(running_means):
    """Per-step values from the running means that batch logs report."""
    means = np.asarray(running_means, dtype="float64")
    steps = np.arange(1, len(means) + 1)
    totals = means * steps
    return np.diff(totals, prepend=0.0)


@pytest.mark.parametrize("jit_compile", [True, False])
def test_weights_set_mid_epoch_change_the_next_compiled_step(jit_compile):
    if jit_compile and BACKEND == "torch":
        pytest.skip("torch: Keras compiles with torch.compile, not part of this check")
    model = compiled(jit_compile=jit_compile)
    x, y = two_task_data(128)
    callback = _SetWeightsAfterBatch(batch=1, weights=[3.0, 0.0])
    model.fit(
        x, y, epochs=1, batch_size=32, shuffle=False, verbose=0, callbacks=[callback]
    )
    logs = callback.logs
    objective = step_values([log["loss"] for log in logs])
    label = step_values([log["label_loss"] for log in logs])
    value = step_values([log["value_loss"] for log in logs])
    np.testing.assert_allclose(objective[:2], label[:2] + value[:2], rtol=1e-4)
    np.testing.assert_allclose(objective[2:], 3.0 * label[2:], rtol=1e-4)
    assert [log["value_weight"] for log in logs] == [1.0, 1.0, 0.0, 0.0]


def test_steps_per_execution_gives_the_same_training():
    x, y = two_task_data(128)
    results = []
    for steps in (1, 4):
        keras.utils.set_random_seed(0)
        model = two_task_model("uncertainty")
        if BACKEND == "torch":
            with pytest.raises(ValueError, match="steps_per_execution"):
                model.compile(
                    optimizer="adam", loss=TWO_TASK_LOSSES, steps_per_execution=4
                )
                model.fit(x, y, epochs=1, verbose=0)
            return
        model.compile(optimizer="adam", loss=TWO_TASK_LOSSES, steps_per_execution=steps)
        history = model.fit(x, y, epochs=2, batch_size=16, shuffle=False, verbose=0)
        results.append(
            (history.history, [to_numpy(v) for v in model.trainable_variables])
        )
    for key in ("loss", "label_loss", "value_loss", "label_weight"):
        np.testing.assert_allclose(results[0][0][key], results[1][0][key], rtol=1e-5)
    for single, grouped in zip(results[0][1], results[1][1]):
        np.testing.assert_allclose(single, grouped, rtol=1e-5, atol=1e-6)
