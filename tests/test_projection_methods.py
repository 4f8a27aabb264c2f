"""Gradient-level methods on plain Jacobians: GradNorm, PCGrad, GradVac, GradDrop."""

import itertools

import keras
import numpy as np
import pytest

from keras_dwo.weighting.graddrop import GradDrop
from keras_dwo.weighting.gradnorm import GradNorm
from keras_dwo.weighting.gradvac import GradVac
from keras_dwo.weighting.pcgrad import PCGrad

from conftest import aggregate
from conftest import assert_seeded_uniform_draws
from conftest import built
from conftest import compiled_aggregate
from conftest import to_numpy


def variable_value(variable):
    return to_numpy(variable.value)


def cosine(a, b):
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def random_jacobian(num_tasks, size, seed=0):
    return np.random.default_rng(seed).normal(size=(num_tasks, size)).astype("float32")


def reference_pcgrad(jacobian, orders):
    """PCGrad with vectors, for given orders of the other tasks."""
    projected = jacobian.astype("float64")
    for i, order in enumerate(orders):
        for j in order:
            inner = projected[i] @ jacobian[j]
            if inner < 0:
                projected[i] -= inner / (jacobian[j] @ jacobian[j]) * jacobian[j]
    return projected.sum(axis=0)


# PCGrad


def test_pcgrad_two_conflicting_tasks_by_hand():
    direction, weights = aggregate(PCGrad(seed=0), [[1.0, 0.0], [-1.0, 1.0]])
    # g1' = g1 + g2 / 2 = [0.5, 0.5] and g2' = g2 + g1 = [0, 1].
    np.testing.assert_allclose(direction, [0.5, 1.5], atol=1e-6)
    np.testing.assert_allclose(weights, [2.0, 1.5], atol=1e-6)


@pytest.mark.parametrize("method_class", [PCGrad, GradVac])
def test_two_tasks_draw_no_order(method_class):
    # Each task has one other task to visit: the generator stays where it was.
    method = built(method_class(seed=0), 2)
    seed_state = variable_value(method.seed_generator.state).copy()
    orders = to_numpy(method.other_tasks_in_random_order(training=True))
    np.testing.assert_array_equal(orders, [[[0.0, 1.0]], [[1.0, 0.0]]])
    aggregate(method, random_jacobian(2, 6), training=True)
    np.testing.assert_array_equal(
        variable_value(method.seed_generator.state), seed_state
    )


def test_pcgrad_projected_gradients_do_not_conflict():
    g1, g2 = np.array([[2.0, 1.0, -1.0], [-1.0, 0.5, 2.0]], "float32")
    inner = g1 @ g2
    assert inner < 0
    direction, weights = aggregate(PCGrad(seed=0), [g1, g2])
    np.testing.assert_allclose(
        weights, [1 - inner / (g1 @ g1), 1 - inner / (g2 @ g2)], rtol=1e-5
    )
    # With two tasks, g2's coefficient in g1' is weights[1] - 1, and g1's in g2'
    # is weights[0] - 1.
    projected_1 = g1 + (weights[1] - 1) * g2
    projected_2 = g2 + (weights[0] - 1) * g1
    assert projected_1 @ g2 == pytest.approx(0.0, abs=1e-5)
    assert projected_2 @ g1 == pytest.approx(0.0, abs=1e-5)
    np.testing.assert_allclose(direction, projected_1 + projected_2, atol=1e-5)


def test_pcgrad_leaves_non_conflicting_gradients_unchanged():
    jacobian = np.array([[1.0, 0.0, 2.0], [0.5, 1.0, 0.0], [0.0, 3.0, 1.0]])
    direction, weights = aggregate(PCGrad(seed=0), jacobian)
    np.testing.assert_allclose(direction, jacobian.sum(axis=0), rtol=1e-6)
    np.testing.assert_allclose(weights, [1.0, 1.0, 1.0])


