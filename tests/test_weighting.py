"""Loss-level methods on plain tensors: values, weights, state and identifiers."""

import keras
import numpy as np
import pytest

from keras_dwo import weighting

from conftest import to_numpy

TASKS = ("a", "b", "c")
LOSSES = np.array([0.5, 2.0, 8.0], "float32")


def built(method):
    method.build(TASKS)
    return method


def evaluate(method, losses=LOSSES, training=True):
    objective, weights = method(keras.ops.convert_to_tensor(losses), training=training)
    return float(to_numpy(objective)), to_numpy(weights)


def test_equal_and_static():
    objective, weights = evaluate(built(weighting.get("equal")))
    assert objective == pytest.approx(10.5)
    np.testing.assert_array_equal(weights, [1, 1, 1])
    objective, weights = evaluate(built(weighting.Static([1.0, 0.5, 0.25])))
    assert objective == pytest.approx(0.5 + 1.0 + 2.0)
    np.testing.assert_allclose(weights, [1.0, 0.5, 0.25])
    with pytest.raises(ValueError, match="one weight per task .* received 2"):
        built(weighting.Static([1.0, 2.0]))
    by_name = built(weighting.Static({"c": 0.25, "a": 1.0, "b": 0.5}))
    np.testing.assert_allclose(evaluate(by_name)[1], [1.0, 0.5, 0.25])
    assert weighting.get(keras.saving.serialize_keras_object(by_name)).get_config()[
        "weights"
    ] == {"c": 0.25, "a": 1.0, "b": 0.5}
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['d'\]"):
        built(weighting.Static({"a": 1.0, "b": 1.0, "d": 1.0}))
    with pytest.raises(ValueError, match="finite and non-negative.*b=inf"):
        built(weighting.Static([1.0, float("inf"), 1.0]))


def test_uncertainty_value_and_weights():
    method = built(weighting.Uncertainty())
    method.uncertainty.log_variances.assign([0.0, np.log(2.0), -1.0])
    s = np.array([0.0, np.log(2.0), -1.0])
    objective, weights = evaluate(method)
    assert objective == pytest.approx(float(np.sum(np.exp(-s) * LOSSES + s)), rel=1e-6)
    np.testing.assert_allclose(weights, np.exp(-s), rtol=1e-6)


def test_uncertainty_paper_factors():
    method = built(weighting.Uncertainty(regression_tasks=["a", "c"]))
    objective, weights = evaluate(method)
    np.testing.assert_allclose(weights, [0.5, 1.0, 0.5])
    assert objective == pytest.approx(0.25 + 2.0 + 4.0)
    with pytest.raises(ValueError, match=r"Unknown regression task\(s\) \['z'\]"):
        built(weighting.Uncertainty(regression_tasks=["z"]))


def test_rlw_draws_positive_weights_that_sum_to_one():
    method = built(weighting.RLW(seed=3))
    draws = np.stack([evaluate(method)[1] for _ in range(20)])
    assert np.all(draws > 0)
    np.testing.assert_allclose(draws.sum(axis=1), 1.0, rtol=1e-6)
    assert np.ptp(draws[:, 0]) > 0.1
    objective, weights = evaluate(method, training=False)
    np.testing.assert_allclose(weights, [1 / 3] * 3, rtol=1e-6)
    assert objective == pytest.approx(10.5 / 3)


def test_gls_is_the_geometric_mean():
    objective, weights = evaluate(built(weighting.GLS()))
    geometric_mean = (0.5 * 2.0 * 8.0) ** (1 / 3)
    assert objective == pytest.approx(geometric_mean, rel=1e-6)
    np.testing.assert_allclose(weights, geometric_mean / (3 * LOSSES), rtol=1e-5)


def test_scale_invariant_weights_are_inverse_losses():
    objective, weights = evaluate(built(weighting.ScaleInvariant()))
    assert objective == pytest.approx(float(np.sum(np.log(LOSSES))), abs=1e-5)
    np.testing.assert_allclose(weights, 1 / LOSSES, rtol=1e-5)
    scaled_weights = evaluate(built(weighting.ScaleInvariant()), LOSSES * [1, 10, 1])[1]
    np.testing.assert_allclose(scaled_weights * [1, 10, 1], weights, rtol=1e-5)


