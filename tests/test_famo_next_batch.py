"""FAMO's update from the next batch's losses, without a second forward pass."""

import keras
import numpy as np
import pytest

from keras_dwo import weighting

from conftest import TWO_TASK_LOSSES
from conftest import built
from conftest import to_numpy
from conftest import two_task_data
from conftest import two_task_model
from conftest import variable_values


def tensor(values):
    return keras.ops.convert_to_tensor(np.asarray(values, "float32"))


def test_each_step_learns_from_the_previous_batch_then_weights_this_one():
    rng = np.random.default_rng(0)
    history = [tensor(losses) for losses in rng.uniform(0.5, 3.0, size=(6, 3))]
    next_batch = built(weighting.FAMO(update="next_batch"), 3)
    same_batch = built(weighting.FAMO(), 3)
    assert not next_batch.updates_after_step and same_batch.updates_after_step
    for step, losses in enumerate(history):
        if step > 0:
            # The paper's update, handed the next batch's losses as "after".
            same_batch.update(history[step - 1], losses)
        _, weights = next_batch.call(losses, training=True)
        _, want = same_batch.call(losses, training=True)
        np.testing.assert_allclose(to_numpy(weights), to_numpy(want), rtol=1e-6)
        np.testing.assert_array_equal(
            to_numpy(next_batch.logits), to_numpy(same_batch.logits)
        )
    # The logits moved: the weights are no longer 1 / L alone.
    assert np.ptp(to_numpy(next_batch.logits)) > 0


def test_evaluation_neither_learns_nor_records():
    method = built(weighting.FAMO(update="next_batch"), 2)
    method.call(tensor([1.0, 2.0]), training=False)
    np.testing.assert_array_equal(to_numpy(method.previous_present), [0.0, 0.0])
    np.testing.assert_array_equal(to_numpy(method.logits), [0.0, 0.0])


def test_a_task_absent_from_either_batch_keeps_its_logit():
    method = built(weighting.FAMO(update="next_batch"), 3)
    method.call(tensor([1.0, 2.0, 3.0]), training=True)
    method.call(tensor([0.9, 1.5, 2.5]), training=True)
    logit = to_numpy(method.logits)[1].tobytes()
    present = tensor([1.0, 0.0, 1.0])
    method.call(tensor([0.8, 0.0, 2.4]), training=True, present=present)
    # Absent in this batch, then in the previous one: unchanged both times.
    method.call(tensor([0.7, 1.2, 2.3]), training=True)
    assert to_numpy(method.logits)[1].tobytes() == logit
    method.call(tensor([0.6, 1.1, 2.2]), training=True)
    assert to_numpy(method.logits)[1].tobytes() != logit


def trained(update):
    keras.utils.set_random_seed(0)
    model = two_task_model(weighting.FAMO(update=update))
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss=TWO_TASK_LOSSES)
    x, y = two_task_data(64)
    history = model.fit(x, y, epochs=6, batch_size=64, shuffle=False, verbose=0)
    return model, history.history


def test_full_batch_training_takes_the_papers_steps(tmp_path):
    # The same data every step and no dropout: the next batch's losses
    # before its step are the same batch's losses after the step. (The
    # paper's logits move once more, after the last step.)
    want, want_history = trained("same_batch")
    got, history = trained("next_batch")
    for expected, actual in zip(
        variable_values(want.trainable_variables),
        variable_values(got.trainable_variables),
    ):
        np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6)
    for key in ("loss", "label_weight", "value_weight"):
        np.testing.assert_allclose(history[key], want_history[key], rtol=1e-5)
    # The weights moved away from their start.
    assert history["label_weight"][-1] != history["label_weight"][1]
    assert np.ptp(to_numpy(got.weighting.logits)) > 0
    path = str(tmp_path / "famo.keras")
    got.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.weighting.get_config()["update"] == "next_batch"
    np.testing.assert_array_equal(
        to_numpy(loaded.weighting.previous_losses),
        to_numpy(got.weighting.previous_losses),
    )


def test_an_unknown_update_is_refused():
    with pytest.raises(ValueError, match="update"):
        weighting.FAMO(update="every_batch")
