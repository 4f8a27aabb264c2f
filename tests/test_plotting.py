"""keras_dwo.plot_weights on the history of a real fit."""

import numpy as np
import pytest

import keras_dwo

from conftest import TWO_TASK_LOSSES
from conftest import fresh_session
from conftest import two_task_data
from conftest import two_task_model


# The tests only read the history, so one fit serves them all.
@pytest.fixture(scope="module")
def history():
    fresh_session()
    x, y = two_task_data()
    model = two_task_model("uncertainty")
    model.compile(optimizer="adam", loss=TWO_TASK_LOSSES)
    return model.fit(x, y, epochs=3, validation_split=0.25, verbose=0)


def test_lines_carry_the_logged_weights_and_losses(history, tmp_path):
    figure = keras_dwo.plot_weights(history)
    weights_axes, losses_axes = figure.axes
    weight_lines = {line.get_label(): line for line in weights_axes.get_lines()}
    loss_lines = {line.get_label(): line for line in losses_axes.get_lines()}
    assert sorted(weight_lines) == ["label", "value"]
    assert sorted(loss_lines) == ["label", "val_label", "val_value", "value"]
    for task in ("label", "value"):
        np.testing.assert_allclose(
            weight_lines[task].get_ydata(), history.history[f"{task}_weight"]
        )
        np.testing.assert_allclose(
            loss_lines[f"val_{task}"].get_ydata(), history.history[f"val_{task}_loss"]
        )
        np.testing.assert_array_equal(weight_lines[task].get_xdata(), [1, 2, 3])
    path = tmp_path / "weights.png"
    figure.savefig(path)
    assert path.stat().st_size > 0


def test_takes_the_history_dict_and_a_subset_of_tasks(history):
    figure = keras_dwo.plot_weights(history.history, tasks=["value"])
    assert [line.get_label() for line in figure.axes[0].get_lines()] == ["value"]


def test_bad_histories_are_refused(history):
    with pytest.raises(ValueError, match="no `<task>_weight` log"):
        keras_dwo.plot_weights({"loss": [1.0, 0.5]})
    with pytest.raises(ValueError, match=r"task\(s\) \['speed'\]"):
        keras_dwo.plot_weights(history, tasks=["speed"])
    with pytest.raises(TypeError, match="History"):
        keras_dwo.plot_weights([1.0, 2.0])


def test_several_runs_get_one_titled_row_each(history):
    figure = keras_dwo.plot_weights({"first": history, "second": history.history})
    assert len(figure.axes) == 4
    assert [panel.get_suptitle() for panel in figure.subfigs] == ["first", "second"]
    second_weights = {line.get_label(): line for line in figure.axes[2].get_lines()}
    np.testing.assert_allclose(
        second_weights["value"].get_ydata(), history.history["value_weight"]
    )