def test_pcgrad_matches_the_vector_algorithm_for_one_of_the_orders():
    jacobian = random_jacobian(3, 7)
    others = [[j for j in range(3) if j != i] for i in range(3)]
    candidates = [
        reference_pcgrad(jacobian, orders)
        for orders in itertools.product(*map(itertools.permutations, others))
    ]
    method = built(PCGrad(seed=1), 3)
    for _ in range(4):
        direction, weights = aggregate(method, jacobian)
        errors = [np.abs(direction - candidate).max() for candidate in candidates]
        assert min(errors) < 1e-5
        np.testing.assert_allclose(weights @ jacobian, direction, atol=1e-5)


def test_pcgrad_direction_is_the_weighted_sum_of_the_rows():
    jacobian = random_jacobian(5, 11, seed=3)
    direction, weights = aggregate(PCGrad(seed=2), jacobian)
    np.testing.assert_allclose(weights @ jacobian, direction, atol=1e-5)


# GradVac


def test_gradvac_leaves_gradients_above_their_targets_unchanged():
    jacobian = np.array([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    method = GradVac(beta=0.25, seed=0)
    direction, weights = aggregate(method, jacobian)
    np.testing.assert_allclose(direction, jacobian.sum(axis=0), rtol=1e-6)
    np.testing.assert_allclose(weights, [1.0, 1.0, 1.0])
    # Every pair has cosine 0.5; the targets move from 0 by beta * 0.5.
    expected = 0.125 * (1 - np.eye(3))
    np.testing.assert_allclose(
        variable_value(method.target_cosines), expected, atol=1e-6
    )


def test_gradvac_raises_a_conflicting_cosine_to_its_target():
    g1, g2 = np.array([[1.0, 0.0], [-1.0, np.sqrt(3.0)]], "float32")
    assert cosine(g1, g2) == pytest.approx(-0.5)
    method = built(GradVac(beta=0.5, seed=0), 2)
    # Task 0 aims at cosine 0.5 with task 1; task 1 accepts any cosine.
    method.target_cosines.assign([[0.0, 0.5], [-1.0, 0.0]])
    direction, weights = aggregate(method, [g1, g2])
    assert weights[0] == pytest.approx(1.0)
    corrected_1 = g1 + (weights[1] - 1) * g2
    assert cosine(corrected_1, g2) == pytest.approx(0.5, abs=1e-5)
    np.testing.assert_allclose(direction, corrected_1 + g2, atol=1e-5)
    # The targets move by beta towards the cosines seen before the correction.
    np.testing.assert_allclose(
        variable_value(method.target_cosines), [[0.0, 0.0], [-0.75, 0.0]], atol=1e-6
    )


def test_gradvac_outside_training_keeps_its_targets_and_seed():
    method = built(GradVac(seed=0), 3)
    method.target_cosines.assign(np.full((3, 3), 0.3, "float32"))
    seed_state = variable_value(method.seed_generator.state).copy()
    jacobian = random_jacobian(3, 6)
    evaluated = aggregate(method, jacobian, training=False)
    np.testing.assert_allclose(variable_value(method.target_cosines), 0.3)
    np.testing.assert_array_equal(
        variable_value(method.seed_generator.state), seed_state
    )
    # The same draws are then those of the next training step.
    trained = aggregate(method, jacobian, training=True)
    np.testing.assert_allclose(evaluated[0], trained[0], rtol=1e-6)
    np.testing.assert_allclose(evaluated[1] @ jacobian, evaluated[0], atol=1e-5)


# GradDrop


def test_graddrop_keeps_gradients_that_agree_in_sign():
    # Coordinates differ in sign, but the tasks agree on each one.
    jacobian = np.array([[1.0, -2.0, 0.0, 3.0], [0.5, -1.0, 2.0, 0.0]])
    direction, weights = aggregate(GradDrop(seed=0), jacobian)
    np.testing.assert_allclose(direction, jacobian.sum(axis=0))
    np.testing.assert_allclose(weights, [1.0, 1.0])


def test_graddrop_keeps_one_sign_per_coordinate():
    jacobian = random_jacobian(3, 400, seed=4)
    direction, weights = aggregate(GradDrop(seed=0), jacobian)
    positive = np.where(jacobian > 0, jacobian, 0).sum(axis=0)
    negative = np.where(jacobian < 0, jacobian, 0).sum(axis=0)
    kept_positive = np.isclose(direction, positive, atol=1e-6)
    kept_negative = np.isclose(direction, negative, atol=1e-6)
    assert np.all(kept_positive | kept_negative)
    assert kept_positive.any() and kept_negative.any()
    kept = np.where(kept_positive, np.maximum(jacobian, 0), np.minimum(jacobian, 0))
    expected = np.abs(kept).sum(axis=1) / np.abs(jacobian).sum(axis=1)
    np.testing.assert_allclose(weights, expected, rtol=1e-5)


def test_graddrop_picks_a_sign_with_the_probability_of_its_mass():
    # Positive mass 3 of 4 on every coordinate: P = 0.75.
    jacobian = np.stack([np.full(20000, 3.0), np.full(20000, -1.0)])
    direction, weights = aggregate(GradDrop(seed=0), jacobian)
    assert set(np.unique(direction)) == {-1.0, 3.0}
    assert np.mean(direction == 3.0) == pytest.approx(0.75, abs=0.02)
    np.testing.assert_allclose(weights, [0.75, 0.25], atol=0.02)


def test_graddrop_leak_keeps_a_fraction_of_the_dropped_gradients():
    jacobian = [[2.0], [-1.0]]
    direction, weights = aggregate(GradDrop(leak=1.0, seed=0), jacobian)
    np.testing.assert_allclose(direction, [1.0])
    np.testing.assert_allclose(weights, [1.0, 1.0])
    method = built(GradDrop(leak=0.5, seed=0), 2)
    outcomes = set()
    for _ in range(20):
        direction, weights = aggregate(method, jacobian)
        outcomes.add(tuple(np.round([direction[0], *weights], 5)))
    # Positive side kept: 2 - 1 / 2; negative side kept: -1 + 2 / 2.
    assert outcomes == {(1.5, 1.0, 0.5), (0.0, 0.5, 1.0)}


# GradNorm


def test_gradnorm_first_update_by_hand():
    # Gradient norms 1 and 3, equal training rates at the first step: the
    # target norm is 2 for both, so Adam's first step (lr times the sign of the
    # gradient) raises the first weight and lowers the second.
    method = GradNorm(learning_rate=0.025)
    direction, weights = aggregate(method, [[1.0, 0.0], [0.0, 3.0]], [2.0, 5.0])
    np.testing.assert_allclose(weights, [1.0, 1.0])
    np.testing.assert_allclose(direction, [1.0, 3.0])
    np.testing.assert_allclose(
        variable_value(method.loss_weights), [1.025, 0.975], rtol=1e-5
    )
    np.testing.assert_allclose(variable_value(method.initial_losses), [2.0, 5.0])


def test_gradnorm_direction_uses_the_weights_before_the_update():
    method = built(GradNorm(), 2)
    method.loss_weights.assign([1.5, 0.5])
    jacobian = np.array([[1.0, 2.0], [3.0, -1.0]], "float32")
    direction, weights = aggregate(method, jacobian, [1.0, 1.0])
    np.testing.assert_allclose(weights, [1.5, 0.5])
    np.testing.assert_allclose(direction, [1.5, 0.5] @ jacobian, rtol=1e-6)
    assert not np.allclose(variable_value(method.loss_weights), [1.5, 0.5])


def test_gradnorm_favours_the_task_that_learns_slower():
    method = built(GradNorm(), 3)
    jacobian = np.eye(3, 5, dtype="float32")
    initial = np.array([4.0, 1.0, 2.0], "float32")
    for step in range(30):
        losses = initial * np.array([0.9, 0.97, 0.9]) ** step
        _, weights = aggregate(method, jacobian, losses)
        assert np.all(weights > 0)
        assert weights.sum() == pytest.approx(3.0, rel=1e-5)
    np.testing.assert_allclose(variable_value(method.initial_losses), initial)
    weights = variable_value(method.loss_weights)
    assert weights[1] > 1.0 > weights[0]
    assert weights[0] == pytest.approx(weights[2], rel=1e-5)


def test_gradnorm_weights_stay_positive_under_pressure():
    method = built(GradNorm(learning_rate=0.5), 2)
    # Task 1 has a huge gradient and learns fast: its weight is driven down.
    jacobian = np.array([[1.0, 0.0], [0.0, 100.0]], "float32")
    for step in range(50):
        aggregate(method, jacobian, [1.0, 0.5**step])
        weights = variable_value(method.loss_weights)
        assert np.all(weights > 0)
        assert weights.sum() == pytest.approx(2.0, rel=1e-5)
    assert weights[1] < 0.01


def test_gradnorm_evaluation_uses_the_learned_weights():
    method = built(GradNorm(), 2)
    method.loss_weights.assign([0.5, 1.5])
    losses = keras.ops.convert_to_tensor(np.array([2.0, 4.0], "float32"))
    objective, weights = method(losses, training=False)
    assert float(to_numpy(objective)) == pytest.approx(7.0)
    np.testing.assert_allclose(to_numpy(weights), [0.5, 1.5])
    direction, weights = aggregate(method, [[1.0], [1.0]], training=False)
    np.testing.assert_allclose(weights, [0.5, 1.5])
    np.testing.assert_allclose(variable_value(method.loss_weights), [0.5, 1.5])
    np.testing.assert_array_equal(variable_value(method.initial_losses_recorded), 0.0)


# All methods


METHODS = {
    "gradnorm": lambda: GradNorm(),
    "pcgrad": lambda: PCGrad(seed=0),
    "gradvac": lambda: GradVac(seed=0),
    "graddrop": lambda: GradDrop(seed=0),
}

DEGENERATE = {
    "zero_row": [[1.0, 2.0, -1.0], [0.0, 0.0, 0.0], [-1.0, 0.5, 1.0]],
    "parallel_rows": [[1.0, 2.0, -1.0], [2.0, 4.0, -2.0], [1.0, 2.0, -1.0]],
    "opposite_rows": [[1.0, 2.0, -1.0], [-1.0, -2.0, 1.0]],
    "single_task": [[1.0, -2.0, 3.0]],
    "all_zero": [[0.0, 0.0], [0.0, 0.0]],
}


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("case", sorted(DEGENERATE))
def test_degenerate_jacobians_stay_finite(name, case):
    jacobian = np.asarray(DEGENERATE[case], "float32")
    method = built(METHODS[name](), len(jacobian))
    for losses in [np.ones(len(jacobian)), np.zeros(len(jacobian))] * 20:
        direction, weights = aggregate(method, jacobian, losses)
        assert np.all(np.isfinite(direction)) and np.all(np.isfinite(weights))
    for variable in method.non_trainable_variables:
        assert np.all(np.isfinite(variable_value(variable)))
    if case == "single_task" and name != "graddrop":
        np.testing.assert_allclose(direction, weights[0] * jacobian[0], rtol=1e-6)


@pytest.mark.parametrize("method_class", [PCGrad, GradVac, GradDrop])
def test_seeded_draws_repeat_and_resume_after_loading(method_class):
    jacobian = random_jacobian(4, 50, seed=5)

    def run(method, steps):
        return [aggregate(method, jacobian) for _ in range(steps)]

    first = built(method_class(seed=7), 4)
    run(first, 3)
    store = {}
    first.save_own_variables(store)
    store = {key: variable_value(value).copy() for key, value in store.items()}
    continued = run(first, 3)

    repeated = built(method_class(seed=7), 4)
    run(repeated, 3)
    resumed = built(method_class(seed=123), 4)
    resumed.load_own_variables(store)
    for other in (run(repeated, 3), run(resumed, 3)):
        for (direction, weights), (other_direction, other_weights) in zip(
            continued, other
        ):
            np.testing.assert_array_equal(direction, other_direction)
            np.testing.assert_array_equal(weights, other_weights)


def test_graddrop_seeds_give_different_draws():
    jacobian = random_jacobian(2, 200, seed=6)
    first = aggregate(GradDrop(seed=1), jacobian)[0]
    second = aggregate(GradDrop(seed=2), jacobian)[0]
    assert not np.array_equal(first, second)


@pytest.mark.parametrize(
    "method",
    [
        GradNorm(alpha=0.5, learning_rate=0.01, wrt="representation"),
        PCGrad(seed=3),
        GradVac(beta=0.1, seed=4),
        GradDrop(leak=0.2, seed=5, wrt="representation"),
    ],
    ids=lambda method: type(method).__name__,
)
def test_get_config_round_trip(method):
    config = method.get_config()
    restored = type(method).from_config(config)
    assert restored.get_config() == config
    serialized = keras.saving.serialize_keras_object(method)
    assert type(keras.saving.deserialize_keras_object(serialized)) is type(method)


def test_flags_and_argument_checks():
    assert GradNorm.weights_heads and GradNorm.allows_representation
    assert GradDrop.allows_representation and not GradDrop.weights_heads
    for method_class in (PCGrad, GradVac):
        with pytest.raises(ValueError, match="wrt='representation'"):
            method_class(wrt="representation")
    with pytest.raises(ValueError, match="beta"):
        GradVac(beta=1.5)
    with pytest.raises(ValueError, match="leak"):
        GradDrop(leak=-0.1)


# Random draws


def test_draws_are_uniform_and_follow_the_seed():
    method, same_seed = (built(PCGrad(seed=3), 3) for _ in range(2))
    assert_seeded_uniform_draws(
        lambda: method.uniform((64, 64), training=True),
        lambda: same_seed.uniform((64, 64), training=True),
        method.seed_generator,
    )


# Compiled


# Two tasks: the order of the other tasks is not random, so compiled and eager
# runs agree whatever the draws.
COMPILED_JACOBIAN = [[1.0, 0.5, -2.0, 0.0], [-1.0, 1.0, 1.0, 0.5]]


@pytest.mark.parametrize("method_class", [GradNorm, PCGrad, GradVac])
def test_compiled_aggregate_matches_eager(method_class):
    kwargs = {} if method_class is GradNorm else {"seed": 0}
    compiled = built(method_class(**kwargs), 2)
    eager = built(method_class(**kwargs), 2)
    for step in range(3):
        losses = [1.0, 0.8**step]
        result = compiled_aggregate(compiled, COMPILED_JACOBIAN, losses)
        expected = aggregate(eager, COMPILED_JACOBIAN, losses)
        np.testing.assert_allclose(result[0], expected[0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(result[1], expected[1], rtol=1e-5, atol=1e-6)
    for variable, other in zip(compiled.weights, eager.weights):
        np.testing.assert_allclose(
            variable_value(variable), variable_value(other), atol=1e-6
        )
    if method_class is not GradNorm:
        states = [variable_value(m.seed_generator.state) for m in (compiled, eager)]
        np.testing.assert_array_equal(*states)


def test_compiled_graddrop_keeps_one_sign_per_coordinate():
    method = built(GradDrop(seed=0), 3)
    jacobian = random_jacobian(3, 64, seed=8)
    seed_state = variable_value(method.seed_generator.state).copy()
    direction, weights = compiled_aggregate(method, jacobian, np.ones(3))
    positive = np.where(jacobian > 0, jacobian, 0).sum(axis=0)
    negative = np.where(jacobian < 0, jacobian, 0).sum(axis=0)
    assert np.all(
        np.isclose(direction, positive, atol=1e-6)
        | np.isclose(direction, negative, atol=1e-6)
    )
    assert np.all((weights >= 0) & (weights <= 1))
    assert not np.array_equal(variable_value(method.seed_generator.state), seed_state)
