"""Static loss weights searched with KerasTuner."""

import math

import keras
import numpy as np
import pytest

from keras_dwo import tuning

from conftest import TWO_TASK_LOSSES
from conftest import to_numpy
from conftest import two_task_data
from conftest import two_task_model

keras_tuner = pytest.importorskip("keras_tuner")


def test_simplex_grid_points_are_positive_and_sum_to_the_task_count():
    assert tuning.simplex_grid(2, 4) == [(0.5, 1.5), (1.0, 1.0), (1.5, 0.5)]
    points = tuning.simplex_grid(3, 6)
    assert len(points) == math.comb(5, 2)
    assert len(set(points)) == len(points)
    for point in points:
        assert min(point) > 0 and math.isclose(sum(point), 3.0)
    assert (1.0, 1.0, 1.0) in points
    with pytest.raises(ValueError, match="at least the number of tasks"):
        tuning.simplex_grid(3, 2)


def test_grid_search_trains_every_grid_point_with_its_weights(tmp_path):
    x, y = two_task_data(64)
    hypermodel = tuning.static_weights_hypermodel(
        two_task_model,
        {"optimizer": keras.optimizers.Adam(1e-2), "loss": TWO_TASK_LOSSES},
        resolution=4,
    )
    tuner = keras_tuner.GridSearch(
        hypermodel,
        objective=keras_tuner.Objective("val_task_loss_sum", "min"),
        directory=str(tmp_path),
        project_name="grid",
        seed=0,
    )
    tuner.search(x, y, epochs=1, validation_split=0.25, verbose=0)
    trials = tuner.oracle.trials.values()
    searched = sorted(
        tuple(hypermodel.weights_of(trial.hyperparameters).values()) for trial in trials
    )
    assert searched == tuning.simplex_grid(2, 4)
    # The objective is the unweighted sum of the validation task losses.
    scores = {
        tuple(hypermodel.weights_of(trial.hyperparameters).values()): trial.score
        for trial in trials
    }
    for trial in trials:
        metrics = trial.metrics.metrics
        np.testing.assert_allclose(
            trial.score,
            metrics["val_label_loss"].get_best_value()
            + metrics["val_value_loss"].get_best_value(),
            rtol=1e-5,
        )
    best_hp = tuner.get_best_hyperparameters()[0]
    assert scores[tuple(hypermodel.weights_of(best_hp).values())] == min(
        scores.values()
    )
    best_model = hypermodel.build(best_hp)
    np.testing.assert_allclose(
        to_numpy(best_model.task_weights),
        list(hypermodel.weights_of(best_hp).values()),
    )


def test_logit_weights_for_bayesian_search_sum_to_the_task_count():
    hypermodel = tuning.static_weights_hypermodel(
        two_task_model, {"optimizer": "adam", "loss": TWO_TASK_LOSSES}
    )
    hp = keras_tuner.HyperParameters()
    hp.Fixed("logit_label", 1.0)
    hp.Fixed("logit_value", -1.0)
    model = hypermodel.build(hp)
    expected = 2 * np.exp([1.0, -1.0]) / np.exp([1.0, -1.0]).sum()
    np.testing.assert_allclose(to_numpy(model.task_weights), expected, rtol=1e-6)
    assert model.task_names == ("label", "value")


def test_loss_terms_are_tuned_as_tasks():
    terms = {**TWO_TASK_LOSSES, "value": ["mse", "mae"]}
    hypermodel = tuning.static_weights_hypermodel(
        two_task_model, {"optimizer": "adam", "loss": terms}
    )
    hp = keras_tuner.HyperParameters()
    for task, logit in (("label", 0.0), ("value_mse", 1.0), ("value_mae", -1.0)):
        hp.Fixed(f"logit_{task}", logit)
    model = hypermodel.build(hp)
    assert model.task_names == ("label", "value_mse", "value_mae")
    logits = np.array([0.0, 1.0, -1.0])
    expected = 3 * np.exp(logits) / np.exp(logits).sum()
    np.testing.assert_allclose(to_numpy(model.task_weights), expected, rtol=1e-6)


def test_loss_weights_in_the_compile_arguments_are_refused():
    with pytest.raises(ValueError, match="must not contain `loss_weights`"):
        tuning.static_weights_hypermodel(
            two_task_model,
            {"loss": TWO_TASK_LOSSES, "loss_weights": [1.0, 1.0]},
        )
