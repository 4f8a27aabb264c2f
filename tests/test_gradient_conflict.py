"""Per-task gradients on a batch, the GradientConflict callback and its plot."""

import csv

import keras
import numpy as np
import pytest
from subclassed import TwoHeads

import keras_dwo

from conftest import TWO_TASK_LOSSES
from conftest import to_numpy
from conftest import two_task_data
from conftest import two_task_model
from conftest import variable_values


def flat_rows(gradients):
    rows = [np.reshape(to_numpy(g), (len(to_numpy(g)), -1)) for g in gradients]
    return np.concatenate(rows, axis=1).astype("float64")


@pytest.mark.parametrize("task_weights", [[1.0, 1.0], [1.0, 0.0]])
def test_task_gradients_are_what_a_plain_step_applies(task_weights):
    x, y = two_task_data(32)
    model = two_task_model()
    model.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss=TWO_TASK_LOSSES,
        loss_weights=task_weights,
    )
    shared = model.shared_variables()
    assert [v.path for v in shared] == [
        v.path for v in model.get_layer("trunk").weights
    ]
    losses, gradients = model.task_gradients(x, y)
    before = variable_values(shared)
    model.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
    summed = [np.sum(to_numpy(g), axis=0) for g in gradients]
    for old, new, gradient in zip(before, variable_values(shared), summed):
        np.testing.assert_allclose(new, old - 0.1 * gradient, rtol=1e-5, atol=1e-6)
    if task_weights[1] == 0.0:
        assert np.all(flat_rows(gradients)[1] == 0.0)
    assert to_numpy(losses).shape == (2,)


def conflict_model():
    """Two outputs that are the same shared layer's output: no heads."""
    inputs = keras.Input(shape=(6,))
    shared = keras.layers.Dense(1, name="shared")(inputs)
    first = keras.layers.Identity(name="first")(shared)
    second = keras.layers.Identity(name="second")(shared)
    return keras_dwo.DynamicWeightedModel(inputs, {"first": first, "second": second})


@pytest.mark.parametrize("sign, fraction", [(-1.0, 1.0), (1.0, 0.0)])
def test_conflicts_are_counted_every_k_steps(sign, fraction, tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 6)).astype("float32")
    target = (3.0 + x @ rng.normal(size=(6, 1))).astype("float32")
    y = {"first": target, "second": sign * target}
    model = conflict_model()
    model.compile(optimizer=keras.optimizers.SGD(1e-3), loss="mse")
    conflict = keras_dwo.callbacks.GradientConflict(x, y, every=1)
    log_path = tmp_path / "log.csv"
    history = model.fit(
        x,
        y,
        batch_size=16,
        epochs=2,
        verbose=0,
        callbacks=[conflict, keras.callbacks.CSVLogger(str(log_path))],
    )
    assert history.history["conflicting_fraction"] == [fraction, fraction]
    cosine = history.history["cosine_first_second"][-1]
    assert np.sign(cosine) == sign and abs(cosine) > 0.5
    with open(log_path) as file:
        rows = list(csv.DictReader(file))
    assert float(rows[-1]["cosine_first_second"]) == pytest.approx(cosine, rel=1e-6)


def test_the_logs_equal_a_numpy_computation():
    x, y = two_task_data(64)
    model = two_task_model("uncertainty")
    model.compile(optimizer="adam", loss=TWO_TASK_LOSSES)
    probe = (x[:32], {key: value[:32] for key, value in y.items()})
    conflict = keras_dwo.callbacks.GradientConflict(*probe)
    history = model.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=[conflict])
    _, gradients = model.task_gradients(*probe)
    jacobian = flat_rows(gradients)
    norms = np.linalg.norm(jacobian, axis=1)
    cosine = jacobian[0] @ jacobian[1] / (norms[0] * norms[1])
    logs = {key: values[-1] for key, values in history.history.items()}
    np.testing.assert_allclose(logs["cosine_label_value"], cosine, rtol=1e-5)
    np.testing.assert_allclose(
        [logs["label_gradient_ratio"], logs["value_gradient_ratio"]],
        norms / norms.mean(),
        rtol=1e-5,
    )
    assert logs["conflicting_fraction"] == float(cosine < 0)


def test_plot_conflicts_draws_the_pairs_and_ratios():
    pytest.importorskip("matplotlib")
    history = {
        "cosine_a_b": [0.5, -0.2],
        "cosine_a_c": [0.1, 0.3],
        "cosine_b_c": [-0.9, -0.5],
        "a_gradient_ratio": [1.0, 1.2],
        "b_gradient_ratio": [0.5, 0.6],
        "c_gradient_ratio": [1.5, 1.2],
    }
    figure = keras_dwo.plot_conflicts(history)
    heat_map, ratios = figure.axes[:2]
    np.testing.assert_allclose(
        heat_map.images[0].get_array(),
        [history["cosine_a_b"], history["cosine_a_c"], history["cosine_b_c"]],
    )
    assert [t.get_text() for t in heat_map.get_yticklabels()] == ["a_b", "a_c", "b_c"]
    assert len(ratios.get_lines()) == 4  # three tasks and the line at 1
    with pytest.raises(ValueError, match="GradientConflict"):
        keras_dwo.plot_conflicts({"loss": [1.0]})


def test_every_must_be_positive():
    with pytest.raises(ValueError, match="`every`"):
        keras_dwo.callbacks.GradientConflict(np.ones((2, 6)), None, every=0)


def test_a_subclassed_model_measures_its_traced_shared_layers():
    x, y = two_task_data(32)
    model = TwoHeads()
    model.compile(optimizer="sgd", loss=TWO_TASK_LOSSES)
    conflict = keras_dwo.callbacks.GradientConflict(x, y)
    history = model.fit(x, y, epochs=1, verbose=0, callbacks=[conflict])
    assert [v.path for v in model.shared_variables()] == [
        v.path for v in model.trunk.weights
    ]
    _, gradients = model.task_gradients(x, y)
    jacobian = flat_rows(gradients)
    cosine = jacobian[0] @ jacobian[1] / np.prod(np.linalg.norm(jacobian, axis=1))
    np.testing.assert_allclose(history.history["cosine_label_value"][-1], cosine, 1e-5)
