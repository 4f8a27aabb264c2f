"""Properties every gradient-level rule must have, on generated Jacobians."""

import numpy as np
import pytest
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from keras_dwo import weighting

from conftest import aggregate

RULES = sorted(
    name
    for name in weighting.IDENTIFIERS
    if weighting.get(name).needs_task_gradients
    and weighting.get(name).wrt == "parameters"
)
# Rules that draw random orders or masks are equivariant only in distribution.
RANDOM_RULES = {"pcgrad", "gradvac", "graddrop"}
DETERMINISTIC_RULES = [name for name in RULES if name not in RANDOM_RULES]

SETTINGS = settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


@st.composite
def jacobians(draw, min_tasks=1, max_tasks=4):
    """Random Jacobians, with zero, parallel and repeated rows mixed in."""
    num_tasks = draw(st.integers(min_tasks, max_tasks))
    size = draw(st.integers(1, 6))
    values = st.floats(-10, 10, allow_nan=False, width=32)
    jacobian = draw(hnp.arrays("float32", (num_tasks, size), elements=values))
    for row in range(1, num_tasks):
        kind = draw(st.sampled_from(["free", "zero", "parallel", "opposite"]))
        scale = draw(st.floats(0.1, 3.0))
        if kind == "zero":
            jacobian[row] = 0.0
        elif kind == "parallel":
            jacobian[row] = scale * jacobian[0]
        elif kind == "opposite":
            jacobian[row] = -scale * jacobian[0]
    losses = draw(hnp.arrays("float32", (num_tasks,), elements=st.floats(0.01, 5)))
    return jacobian, losses


@pytest.mark.parametrize("name", RULES)
@SETTINGS
@given(case=jacobians())
def test_directions_and_weights_are_finite(name, case):
    jacobian, losses = case
    direction, weights = aggregate(weighting.get(name), jacobian, losses)
    assert direction.shape == (jacobian.shape[1],)
    assert weights.shape == (jacobian.shape[0],)
    assert np.all(np.isfinite(direction)) and np.all(np.isfinite(weights))


@pytest.mark.parametrize("name", RULES)
def test_an_all_zero_jacobian_gives_a_zero_direction(name):
    direction, weights = aggregate(weighting.get(name), np.zeros((3, 5)), np.ones(3))
    np.testing.assert_array_equal(direction, np.zeros(5))
    assert np.all(np.isfinite(weights))


@pytest.mark.parametrize("name", DETERMINISTIC_RULES)
@SETTINGS
@given(
    case=jacobians(min_tasks=2),
    permutation_seed=st.integers(0, 2**16),
)
def test_permuting_tasks_permutes_weights(name, case, permutation_seed):
    jacobian, losses = case
    permutation = np.random.default_rng(permutation_seed).permutation(len(jacobian))
    direction, weights = aggregate(weighting.get(name), jacobian, losses)
    permuted_direction, permuted_weights = aggregate(
        weighting.get(name), jacobian[permutation], losses[permutation]
    )
    # Where large weighted rows cancel, the direction is known only to the
    # float32 precision of the terms that cancel.
    terms = np.abs(weights)[:, None] * np.abs(jacobian)
    scale = max(1.0, float(terms.sum(axis=0).max()))
    np.testing.assert_allclose(
        permuted_direction, direction, rtol=2e-3, atol=2e-3 * scale
    )
    # Coefficients of identical rows are not unique; the direction is.
    unique_rows = len(np.unique(jacobian, axis=0)) == len(jacobian)
    if unique_rows and np.linalg.matrix_rank(jacobian) == len(jacobian):
        np.testing.assert_allclose(
            permuted_weights, weights[permutation], rtol=2e-3, atol=2e-3
        )
