"""Every weighting method survives bad inputs: no raise, no NaN where avoidable."""

import types

import keras
import numpy as np
import pytest

import keras_dwo
from keras_dwo import weighting
from keras_dwo.layers.uncertainty_weighting import MAX_ABS_LOG_VARIANCE
from keras_dwo.task_weights import validated_task_weights

from conftest import BACKEND
from conftest import built
from conftest import gradient_of
from conftest import to_numpy

T = 3
GRADIENT_METHODS = sorted(
    key
    for key, cls in weighting.IDENTIFIERS.items()
    if issubclass(cls, weighting.GradientWeighting)
)
# Their weights come from solving or decomposing the Gram matrix, which they
# sanitise; they flag a non-finite Gram matrix with a non-finite result.
GRAM_SOLVERS = {
    "aligned_mtl",
    "cagrad",
    "config",
    "dualproj",
    "imtl_g",
    "mgda",
    "mgda_ub",
    "nash_mtl",
    "upgrad",
}
POSITIVE_LOSS_METHODS = ["famo", "gls", "log", "scale_invariant", "stch"]


def tensor(values):
    return keras.ops.convert_to_tensor(np.asarray(values, "float32"))


def jacobian_with(row, column, value):
    jacobian = np.random.default_rng(0).normal(size=(T, 5)).astype("float32")
    jacobian[row, column] = value
    return jacobian


def aggregates(method):
    """`method.aggregate` in the ways the backend may run it in a step.

    TensorFlow's solvers raise eagerly and under `tf.function` without XLA
    (XLA's do not), PyTorch's eagerly; JAX runs the step under `jax.jit`.
    """
    if BACKEND == "tensorflow":
        import tensorflow as tf

        return [method.aggregate, tf.function(method.aggregate, jit_compile=False)]
    if BACKEND == "jax":
        import jax

        variables = method.non_trainable_variables

        @jax.jit
        def stateless(values, jacobian, losses):
            with keras.StatelessScope(state_mapping=list(zip(variables, values))):
                return method.aggregate(jacobian, losses)

        return [
            lambda jacobian, losses: stateless(
                [v.value for v in variables], jacobian, losses
            )
        ]
    return [method.aggregate]


def run_all(method, jacobians):
    """Yields `(direction, weights)` for each Jacobian and each way to run."""
    initial = [to_numpy(v).copy() for v in method.variables]
    for run in aggregates(method):
        for jacobian in jacobians:
            # Every case starts from the same state.
            for variable, value in zip(method.variables, initial):
                variable.assign(value)
            direction, weights = run(tensor(jacobian), tensor([1.0, 2.0, 3.0]))
            yield to_numpy(direction), to_numpy(weights)


@pytest.mark.parametrize("identifier", GRADIENT_METHODS)
def test_bad_jacobians_neither_raise_nor_give_nan_where_avoidable(identifier):
    method = built(weighting.get(identifier), T, num_columns=5)
    zero_row = jacobian_with(1, 2, 0.0)
    zero_row[1] = 0.0
    # Finite, but its squared norm overflows float32.
    overflowing = jacobian_with(1, 2, 1e30)
    jacobians = [
        np.zeros((T, 5), "float32"),
        zero_row,
        overflowing,
        jacobian_with(1, 2, np.nan),
        jacobian_with(1, 2, np.inf),
        jacobian_with(slice(None), 0, -np.inf),
        np.full((T, 5), np.nan, "float32"),
    ]
    results = list(run_all(method, jacobians))
    for start in range(0, len(results), len(jacobians)):
        zero, with_zero_row, huge, *non_finite = results[start : start + len(jacobians)]
        for direction, weights in (zero, with_zero_row):
            assert np.all(np.isfinite(weights)) and np.all(np.isfinite(direction))
        np.testing.assert_array_equal(zero[0], 0.0)
        # The guard drops a step whose direction is not finite.
        for direction, _ in non_finite:
            assert not np.all(np.isfinite(direction))
        # The methods that solve on the Gram matrix must flag one that
        # overflowed, whose solution they could not trust.
        if identifier in GRAM_SOLVERS:
            assert not np.all(np.isfinite(huge[0]))


