"""Methods with state per shared parameter, against LibMTL's updates.

The references are NumPy transcriptions of the updates as LibMTL writes
them (`DB_MTL`, `MoCo`, `ExcessMTL`, `MoDo`, `SDMGrad`), run over several
steps. MoDo and SDMGrad sample three batches per step in LibMTL; ours pair
the current Jacobian with the previous step's, and the references do the
same.
"""

import keras
import numpy as np
import pytest

import keras_dwo
from keras_dwo import weighting

from conftest import TWO_TASK_LOSSES
from conftest import built
from conftest import compiled_aggregate
from conftest import to_numpy
from conftest import two_task_data
from conftest import two_task_model
from conftest import variable_values

STEPS = 4


def steps(num_tasks=3, columns=7, seed=0):
    """Random Jacobians and positive losses, one per step."""
    rng = np.random.default_rng(seed)
    return [
        (
            rng.normal(size=(num_tasks, columns)).astype("float32"),
            rng.uniform(0.2, 3.0, size=num_tasks).astype("float32"),
        )
        for _ in range(STEPS)
    ]


def db_mtl_reference(cases, beta=0.9, beta_sigma=0.5):
    buffer = np.zeros_like(cases[0][0], "float64")
    directions = []
    for step, (jacobian, losses) in enumerate(cases, start=1):
        grads = jacobian / (losses[:, None].astype("float64") + 1e-8)
        buffer = grads + beta / step**beta_sigma * (buffer - grads)
        norms = np.linalg.norm(buffer, axis=1)
        alpha = norms.max() / (norms + 1e-8)
        directions.append(alpha @ buffer)
    return directions, buffer


def moco_reference(cases, beta=0.5, beta_sigma=0.5, gamma=0.1, gamma_sigma=0.5):
    num_tasks = len(cases[0][0])
    tracked = np.zeros_like(cases[0][0], "float64")
    lambdas = np.ones(num_tasks) / num_tasks
    directions = []
    for step, (jacobian, losses) in enumerate(cases, start=1):
        norms = np.linalg.norm(jacobian, axis=1, keepdims=True)
        grads = jacobian / (norms + 1e-8) * losses[:, None]
        tracked = tracked - beta / step**beta_sigma * (tracked - grads)
        logits = lambdas - gamma / step**gamma_sigma * (tracked @ tracked.T) @ lambdas
        lambdas = np.exp(logits - logits.max())
        lambdas /= lambdas.sum()
        directions.append(tracked.T @ lambdas)
    return directions, tracked


def excess_mtl_reference(cases, step_size=0.01):
    num_tasks = len(cases[0][0])
    sums = np.zeros_like(cases[0][0], "float64")
    weights = np.ones(num_tasks)
    initial = None
    directions = []
    for jacobian, _ in cases:
        sums += jacobian.astype("float64") ** 2
        excess = np.sum(jacobian**2 / np.sqrt(sums + 1e-7), axis=1)
        if initial is None:
            initial = excess
        else:
            weights = weights * np.exp(excess / initial * step_size)
            weights = weights / weights.sum() * num_tasks
        directions.append(weights @ jacobian)
    return directions, sums


def simplex_projection(values):
    ordered = np.sort(values)[::-1]
    cumulative = np.cumsum(ordered)
    rho = np.nonzero(ordered * np.arange(1, len(values) + 1) > cumulative - 1)[0][-1]
    return np.maximum(values - (cumulative[rho] - 1) / (rho + 1), 0.0)


def double_sampling_reference(cases, step):
    """Directions and final state of a method that pairs each Jacobian with
    the previous step's; `step(previous, current, weights)` returns the new
    simplex weights and the direction."""
    num_tasks = len(cases[0][0])
    previous = np.zeros_like(cases[0][0], "float64")
    weights = np.ones(num_tasks) / num_tasks
    directions = []
    for jacobian, _ in cases:
        current = jacobian.astype("float64")
        weights, direction = step(previous, current, weights)
        directions.append(direction)
        previous = current
    return directions, previous


def modo_reference(cases, gamma=0.001, rho=0.1):
    def step(previous, current, lambdas):
        lambdas = simplex_projection(
            lambdas - gamma * (previous @ (current.T @ lambdas) + rho * lambdas)
        )
        return lambdas, current.T @ lambdas

    return double_sampling_reference(cases, step)


def sdmgrad_reference(cases, regularization=0.3, iterations=20):
    def step(previous, current, weights):
        cross = previous @ current.T
        scale = np.mean(np.sqrt(np.maximum(np.diag(cross), 0.0)))
        cross = cross / (scale**2 + 1e-8)
        mean_row = cross.mean(axis=1)
        velocity = np.zeros(len(weights))
        for _ in range(iterations):
            velocity = 0.5 * velocity + cross @ weights + regularization * mean_row
            weights = simplex_projection(weights - 5.0 * velocity)
        direction = weights @ current + regularization * current.mean(axis=0)
        return weights, direction / (1 + regularization)

    return double_sampling_reference(cases, step)


