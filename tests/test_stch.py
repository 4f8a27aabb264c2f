"""STCH against a NumPy transcription of LibMTL's STCH."""

import keras
import numpy as np
import pytest

from keras_dwo import weighting

from conftest import TWO_TASK_LOSSES
from conftest import built
from conftest import to_numpy
from conftest import two_task_data
from conftest import two_task_model


def libmtl_objective(losses, nadir, mu):
    """LibMTL's STCH loss after its warm-up, in float64."""
    relative = np.log(losses / nadir + 1e-20)
    shifted = relative - np.max(relative)
    return mu * np.log(np.sum(np.exp(shifted / mu))) * len(losses)


def libmtl_weights(losses, nadir, mu):
    """The derivative of LibMTL's loss (its max term held) by central differences."""
    largest = np.max(np.log(losses / nadir))
    weights = []
    for i in range(len(losses)):
        step = 1e-6 * losses[i]
        up, down = losses.copy(), losses.copy()
        up[i] += step
        down[i] -= step

        def value(x):
            relative = np.log(x / nadir)
            return mu * np.log(np.sum(np.exp((relative - largest) / mu))) * len(x)

        weights.append((value(up) - value(down)) / (2 * step))
    return np.array(weights)


def call(method, losses, present=None):
    objective, weights = method.call(
        np.asarray(losses, "float32"),
        training=True,
        present=None if present is None else np.asarray(present, "float32"),
    )
    return float(to_numpy(objective)), to_numpy(weights)


@pytest.mark.parametrize("mu", [0.1, 1.0, 5.0])
def test_warmup_nadir_and_smooth_maximum_match_libmtl(mu):
    rng = np.random.default_rng(0)
    history = rng.uniform(0.2, 4.0, size=(7, 3))
    method = built(weighting.STCH(mu=mu, warmup_steps=2, nadir_steps=3, epsilon=0.0), 3)
    for losses in history[:5]:
        # Warm-up and nadir window: the sum of log losses.
        objective, weights = call(method, losses)
        np.testing.assert_allclose(objective, np.sum(np.log(losses)), rtol=1e-5)
        np.testing.assert_allclose(weights, 1.0 / losses, rtol=1e-5)
    nadir = history[2:5].mean(axis=0)
    np.testing.assert_allclose(
        to_numpy(method.nadir_sum) / to_numpy(method.nadir_count), nadir, rtol=1e-5
    )
    for losses in history[5:]:
        objective, weights = call(method, losses)
        np.testing.assert_allclose(
            objective, libmtl_objective(losses, nadir, mu), rtol=1e-4, atol=1e-5
        )
        np.testing.assert_allclose(
            weights, libmtl_weights(losses, nadir, mu), rtol=1e-3, atol=1e-6
        )


def test_the_task_furthest_above_its_nadir_gets_the_step_as_mu_shrinks():
    method = built(weighting.STCH(mu=0.01), 2)
    call(method, [1.0, 1.0])
    # Task 0 at half its nadir, task 1 at twice: task 1 takes it all.
    _, weights = call(method, [0.5, 2.0])
    np.testing.assert_allclose(weights, [0.0, 2.0 / 2.0], atol=1e-6)
    # Equal relative losses: the step is shared, T softmax = 1 each.
    _, weights = call(method, [3.0, 3.0])
    np.testing.assert_allclose(weights, [1.0 / 3.0, 1.0 / 3.0], rtol=1e-5)


def test_an_absent_task_is_measured_when_it_first_has_labels():
    method = built(weighting.STCH(), 3)
    call(method, [1.0, 2.0, 4.0], present=[1, 0, 1])
    np.testing.assert_array_equal(to_numpy(method.nadir_count), [1, 0, 1])
    # After the window: task 1's first labelled loss is its nadir point, and
    # it takes no part in that step.
    _, weights = call(method, [1.0, 3.0, 4.0])
    np.testing.assert_array_equal(to_numpy(method.nadir_count), [1, 1, 1])
    np.testing.assert_allclose(to_numpy(method.nadir_sum), [1.0, 3.0, 4.0])
    assert weights[1] == 0.0
    np.testing.assert_allclose(weights[[0, 2]], [1.0 / 1.0, 1.0 / 4.0], rtol=1e-5)
    # From then on it takes part.
    _, weights = call(method, [1.0, 3.0, 4.0])
    np.testing.assert_allclose(weights, 1.0 / np.array([1.0, 3.0, 4.0]), rtol=1e-5)


def test_evaluation_leaves_the_state_alone():
    method = built(weighting.STCH(), 2)
    method.call(np.array([1.0, 2.0], "float32"), training=False)
    assert float(to_numpy(method.steps)) == 0.0
    np.testing.assert_array_equal(to_numpy(method.nadir_count), [0.0, 0.0])


def test_invalid_arguments_are_refused():
    with pytest.raises(ValueError, match="mu"):
        weighting.STCH(mu=0.0)
    with pytest.raises(ValueError, match="warmup_steps"):
        weighting.STCH(warmup_steps=-1)
    with pytest.raises(ValueError, match="nadir_steps"):
        weighting.STCH(nadir_steps=0)


def test_fit_counts_its_steps_measures_the_nadir_and_saves_both(tmp_path):
    model = two_task_model(weighting.STCH(warmup_steps=1, nadir_steps=2))
    model.compile(optimizer="sgd", loss=TWO_TASK_LOSSES)
    x, y = two_task_data(128)
    history = model.fit(x, y, epochs=2, batch_size=32, verbose=0).history
    method = model.weighting
    assert float(to_numpy(method.steps)) == 8.0
    np.testing.assert_array_equal(to_numpy(method.nadir_count), [2.0, 2.0])
    assert np.all(to_numpy(method.nadir_sum) > 0)
    assert np.all(np.isfinite(history["loss"]))
    path = str(tmp_path / "stch.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    for name in ("steps", "nadir_sum", "nadir_count"):
        np.testing.assert_array_equal(
            to_numpy(getattr(loaded.weighting, name)), to_numpy(getattr(method, name))
        )
    assert loaded.weighting.get_config()["nadir_steps"] == 2