@pytest.mark.parametrize("identifier", POSITIVE_LOSS_METHODS)
@pytest.mark.parametrize("bad_loss", [0.0, -0.4])
def test_a_task_without_a_positive_loss_is_left_out(identifier, bad_loss):
    # Task 1's loss is 0 (a task weight of 0 gives that) or negative (a
    # cosine similarity): it must count exactly as a task without labels.
    # A fresh method for each call: STCH counts its steps in `call`.
    def method():
        return built(weighting.get(identifier), T)

    losses = np.array([0.7, bad_loss, 1.9], "float32")
    objective, weights = method().call(tensor(losses), training=True)
    absent_objective, absent_weights = method().call(
        tensor(losses), training=True, present=tensor([1.0, 0.0, 1.0])
    )
    assert np.isfinite(to_numpy(objective))
    assert to_numpy(objective) == to_numpy(absent_objective)
    np.testing.assert_array_equal(to_numpy(weights), to_numpy(absent_weights))
    assert to_numpy(weights)[1] == 0.0 and np.all(np.isfinite(to_numpy(weights)))
    fresh = method()
    gradient = gradient_of(lambda x: fresh.call(x, training=True)[0], losses)
    assert np.all(np.isfinite(gradient)) and gradient[1] == 0.0
    assert gradient[0] > 0 and gradient[2] > 0


@pytest.mark.parametrize("identifier", POSITIVE_LOSS_METHODS)
def test_no_positive_loss_at_all_gives_a_finite_objective(identifier):
    method = built(weighting.get(identifier), T)
    objective, weights = method.call(tensor([0.0, -1.0, 0.0]), training=True)
    assert np.isfinite(to_numpy(objective))
    np.testing.assert_array_equal(to_numpy(weights), 0.0)


@pytest.mark.parametrize("bad_loss", [0.0, -0.4])
def test_famo_update_leaves_a_task_without_a_positive_loss_alone(bad_loss):
    method = built(weighting.FAMO(), T)
    for _ in range(3):
        method.update(tensor([1.0, 2.0, 3.0]), tensor([0.9, 1.5, 2.9]))
    before = [to_numpy(v).copy() for v in method.non_trainable_variables]
    method.update(tensor([1.0, bad_loss, 3.0]), tensor([0.9, 1.5, 2.9]))
    method.update(tensor([1.0, 2.0, 3.0]), tensor([0.9, bad_loss, 2.9]))
    for variable, old in zip(method.non_trainable_variables, before):
        value = to_numpy(variable)
        assert np.all(np.isfinite(value))
        assert value[1] == old[1]
        assert not np.array_equal(value, old)


def gradient_wrt(variable, function):
    """The gradient of `function()` with respect to a Keras variable."""
    return gradient_of(
        lambda value: _with_value(variable, value, function), to_numpy(variable)
    )


def _with_value(variable, value, function):
    with keras.StatelessScope(state_mapping=[(variable, value)]):
        return function()


@pytest.mark.parametrize("identifier", ["uncertainty", "imtl_l"])
def test_learned_log_scales_stay_bounded_at_zero_loss(identifier):
    method = built(weighting.get(identifier), T)
    variable = method.trainable_variables[0]
    losses = tensor([0.0, 0.5, 0.0])
    optimizer = keras.optimizers.SGD(learning_rate=1.0)
    # A zero loss moves its log-scale by 1 per step, up to the bound.
    for _ in range(25):
        gradient = gradient_wrt(variable, lambda: method.call(losses, training=True)[0])
        optimizer.apply([tensor(gradient)], [variable])
    values = to_numpy(variable)
    np.testing.assert_array_equal(np.abs(values[[0, 2]]), MAX_ABS_LOG_VARIANCE)
    objective, weights = (to_numpy(v) for v in method.call(losses, training=True))
    assert np.isfinite(objective) and np.all(np.isfinite(weights))
    # Far beyond where exp overflows, the values stay finite.
    variable.assign([-1e30, 1e30, 0.0])
    for loss in (0.0, 1.0):
        values = method.call(tensor([loss, loss, loss]), training=True)
        assert all(np.all(np.isfinite(to_numpy(v))) for v in values)


def stateful_methods():
    """The methods with per-task state of their own (not trained by the model)."""
    found = []
    for identifier in sorted(weighting.IDENTIFIERS):
        method = built(weighting.get(identifier), T, num_columns=5)
        if any(v.shape[:1] == (T,) for v in method.non_trainable_variables):
            found.append(identifier)
    keras.backend.clear_session()
    return found


