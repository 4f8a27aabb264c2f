"""FairGrad against the paper's procedure (LibMTL's SciPy least squares)."""

import numpy as np
import pytest
from scipy.optimize import least_squares

from keras_dwo import weighting
from keras_dwo.weighting.fairgrad import RIDGE

from conftest import aggregate

ALPHAS = [0.5, 1.0, 2.0, 5.0]


def jacobian(seed, spread):
    """Random task gradients whose norms spread over `2 spread` decades."""
    rng = np.random.default_rng(seed)
    tasks = int(rng.integers(2, 9))
    scales = 10.0 ** rng.uniform(-spread, spread, size=(tasks, 1))
    return (rng.normal(size=(tasks, int(rng.integers(tasks, 40)))) * scales).astype(
        "float32"
    )


def regularized_gram(jacobian):
    gram = jacobian.astype("float64") @ jacobian.T.astype("float64")
    return gram + RIDGE * np.diag(np.diag(gram))


def least_squares_weights(gram, alpha):
    """The paper's and LibMTL's solve: SciPy from the uniform start, w >= 0."""

    def residual(w):
        return gram @ w - np.power(1.0 / w, 1.0 / alpha)

    start = np.ones(len(gram)) / len(gram)
    return least_squares(residual, start, bounds=(0, np.inf)).x


def relative_residuals(gram, weights, alpha):
    target = weights ** (-1.0 / alpha)
    return np.abs(gram @ weights - target) / target


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("seed", range(6))
def test_weights_and_direction_match_the_papers_solve(seed, alpha):
    # Norms within a factor of 10 of each other: there SciPy converges.
    matrix = jacobian(seed, spread=0.5)
    want = least_squares_weights(regularized_gram(matrix), alpha)
    direction, weights = aggregate(weighting.FairGrad(alpha=alpha), matrix)
    np.testing.assert_allclose(weights, want, rtol=1e-4)
    np.testing.assert_allclose(direction, want @ matrix, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("spread, tolerance", [(1.5, 1e-4), (3, 1e-2)])
@pytest.mark.parametrize("alpha", ALPHAS)
def test_the_equations_hold_where_least_squares_stops_short(alpha, spread, tolerance):
    # Norms over three and six decades: SciPy from the uniform start leaves
    # residuals of the order of 1 in some of these. Over six decades float32
    # resolves the smallest tasks' equations to about 1e-3.
    for seed in range(12):
        matrix = jacobian(seed, spread)
        gram = regularized_gram(matrix)
        _, weights = aggregate(weighting.FairGrad(alpha=alpha), matrix)
        kept = weights > 0
        assert np.all(np.isfinite(weights))
        residuals = relative_residuals(gram[kept][:, kept], weights[kept], alpha)
        assert residuals.max() < tolerance, (seed, residuals)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_orthogonal_gradients_get_a_power_of_their_norm(alpha):
    # (G w)_i = |g_i|^2 w_i = w_i^(-1/alpha): w_i = |g_i|^(-2 alpha / (1 + alpha)).
    matrix = np.diag([0.5, 2.0, 4.0]).astype("float32")
    _, weights = aggregate(weighting.FairGrad(alpha=alpha), matrix)
    squared_norms = (1.0 + RIDGE) * np.array([0.25, 4.0, 16.0])
    np.testing.assert_allclose(
        weights, squared_norms ** (-alpha / (1.0 + alpha)), rtol=1e-5
    )


def test_absent_and_zero_gradient_tasks_are_left_out():
    matrix = jacobian(0, spread=0.5)[:3]
    _, alone = aggregate(weighting.FairGrad(), matrix[:2])
    with_zero = np.concatenate([matrix[:2], np.zeros_like(matrix[:1])])
    _, weights = aggregate(weighting.FairGrad(), with_zero)
    np.testing.assert_allclose(weights, [*alone, 0.0], rtol=1e-5)
    method = weighting.FairGrad()
    method.build(["a", "b", "c"])
    absent = matrix.copy()
    absent[2] = 0.0
    _, weights = method.aggregate(absent, np.ones(3, "float32"), present=[1, 1, 0])
    np.testing.assert_allclose(np.asarray(weights), [*alone, 0.0], rtol=1e-5)


def test_larger_alpha_favours_the_task_that_improves_least():
    matrix = np.array([[1.0, 0.0], [0.3, 3.0]], "float32")
    improvements = []
    for alpha in (0.5, 1.0, 5.0):
        direction, _ = aggregate(weighting.FairGrad(alpha=alpha), matrix)
        improvements.append(matrix @ direction)
    smallest = [min(values) / max(values) for values in improvements]
    assert smallest[0] < smallest[1] < smallest[2]


def test_invalid_arguments_are_refused():
    with pytest.raises(ValueError, match="alpha"):
        weighting.FairGrad(alpha=0.0)
    with pytest.raises(ValueError, match="iterations"):
        weighting.FairGrad(iterations=-1)