REFERENCES = {
    "db_mtl": (db_mtl_reference, "moving_gradients"),
    "moco": (moco_reference, "tracked_gradients"),
    "excess_mtl": (excess_mtl_reference, "squared_sums"),
    "modo": (modo_reference, "previous_jacobian"),
    "sdmgrad": (sdmgrad_reference, "previous_jacobian"),
}


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_the_steps_match_libmtls_updates(name):
    reference, state_name = REFERENCES[name]
    cases = steps()
    want_directions, want_state = reference(cases)
    method = built(weighting.get(name), 3, num_columns=7)
    for (jacobian, losses), want in zip(cases, want_directions):
        direction, _ = compiled_aggregate(method, jacobian, losses)
        np.testing.assert_allclose(direction, want, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(
        to_numpy(getattr(method, state_name)), want_state, rtol=1e-4, atol=1e-6
    )


def test_sdmgrad_stays_finite_when_every_task_gradient_turns_around():
    # Each step's Jacobian is the previous one negated: every diagonal entry
    # of the cross product is negative, so the normalisation divides by its
    # 1e-8 alone and the steps on the weights reach the millions, which the
    # simplex projection took to NaN within a step.
    jacobian, losses = steps()[0]
    cases = [(jacobian * (-1.0) ** step, losses) for step in range(STEPS)]
    want_directions, _ = sdmgrad_reference(cases)
    method = built(weighting.SDMGrad(), 3, num_columns=7)
    for (jacobian, losses), want in zip(cases, want_directions):
        direction, coefficients = compiled_aggregate(method, jacobian, losses)
        assert np.all(np.isfinite(coefficients))
        np.testing.assert_allclose(np.sum(coefficients), 1.0, rtol=1e-5)
        np.testing.assert_allclose(direction, want, rtol=1e-4, atol=1e-6)


def test_db_mtl_gives_each_task_the_largest_norm():
    # Orthogonal gradients on losses 1 and 4: the log takes g / L, then each
    # moving average is rescaled to the largest norm, here task 0's.
    jacobian = np.array([[3.0, 0.0], [0.0, 8.0]], "float32")
    losses = np.array([1.0, 4.0], "float32")
    method = built(weighting.DBMTL(), 2, num_columns=2)
    direction, weights = compiled_aggregate(method, jacobian, losses)
    # First moving averages: 0.1 * (3, 0) and 0.1 * (0, 2).
    np.testing.assert_allclose(direction, [0.3, 0.3], rtol=1e-5)
    np.testing.assert_allclose(weights, [1.0, 1.5], rtol=1e-5)


def test_moco_first_step_weights_by_hand():
    # Orthogonal unit gradients on losses 1 and 2: the tracked gradients are
    # half of (1, 0) and (0, 2); lambda = softmax(1/2 - 0.1 * diag(1/4, 1) / 2).
    jacobian = np.eye(2, dtype="float32")
    losses = np.array([1.0, 2.0], "float32")
    method = built(weighting.MoCo(), 2, num_columns=2)
    direction, weights = compiled_aggregate(method, jacobian, losses)
    logits = 0.5 - 0.1 * np.array([0.25, 1.0]) * 0.5
    want = np.exp(logits) / np.exp(logits).sum()
    np.testing.assert_allclose(weights, want, rtol=1e-5)
    np.testing.assert_allclose(direction, want * [0.5, 1.0], rtol=1e-5)


def test_excess_mtl_raises_the_weight_of_the_task_whose_excess_risk_grew():
    method = built(weighting.ExcessMTL(step_size=0.5), 2, num_columns=2)
    losses = np.ones(2, "float32")
    first = np.array([[1.0, 0.0], [0.0, 1.0]], "float32")
    _, weights = compiled_aggregate(method, first, losses)
    np.testing.assert_allclose(weights, [1.0, 1.0])
    # Task 1's gradient grows, task 0's shrinks: task 1's excess risk is the
    # larger relative to its first, so its weight rises; the sum stays 2.
    second = np.array([[0.1, 0.0], [0.0, 3.0]], "float32")
    _, weights = compiled_aggregate(method, second, losses)
    assert weights[1] > 1.0 > weights[0]
    np.testing.assert_allclose(weights.sum(), 2.0, rtol=1e-6)


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_fit_makes_the_state_for_the_shared_parameters(name):
    x, y = two_task_data(64)
    model = two_task_model(name)
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss=TWO_TASK_LOSSES)
    assert model.weighting.column_groups is None
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    shared = model.shared_variables()
    sizes = [int(np.prod(v.shape)) for v in shared]
    # The trunk's kernel and bias are one layer: one group of columns.
    assert model.weighting.column_groups == (sum(sizes),)
    state = to_numpy(getattr(model.weighting, REFERENCES[name][1]))
    assert state.shape == (2, sum(sizes))
    assert np.all(np.isfinite(state)) and np.any(state != 0.0)