def test_imtl_l_is_uncertainty_with_the_opposite_scale():
    imtl = built(weighting.IMTLL())
    uncertainty = built(weighting.Uncertainty())
    scales = np.array([0.3, -0.7, 1.1], "float32")
    imtl.loss_scales.assign(scales)
    uncertainty.uncertainty.log_variances.assign(-scales)
    imtl_objective, imtl_weights = evaluate(imtl)
    uncertainty_objective, uncertainty_weights = evaluate(uncertainty)
    assert imtl_objective == pytest.approx(uncertainty_objective, rel=1e-6)
    np.testing.assert_allclose(imtl_weights, uncertainty_weights, rtol=1e-6)


def test_famo_weights_start_proportional_to_inverse_losses():
    method = built(weighting.FAMO())
    objective, weights = evaluate(method)
    inverse = 1 / LOSSES
    np.testing.assert_allclose(weights, inverse / inverse.sum(), rtol=1e-5)
    assert float(np.sum(weights * LOSSES)) == pytest.approx(3 / inverse.sum(), rel=1e-5)


def test_famo_update_favours_the_task_that_improved_least():
    method = built(weighting.FAMO())
    before = keras.ops.convert_to_tensor(LOSSES)
    after = keras.ops.convert_to_tensor(LOSSES * np.array([0.5, 0.9, 0.99], "float32"))
    for _ in range(5):
        method.update(before, after)
    probabilities = to_numpy(method.task_probabilities())
    assert probabilities[2] > probabilities[1] > probabilities[0]
    np.testing.assert_allclose(probabilities.sum(), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(to_numpy(method.logits_adam.count), [5, 5, 5])


@pytest.mark.parametrize("identifier", sorted(weighting.IDENTIFIERS))
def test_get_resolves_strings_dicts_and_instances(identifier):
    method = weighting.get(identifier)
    assert isinstance(method, weighting.IDENTIFIERS[identifier])
    assert weighting.get(method) is method
    clone = weighting.get(keras.saving.serialize_keras_object(method))
    assert type(clone) is type(method) and clone.get_config() == method.get_config()


def test_get_rejects_other_values():
    with pytest.raises(ValueError, match="Unknown weighting 'pcgradx'"):
        weighting.get("pcgradx")
    with pytest.raises(ValueError, match="must be a string identifier"):
        weighting.get(3)


def test_a_weighting_instance_serves_one_model():
    from conftest import two_task_model

    method = weighting.FAMO()
    two_task_model(method)
    with pytest.raises(ValueError, match="give each model its own instance"):
        two_task_model(method)


NAN = float("nan")


@pytest.mark.parametrize(
    "make, argument",
    [
        (lambda: weighting.Static([NAN, 1.0]), r"weights\[0\]"),
        (lambda: weighting.Static([1.0, -1.0]), r"weights\[1\]"),
        (lambda: weighting.GradNorm(alpha=NAN), "alpha"),
        (lambda: weighting.GradNorm(learning_rate=-1.0), "learning_rate"),
        (lambda: weighting.FAMO(learning_rate=0.0), "learning_rate"),
        (lambda: weighting.FAMO(gamma=NAN), "gamma"),
        (lambda: weighting.FAMO(beta_1=2.0), "beta_1"),
        (lambda: weighting.FAMO(min_losses=[0.0, NAN]), r"min_losses\[1\]"),
        (lambda: weighting.ScaleInvariant(epsilon=-1.0), "epsilon"),
        (lambda: weighting.CAGrad(c=NAN), "`c`"),
        (lambda: weighting.MoCo(beta=NAN), "beta"),
        (lambda: weighting.MoDo(gamma=NAN), "gamma"),
        (lambda: weighting.MoDo(rho=-1.0), "rho"),
        (lambda: weighting.ExcessMTL(step_size=NAN), "step_size"),
        (lambda: weighting.NashMTL(max_norm=NAN), "max_norm"),
        (lambda: weighting.DBMTL(beta_sigma=NAN), "beta_sigma"),
        (lambda: weighting.SDMGrad(regularization=NAN), "regularization"),
        (lambda: weighting.STCH(epsilon=NAN), "epsilon"),
        (lambda: weighting.GradVac(beta=NAN), "beta"),
        (lambda: weighting.Uncertainty(initial_log_variance=NAN), "initial_log"),
    ],
)
def test_a_nan_or_out_of_range_argument_is_refused_by_name(make, argument):
    with pytest.raises(ValueError, match=f"{argument}.* must be .*received"):
        make()


def test_regression_tasks_may_name_one_task():
    method = built(weighting.Uncertainty(regression_tasks="b"))
    _, weights = evaluate(method)
    # The paper's factor 1/2 on the regression task's precision only.
    np.testing.assert_allclose(weights, [1.0, 0.5, 1.0])