STATEFUL_METHODS = stateful_methods()


def test_the_stateful_methods_are_all_checked():
    assert {"famo", "gradnorm", "gradvac", "nash_mtl"} <= set(STATEFUL_METHODS)


@pytest.mark.parametrize("identifier", STATEFUL_METHODS)
def test_an_absent_task_keeps_its_state_bit_for_bit(identifier):
    method = weighting.get(identifier)
    if identifier == "stch":
        # STCH measures its nadir point in its first steps only.
        method = weighting.STCH(nadir_steps=10)
    method = built(method, T, num_columns=5)
    rng = np.random.default_rng(0)

    def step(present):
        jacobian = rng.normal(size=(T, 5)).astype("float32") * present[:, None]
        losses = rng.uniform(0.5, 2.0, size=T).astype("float32") * present
        if method.needs_task_gradients:
            method.aggregate(tensor(jacobian), tensor(losses), present=tensor(present))
        else:
            method.call(tensor(losses), training=True, present=tensor(present))
            after = losses * rng.uniform(0.8, 1.0, size=T).astype("float32")
            method.update(tensor(losses), tensor(after), present=tensor(present))

    for _ in range(2):
        step(np.ones(T, "float32"))
    before = [to_numpy(v).copy() for v in method.non_trainable_variables]
    step(np.array([1.0, 0.0, 1.0], "float32"))
    changed = False
    for variable, old in zip(method.non_trainable_variables, before):
        value = to_numpy(variable)
        if value.shape[:1] != (T,):
            continue
        # Bit for bit: the same bytes, not merely equal values.
        assert value[1].tobytes() == old[1].tobytes(), variable.path
        if value.shape == (T, T):
            assert value[:, 1].tobytes() == old[:, 1].tobytes(), variable.path
        changed = changed or not np.array_equal(value, old)
    assert changed, "the tasks present must still update the state"


def test_gradnorm_takes_the_first_positive_loss_as_the_initial_loss():
    method = built(weighting.GradNorm(), T)
    jacobian = tensor(np.random.default_rng(0).normal(size=(T, 5)))
    method.aggregate(jacobian, tensor([1.0, 0.0, 2.0]))
    np.testing.assert_array_equal(to_numpy(method.initial_losses_recorded), [1, 0, 1])
    method.aggregate(jacobian, tensor([0.9, 0.3, 1.9]))
    np.testing.assert_array_equal(
        to_numpy(method.initial_losses), np.float32([1.0, 0.3, 2.0])
    )
    assert np.all(np.isfinite(to_numpy(method.loss_weights)))


def test_validated_task_weights_returns_floats_and_accepts_zero():
    weights = validated_task_weights(np.array([0.0, 2.5], "float32"), ("a", "b"))
    assert weights == [0.0, 2.5] and all(type(w) is float for w in weights)


@pytest.mark.parametrize(
    "weights, message",
    [
        ([1.0, -0.5, 1.0], r"invalid weight\(s\): mass=-0.5\."),
        ([np.nan, 1.0, np.inf], r"invalid weight\(s\): species=nan, depth=inf\."),
        ([1.0, "heavy", 1.0], r"mass='heavy'"),
        ([1.0, 1.0], r"Got 2 task weight\(s\) for 3 task\(s\)"),
    ],
)
def test_validated_task_weights_names_the_offending_tasks(weights, message):
    with pytest.raises(ValueError, match=message):
        validated_task_weights(weights, ("species", "mass", "depth"))


@pytest.mark.parametrize("bad", [-1.0, np.nan])
def test_loss_weight_scheduler_names_the_task_of_an_invalid_weight(bad):
    model = types.SimpleNamespace(
        task_names=("species", "mass"), task_weights=keras.Variable([1.0, 1.0])
    )
    callback = keras_dwo.callbacks.LossWeightScheduler(lambda epoch, w: {"mass": bad})
    callback.set_model(model)
    with pytest.raises(ValueError, match=rf"epoch 3: .*mass={bad}"):
        callback.on_epoch_begin(3)
    np.testing.assert_array_equal(to_numpy(model.task_weights), [1.0, 1.0])