def test_the_simplex_projection_matches_the_sort_algorithm():
    from keras_dwo.weighting.simplex import project_to_simplex

    rng = np.random.default_rng(0)
    for _ in range(50):
        values = (rng.normal(size=int(rng.integers(1, 9))) * 3).astype("float32")
        got = to_numpy(
            project_to_simplex(
                keras.ops.convert_to_tensor(values), keras.ops.ones(len(values))
            )
        )
        np.testing.assert_allclose(got, simplex_projection(values), atol=1e-6)
    # Values in the millions: the threshold keeps the simplex's 1.
    for _ in range(20):
        values = (rng.normal(size=int(rng.integers(2, 9))) * 1e7).astype("float32")
        got = to_numpy(
            project_to_simplex(
                keras.ops.convert_to_tensor(values), keras.ops.ones(len(values))
            )
        )
        want = simplex_projection(values.astype("float64"))
        np.testing.assert_allclose(got, want, atol=1e-6)
    # An absent task takes no part: the others are projected on their own.
    values = keras.ops.convert_to_tensor([0.3, 5.0, 0.2])
    got = to_numpy(project_to_simplex(values, keras.ops.convert_to_tensor([1, 0, 1.0])))
    np.testing.assert_allclose(got, [0.55, 0.0, 0.45], atol=1e-6)


def test_modo_and_sdmgrad_start_from_the_mean_gradient():
    # No previous Jacobian at the first step: the weights stay uniform.
    jacobian = np.array([[1.0, 0.0], [0.0, 3.0]], "float32")
    for method in (weighting.MoDo(), weighting.SDMGrad()):
        built(method, 2, num_columns=2)
        direction, _ = compiled_aggregate(method, jacobian, np.ones(2, "float32"))
        np.testing.assert_allclose(direction, [0.5, 1.5], rtol=1e-5)


def test_modo_moves_weight_away_from_the_task_with_the_larger_gradient():
    # Orthogonal gradients, the second three times longer: one MoDo step
    # lowers the norm of the combination by weighting the shorter one more.
    jacobian = np.array([[1.0, 0.0], [0.0, 3.0]], "float32")
    method = built(weighting.MoDo(gamma=0.01), 2, num_columns=2)
    compiled_aggregate(method, jacobian, np.ones(2, "float32"))
    _, weights = compiled_aggregate(method, jacobian, np.ones(2, "float32"))
    # lambda - gamma (diag(1, 9) lambda + rho lambda), projected.
    step = 0.5 - 0.01 * (np.array([1.0, 9.0]) * 0.5 + 0.1 * 0.5)
    np.testing.assert_allclose(weights, simplex_projection(step), rtol=1e-5)
    assert weights[0] > 0.5 > weights[1]


def test_new_shared_layers_are_refused():
    method = built(weighting.MoCo(), 2, num_columns=5)
    with pytest.raises(ValueError, match="made for other shared parameters"):
        method.build_columns([6])


def test_a_step_before_the_state_is_made_is_named():
    method = built(weighting.DBMTL(), 2)
    with pytest.raises(ValueError, match="build_columns"):
        method.aggregate(keras.ops.ones((2, 3)), keras.ops.ones((2,)))


def test_the_balancer_makes_the_state_for_its_variables():
    dense = keras.layers.Dense(2)
    dense.build((None, 3))
    x = keras.ops.ones((4, 3))
    balancer = keras_dwo.TaskBalancer("db_mtl", ["a", "b"])

    def losses():
        prediction = dense(x)
        return keras.ops.mean(prediction**2, axis=0) + 0.1

    before = variable_values(dense.trainable_variables)
    logs = balancer.apply(keras.optimizers.SGD(0.1), losses, dense.trainable_variables)
    assert bool(to_numpy(logs["applied"]))
    assert balancer.method.column_groups == (8,)
    for old, new in zip(before, variable_values(dense.trainable_variables)):
        assert not np.array_equal(old, new)


def test_invalid_arguments_are_refused():
    with pytest.raises(ValueError, match="beta"):
        weighting.DBMTL(beta=1.0)
    with pytest.raises(ValueError, match="gamma"):
        weighting.MoCo(gamma=0.0)
    with pytest.raises(ValueError, match="rho"):
        weighting.MoCo(rho=-1.0)
    with pytest.raises(ValueError, match="step_size"):
        weighting.ExcessMTL(step_size=0.0)
    with pytest.raises(ValueError, match="gamma"):
        weighting.MoDo(gamma=-1.0)
    with pytest.raises(ValueError, match="iterations"):
        weighting.SDMGrad(iterations=0)
    with pytest.raises(ValueError, match="momentum"):
        weighting.SDMGrad(momentum=1.0)
