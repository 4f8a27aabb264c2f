"""Any number of tasks: exact solvers, and the papers' guarantees as properties.

The quadratic programs of MGDA and UPGrad are compared with quadprog (the
float64 solver TorchJD uses) on the same regularised Gram matrix, CAGrad's
dual with SciPy's SLSQP, on random, rank-deficient, duplicated-row, zero-row
and badly scaled Jacobians. The full grid of sizes runs on torch, the fastest
backend here; TensorFlow and JAX run every kind at 20 tasks (the active-set
method; tests/test_min_norm_methods.py covers the face enumeration there), the
same `keras.ops` code, whose eager loops they trace at every call.
"""

import functools

import keras
import numpy as np
import pytest
import quadprog
from scipy.optimize import minimize

from keras_dwo import weighting
from keras_dwo.weighting import min_norm
from keras_dwo.weighting import upgrad
from keras_dwo.weighting.cagrad import bracketed_worst_case_weights
from keras_dwo.weighting.cagrad import dual_objective
from keras_dwo.weighting.cagrad import worst_case_weights
from keras_dwo.weighting.fairgrad import RIDGE as FAIRGRAD_RIDGE

from conftest import BACKEND
from conftest import aggregate
from conftest import compiled_aggregate
from conftest import to_numpy

KINDS = ("random", "rank_one", "rank_deficient", "duplicated", "zero_rows", "scaled")
ALL_SIZES = (2, 5, 12, 20, 40, 64)
SIZES = ALL_SIZES if BACKEND == "torch" else (20,)
# Every method on every kind on torch; one kind each elsewhere keeps the test
# run short (eager solvers trace their loops at every call there).
FINITE_KINDS = KINDS if BACKEND == "torch" else ("scaled",)
PERMUTED_KINDS = (
    ("random", "rank_deficient", "scaled")
    if BACKEND == "torch"
    else ("rank_deficient",)
)
MODEL_METHODS = ["mgda", "upgrad"] if BACKEND == "torch" else ["upgrad"]
GRADIENT_METHODS = sorted(
    name for name in weighting.IDENTIFIERS if weighting.get(name).needs_task_gradients
)
# Rules that draw random orders or masks are equivariant only in distribution.
RANDOM_METHODS = {"pcgrad", "gradvac", "graddrop"}


def compiled(function):
    """The function, compiled once per input shape on JAX.

    An eager JAX `while_loop` is traced and compiled anew at every call (the
    model's step compiles it once); the tests call the solvers many times.
    """
    if BACKEND != "jax":
        return function
    import jax

    return jax.jit(function)


@functools.cache
def rule(name):
    """`aggregate` of the named method on a Jacobian, `(direction, weights)`."""

    def direction_and_weights(jacobian):
        method = weighting.get(name)
        method.build([f"task_{i}" for i in range(jacobian.shape[0])])
        return method.aggregate(jacobian, keras.ops.ones(jacobian.shape[:1]))

    solve = compiled(direction_and_weights)
    return lambda jacobian: [to_numpy(value) for value in solve(tensor(jacobian))]


simplex_min_norm = compiled(min_norm.simplex_min_norm)
upgrad_duals = compiled(
    functools.partial(min_norm.lower_bounded_min_norm, ridge=upgrad.FLOOR)
)
nonnegative_min = compiled(min_norm.nonnegative_min)
cagrad_dual = compiled(worst_case_weights)
searched_worst_case = compiled(bracketed_worst_case_weights)


def enumerating(monkeypatch, function):
    """`function`, compiled anew, with the solvers enumerating faces at any T."""
    monkeypatch.setattr(min_norm, "enumeration_max_tasks", lambda: 64)
    return compiled(lambda *arguments, **keywords: function(*arguments, **keywords))


def generated_jacobian(num_tasks, kind, seed=0, size=48):
    rng = np.random.default_rng([num_tasks, KINDS.index(kind), seed])
    jacobian = rng.normal(size=(num_tasks, size))
    if kind == "rank_one":
        jacobian = rng.normal(size=(num_tasks, 1)) @ rng.normal(size=(1, size))
    elif kind == "rank_deficient":
        rank = max(1, num_tasks // 3)
        jacobian = rng.normal(size=(num_tasks, rank)) @ rng.normal(size=(rank, size))
    elif kind == "duplicated":
        jacobian[num_tasks // 2 :] = jacobian[: num_tasks - num_tasks // 2]
    elif kind == "zero_rows":
        jacobian[::3] = 0.0
    elif kind == "scaled":
        jacobian *= 10.0 ** rng.uniform(-6, 6, size=(num_tasks, 1))
    return jacobian.astype("float32")


def regularized(jacobian, ridge):
    gram = keras.ops.convert_to_tensor(jacobian @ jacobian.T)
    return min_norm.regularized_gram(gram, ridge)


def tensor(value):
    return keras.ops.convert_to_tensor(np.asarray(value, "float32"))


def quadprog_min_norm(gram, lower=None):
    """min v^T G v over the simplex (lower None) or subject to v >= lower."""
    num_tasks = len(gram)
    if lower is None:
        constraints = np.hstack([np.ones((num_tasks, 1)), np.eye(num_tasks)])
        bounds, equalities = np.r_[1.0, np.zeros(num_tasks)], 1
    else:
        constraints, bounds, equalities = np.eye(num_tasks), lower, 0
    return quadprog.solve_qp(
        gram, np.zeros(num_tasks), constraints, bounds, equalities
    )[0]


def assert_same_minimum(found, reference, gram, jacobian):
    """The objective is the minimum within float32 rounding of the normalised
    problem; the directions agree wherever the minimum is not at rounding level
    (a Pareto-stationary Jacobian has a direction of rounding size)."""
    value = found @ gram @ found
    minimum = reference @ gram @ reference
    assert value <= minimum + 2e-6 * max(1.0, minimum)
    if minimum > 1e-4:
        direction, expected = found @ jacobian, reference @ jacobian
        cosine = (
            direction @ expected / np.linalg.norm(direction) / np.linalg.norm(expected)
        )
        assert cosine >= 0.9999


def assert_nonnegative_kkt(solution, gram, linear):
    """x >= 0 and the KKT conditions of min x^T G x / 2 + q^T x within float32
    rounding, normwise: a backward-stable solve leaves residuals of the size of
    the largest product, also in the rows of the smallest gradients."""
    derivative = solution @ gram + linear
    products = np.abs(solution) @ np.abs(gram)
    rounding = 1e-5 * (products.max() + np.abs(linear))
    assert np.all(solution >= 0)
    assert np.all(derivative >= -rounding)
    free = solution > 1e-6 * np.abs(solution).max()
    np.testing.assert_allclose(derivative[free], 0.0, atol=np.max(rounding) * 10)


@pytest.mark.parametrize("num_tasks", SIZES)
@pytest.mark.parametrize("kind", KINDS)
def test_mgda_simplex_matches_quadprog(num_tasks, kind):
    jacobian = generated_jacobian(num_tasks, kind)
    weights = to_numpy(simplex_min_norm(tensor(jacobian @ jacobian.T)))
    gram = to_numpy(regularized(jacobian, min_norm.RIDGE)).astype("float64")
    assert np.all(weights >= 0)
    np.testing.assert_allclose(weights.sum(), 1.0, rtol=1e-5)
    assert_same_minimum(weights, quadprog_min_norm(gram), gram, jacobian)


def upgrad_gram(jacobian):
    """UPGrad's Gram matrix, regularised relative to each task."""
    gram = jacobian @ jacobian.T
    return gram + upgrad.RIDGE * np.diag(np.diag(gram))


@pytest.mark.parametrize("num_tasks", SIZES)
@pytest.mark.parametrize("kind", KINDS)
def test_upgrad_projections_match_quadprog(num_tasks, kind):
    jacobian = generated_jacobian(num_tasks, kind)
    lower = np.eye(num_tasks, dtype="float32")
    tilted = tensor(upgrad_gram(jacobian))
    dual = to_numpy(upgrad_duals(tilted, tensor(lower)))
    gram = to_numpy(min_norm.regularized_gram(tilted, upgrad.FLOOR)).astype("float64")
    for task in range(num_tasks):
        assert np.all(dual[task] >= lower[task] - 1e-6 * np.abs(dual[task]).max())
        reference = quadprog_min_norm(gram, lower[task].astype("float64"))
        assert_same_minimum(dual[task], reference, gram, jacobian)


@pytest.mark.parametrize("num_tasks", (12, 64) if BACKEND == "torch" else (20,))
@pytest.mark.parametrize("kind", KINDS)
def test_active_set_meets_the_kkt_conditions(num_tasks, kind):
    jacobian = generated_jacobian(num_tasks, kind, seed=1)
    gram = regularized(jacobian, min_norm.RIDGE)
    linear = np.vstack([-np.ones(num_tasks), to_numpy(gram)[: num_tasks // 2]])
    solution = to_numpy(nonnegative_min(gram, tensor(linear)))
    for row, q in zip(solution, linear):
        assert_nonnegative_kkt(row, to_numpy(gram), q)


def enumeration_limits():
    """`min_norm.enumeration_max_tasks()` eagerly and in each compiled step."""
    if BACKEND == "jax":
        import jax

        compiled_limit = jax.jit(
            lambda: keras.ops.convert_to_tensor(min_norm.enumeration_max_tasks())
        )
        return {"eager": min_norm.enumeration_max_tasks(), "xla": int(compiled_limit())}
    if BACKEND == "tensorflow":
        import tensorflow as tf

        def limit():
            return tf.constant(min_norm.enumeration_max_tasks())

        return {
            "eager": min_norm.enumeration_max_tasks(),
            "graph": int(tf.function(limit)()),
            "xla": int(tf.function(limit, jit_compile=True)()),
        }
    return {"eager": min_norm.enumeration_max_tasks()}


def test_solvers_enumerate_faces_only_where_they_are_faster():
    # benchmarks/solvers.py, Part D: under XLA the active set's loop is as
    # fast or faster from 5 tasks, op by op from 9 or 10.
    op_by_op, xla = min_norm.ENUMERATION_MAX_TASKS, min_norm.XLA_ENUMERATION_MAX_TASKS
    assert xla < op_by_op
    expected = {
        "jax": {"eager": xla, "xla": xla},
        "tensorflow": {"eager": op_by_op, "graph": op_by_op, "xla": xla},
        "torch": {"eager": op_by_op},
    }[BACKEND]
    assert enumeration_limits() == expected


def test_active_set_agrees_with_the_enumeration(monkeypatch):
    enumerated_min_norm = enumerating(monkeypatch, min_norm.simplex_min_norm)
    for kind in KINDS:
        jacobian = generated_jacobian(min_norm.ENUMERATION_MAX_TASKS, kind, seed=2)
        gram = regularized(jacobian, min_norm.RIDGE)
        enumerated = to_numpy(enumerated_min_norm(gram, ridge=0.0))
        scaled = to_numpy(nonnegative_min(gram, -keras.ops.ones((1, len(jacobian)))))[0]
        gram = to_numpy(gram).astype("float64")
        assert_same_minimum(scaled / scaled.sum(), enumerated, gram, jacobian)


def slsqp_worst_case(gram, mean_products, radius, start):
    def objective(weights):
        return weights @ mean_products + radius * np.sqrt(
            max(weights @ gram @ weights, 0)
        )

    simplex = {"type": "eq", "fun": lambda weights: weights.sum() - 1}
    results = [
        minimize(
            objective,
            initial,
            method="SLSQP",
            bounds=[(0, 1)] * len(gram),
            constraints=[simplex],
            options={"ftol": 1e-15, "maxiter": 1000},
        )
        for initial in (np.full(len(gram), 1 / len(gram)), start)
    ]
    return min(results, key=lambda result: result.fun).fun


@pytest.mark.parametrize("num_tasks", SIZES)
@pytest.mark.parametrize("kind", KINDS)
def test_cagrad_dual_matches_slsqp(num_tasks, kind):
    jacobian = generated_jacobian(num_tasks, kind)
    gram = regularized(jacobian, min_norm.RIDGE)
    mean_weights = keras.ops.ones((num_tasks,)) / num_tasks
    radius = 0.5 * keras.ops.sqrt(
        keras.ops.sum(mean_weights * keras.ops.matmul(gram, mean_weights))
    )
    weights = cagrad_dual(gram, mean_weights, radius)
    products = keras.ops.matmul(gram, mean_weights)
    value = float(to_numpy(dual_objective(weights[None], gram, products, radius))[0])
    weights, gram = to_numpy(weights).astype("float64"), to_numpy(gram)
    products, radius = to_numpy(products).astype("float64"), float(to_numpy(radius))
    assert np.all(weights >= 0)
    np.testing.assert_allclose(weights.sum(), 1.0, rtol=1e-5)
    # KKT: the derivative is smallest, and equal, on the support.
    norm = np.sqrt(weights @ gram @ weights)
    derivative = products + radius * (gram @ weights) / norm
    level = weights @ derivative
    rounding = 1e-4 * (np.abs(products).max() + radius * np.sqrt(np.diag(gram).max()))
    assert np.all(derivative >= level - rounding)
    if num_tasks <= 12:
        minimum = slsqp_worst_case(gram, products, radius, weights)
        assert value <= minimum + 5e-6 * abs(minimum) + 1e-9


def test_cagrad_search_agrees_with_the_enumeration(monkeypatch):
    enumerated_worst_case = enumerating(monkeypatch, worst_case_weights)
    num_tasks = min_norm.ENUMERATION_MAX_TASKS
    for kind in KINDS:
        gram = regularized(generated_jacobian(num_tasks, kind, seed=3), min_norm.RIDGE)
        mean_weights = keras.ops.ones((num_tasks,)) / num_tasks
        products = keras.ops.matmul(gram, mean_weights)
        radius = 0.7 * keras.ops.sqrt(keras.ops.sum(mean_weights * products))
        values = [
            to_numpy(
                dual_objective(
                    solve(gram, mean_weights, radius)[None], gram, products, radius
                )
            )
            for solve in (enumerated_worst_case, searched_worst_case)
        ]
        np.testing.assert_allclose(values[1], values[0], rtol=1e-6, atol=1e-9)


# The papers' guarantees, through each method's `aggregate`.


@pytest.mark.parametrize("name", ["mgda", "upgrad"])
@pytest.mark.parametrize("num_tasks", SIZES)
@pytest.mark.parametrize("kind", KINDS)
def test_direction_conflicts_with_no_task(name, num_tasks, kind):
    jacobian = generated_jacobian(num_tasks, kind)
    direction, weights = rule(name)(jacobian)
    jacobian = jacobian.astype("float64")
    squared_norms = np.sum(jacobian**2, axis=1)
    trace = squared_norms.sum()
    # Each method solves the problem of a Jacobian extended by its ridge, so
    # a task's product can fall short of 0 by the ridge's share of it.
    if name == "mgda":
        ridge = min_norm.RIDGE * trace
    else:
        ridge = upgrad.RIDGE * squared_norms + upgrad.FLOOR * trace
    rounding = (
        1e-5 * np.sqrt(squared_norms) * (np.abs(weights) @ np.sqrt(squared_norms))
    )
    assert np.all(jacobian @ direction >= -ridge * np.abs(weights) - rounding)


def stationary_jacobian(num_tasks, seed=0, size=48):
    """Gradients with a strictly positive combination equal to zero."""
    rng = np.random.default_rng(seed)
    jacobian = rng.normal(size=(num_tasks, size))
    coefficients = rng.uniform(0.5, 2.0, size=num_tasks - 1)
    jacobian[-1] = -coefficients @ jacobian[:-1]
    return jacobian.astype("float32")


@pytest.mark.parametrize("num_tasks", SIZES)
def test_upgrad_is_zero_exactly_at_strongly_stationary_points(num_tasks):
    if num_tasks < 3:
        pytest.skip("two gradients are stationary only when exactly opposite")
    stationary = stationary_jacobian(num_tasks, size=2 * num_tasks + 8)
    direction, _ = rule("upgrad")(stationary)
    norms = np.linalg.norm(stationary, axis=1)
    # The ridge leaves a direction below 1e-2 of the gradients (see UPGrad's
    # docstring); away from stationarity it is far larger.
    assert np.linalg.norm(direction) <= 1e-2 * norms.mean()
    moving, _ = rule("upgrad")(stationary[1:])
    assert np.linalg.norm(moving) >= 5e-2 * norms.mean()


@pytest.mark.parametrize("num_tasks", SIZES)
def test_upgrad_is_linear_under_positive_scaling(num_tasks):
    jacobian = generated_jacobian(num_tasks, "random", seed=4)
    rng = np.random.default_rng(num_tasks)
    first, second = rng.uniform(0.2, 5.0, size=(2, num_tasks)).astype("float32")

    def scaled(coefficients):
        return rule("upgrad")(coefficients[:, None] * jacobian)[0]

    together = scaled(first + second)
    np.testing.assert_allclose(
        together, scaled(first) + scaled(second), atol=1e-4 * np.abs(together).max()
    )


@pytest.mark.parametrize("name", GRADIENT_METHODS)
@pytest.mark.parametrize("kind", FINITE_KINDS)
def test_many_tasks_give_finite_directions(name, kind):
    num_tasks = 40 if BACKEND == "torch" else 20
    jacobian = generated_jacobian(num_tasks, kind, seed=5)
    losses = np.linspace(0.5, 2.0, num_tasks)
    direction, weights = aggregate(weighting.get(name), jacobian, losses)
    assert direction.shape == (jacobian.shape[1],)
    assert np.all(np.isfinite(direction)) and np.all(np.isfinite(weights))


@pytest.mark.parametrize(
    "name", [name for name in GRADIENT_METHODS if name not in RANDOM_METHODS]
)
@pytest.mark.parametrize("kind", PERMUTED_KINDS)
def test_many_tasks_are_permutation_equivariant(name, kind):
    if name == "aligned_mtl" and kind == "scaled":
        pytest.skip(
            "Aligned-MTL rescales by the smallest singular value, which for row "
            "scales 1e-6 to 1e6 lies below float32 resolution of the Gram matrix"
        )
    num_tasks = 20
    jacobian = generated_jacobian(num_tasks, kind, seed=6)
    losses = np.linspace(0.5, 2.0, num_tasks).astype("float32")
    permutation = np.random.default_rng(7).permutation(num_tasks)
    direction, weights = aggregate(weighting.get(name), jacobian, losses)
    permuted, permuted_weights = aggregate(
        weighting.get(name), jacobian[permutation], losses[permutation]
    )
    terms = np.abs(weights)[:, None] * np.abs(jacobian)
    np.testing.assert_allclose(permuted, direction, atol=1e-4 * terms.sum(0).max())


@pytest.mark.parametrize("name", ["mgda", "upgrad", "cagrad"])
def test_compiled_solvers_match_eager(name):
    jacobian = generated_jacobian(20, "random", seed=8)
    eager, _ = aggregate(weighting.get(name), jacobian)
    compiled, _ = compiled_aggregate(weighting.get(name), jacobian, np.ones(20))
    scale = np.linalg.norm(jacobian, axis=1).max()
    np.testing.assert_allclose(compiled, eager, rtol=1e-4, atol=1e-5 * scale)


SINGLE_TASK_SCALE = {
    "cagrad": (1 + 0.5) / (1 + 0.5**2),
    # The first moving average is (1 - 0.9) g / L, L = 2.
    "db_mtl": 0.1 / 2.0,
}


@pytest.mark.parametrize("name", GRADIENT_METHODS)
def test_combine_without_tasks_and_with_one(name):
    empty = weighting.get(name).combine(np.zeros((0, 5)), np.zeros(0))
    np.testing.assert_array_equal(to_numpy(empty), np.zeros(5))
    row = np.array([[1.0, -2.0, 3.0]], "float32")
    direction = to_numpy(weighting.get(name).combine(row, [2.0]))
    if name in ("nash_mtl", "moco"):
        # The bargaining solution of one task is its unit gradient; MoCo's
        # first tracked gradient is half its loss times its unit gradient.
        expected = row[0] / np.linalg.norm(row[0])
    elif name == "fairgrad":
        # |g|^2 (1 + ridge) w = 1 / w at alpha = 1: the unit gradient, nearly.
        expected = row[0] / np.linalg.norm(row[0]) / np.sqrt(1.0 + FAIRGRAD_RIDGE)
    else:
        expected = SINGLE_TASK_SCALE.get(name, 1.0) * row[0]
    np.testing.assert_allclose(direction, expected, rtol=1e-5)


@pytest.mark.parametrize("name", MODEL_METHODS)
def test_many_task_model_step_lowers_every_loss(name):
    import keras_dwo

    num_tasks = 12
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype("float32")
    # Targets pulling the trunk in different directions.
    y = {
        f"t{task}": (x @ rng.normal(size=(4, 1))).astype("float32")
        for task in range(num_tasks)
    }
    inputs = keras.Input(shape=(4,))
    trunk = keras.layers.Dense(8, activation="tanh", name="trunk")(inputs)
    outputs = {
        task: keras.layers.Dense(1, name=task, trainable=False)(trunk) for task in y
    }
    model = keras_dwo.DynamicWeightedModel(inputs, outputs, weighting=name)
    model.compile(optimizer=keras.optimizers.SGD(1e-3), loss="mse")
    before = model.evaluate(x, y, batch_size=64, return_dict=True, verbose=0)
    logs = model.train_on_batch(x, y, return_dict=True)
    after = model.evaluate(x, y, batch_size=64, return_dict=True, verbose=0)
    # With frozen heads the step is the method's direction on the trunk alone,
    # which conflicts with no task: a small step lowers every loss.
    for task in y:
        assert after[f"{task}_loss"] <= before[f"{task}_loss"] + 1e-7
        assert np.isfinite(logs[f"{task}_weight"])


def test_absent_tasks_are_left_out_of_the_active_set():
    num_tasks = 12
    jacobian = generated_jacobian(num_tasks, "random", seed=9)
    present = np.ones(num_tasks, "float32")
    present[[0, 5, 6, 11]] = 0.0
    kept = present > 0
    weights = to_numpy(
        simplex_min_norm(tensor(jacobian @ jacobian.T), present=tensor(present))
    )
    np.testing.assert_array_equal(weights[~kept], 0.0)
    gram = to_numpy(regularized(jacobian, min_norm.RIDGE)).astype("float64")
    reference = quadprog_min_norm(gram[np.ix_(kept, kept)])
    assert_same_minimum(
        weights[kept], reference, gram[np.ix_(kept, kept)], jacobian[kept]
    )
    direction = to_numpy(
        weighting.get("cagrad").combine(jacobian, np.ones(num_tasks), tensor(present))
    )
    alone = to_numpy(weighting.get("cagrad").combine(jacobian[kept], np.ones(8)))
    np.testing.assert_allclose(direction, alone, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("wrt", ["parameters", "representation"])
def test_many_task_gradients_sum_to_the_equal_weighting_step(wrt):
    # Past 8 tasks the JAX step takes the per-task gradients with one
    # vectorised pullback instead of a loop; their sum must be the gradient
    # of the summed losses.
    import keras_dwo

    from conftest import summed_gradients_method

    rng = np.random.default_rng(1)
    x = rng.normal(size=(32, 4)).astype("float32")
    y = {f"t{task}": rng.normal(size=(32, 1)).astype("float32") for task in range(12)}

    def trained(method):
        keras.utils.set_random_seed(0)
        inputs = keras.Input(shape=(4,))
        trunk = keras.layers.Dense(8, activation="tanh", name="trunk")(inputs)
        outputs = {task: keras.layers.Dense(1, name=task)(trunk) for task in y}
        model = keras_dwo.DynamicWeightedModel(inputs, outputs, weighting=method)
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
        return [to_numpy(variable) for variable in model.trainable_variables]

    expected = trained("equal")
    for want, got in zip(expected, trained(summed_gradients_method(wrt=wrt))):
        np.testing.assert_allclose(got, want, atol=1e-5)
