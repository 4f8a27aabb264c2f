"""IMTL-G against a float64 reference of its pseudo-inverse closed form."""

import keras
import numpy as np

from keras_dwo.weighting.imtl_g import IMTLG

from conftest import BACKEND
from conftest import compiled_aggregate
from conftest import to_numpy

SIZES = [2, 5, 12, 20, 40]
WIDTH = 48
KINDS = [
    "full_rank",
    "rank_1",
    "rank_deficient",
    "duplicated_rows",
    "zero_rows",
    "badly_scaled",
    "badly_scaled_parallel",
]

# IMTL-G keeps no state, so one instance serves every number of tasks.
_METHOD = IMTLG()
_METHOD.build([f"task_{i}" for i in range(64)])


def _aggregate(jacobian, present):
    return _METHOD.aggregate(
        jacobian, keras.ops.ones(keras.ops.shape(jacobian)[:1]), present=present
    )


# Eager JAX compiles every operation for every shape, and jit about a
# second per shape; on JAX, Jacobians are therefore padded with absent zero
# rows to one shape (the other backends check that such rows change nothing).
PADDED_TASKS = 40 if BACKEND == "jax" else None
if BACKEND == "jax":
    import jax

    _aggregate = jax.jit(_aggregate)


def weigh(jacobian, present=None):
    """`(direction, weights)` as NumPy arrays, jitted on JAX, eager otherwise."""
    jacobian = np.asarray(jacobian, "float32")
    num_tasks = len(jacobian)
    present = np.ones(num_tasks) if present is None else np.asarray(present)
    if PADDED_TASKS and num_tasks < PADDED_TASKS:
        padding = PADDED_TASKS - num_tasks
        jacobian = np.pad(jacobian, [(0, padding), (0, 0)])
        present = np.pad(present, [(0, padding)])
    direction, weights = _aggregate(
        keras.ops.convert_to_tensor(jacobian),
        keras.ops.convert_to_tensor(present.astype("float32")),
    )
    return to_numpy(direction), to_numpy(weights)[:num_tasks]


def balanced(solution):
    """`solution / sum`, or None near the cancellation that gives no step."""
    if abs(solution.sum()) <= 0.05 * np.abs(solution).sum():
        return None
    return solution / solution.sum()


def reference(jacobian, rank):
    """Float64 `w = G^+ n / (1^T G^+ n)` for an exact Jacobian of known rank.

    With independent rows, the inverse exists and equals `N^{-1} C^{-1} 1`
    (`C` the cosine matrix), which float64 solves to full precision even for
    norms 12 orders apart. Otherwise the pseudo-inverse keeps the `rank`
    leading eigenvalues of `G`; such Jacobians get moderate norms only.
    """
    jacobian = np.asarray(jacobian, "float64")
    norms = np.linalg.norm(jacobian, axis=1)
    nonzero = norms > 0
    solution = np.zeros(len(jacobian))
    if rank == nonzero.sum():
        units = jacobian[nonzero] / norms[nonzero, None]
        solution[nonzero] = np.linalg.solve(units @ units.T, np.ones(rank))
        solution[nonzero] /= norms[nonzero]
    else:
        eigenvalues, eigenvectors = np.linalg.eigh(jacobian @ jacobian.T)
        eigenvalues, eigenvectors = eigenvalues[-rank:], eigenvectors[:, -rank:]
        solution = eigenvectors @ ((eigenvectors.T @ norms) / eigenvalues)
    return balanced(solution)


def parallel_groups_reference(jacobian, signs, groups):
    """The exact weights for mutually orthogonal groups of parallel gradients.

    Each group's Gram matrix is `x x^T` for `x_i = s_i n_i`, whose
    pseudo-inverse gives `G^+ n = x (x . n) / |x|^4` on the group.
    """
    norms = np.linalg.norm(np.asarray(jacobian, "float64"), axis=1)
    solution = np.zeros(len(norms))
    for group in np.unique(groups):
        members = groups == group
        signed = signs[members] * norms[members]
        solution[members] = signed * (signed @ norms[members]) / (signed @ signed) ** 2
    return balanced(solution)


def draw_case(kind, num_tasks, rng):
    """`(exact Jacobian, float64 reference weights or None)`."""
    if kind in ("full_rank", "badly_scaled"):
        jacobian = rng.normal(size=(num_tasks, WIDTH))
        if kind == "badly_scaled":
            jacobian *= np.exp(rng.uniform(np.log(1e-6), np.log(1e6), num_tasks))[
                :, None
            ]
        return jacobian, reference(jacobian, num_tasks)
    if kind == "rank_1":
        scales = rng.uniform(0.5, 2.0, num_tasks) * rng.choice([-1.0, 1.0], num_tasks)
        jacobian = np.outer(scales, rng.normal(size=WIDTH))
        return jacobian, reference(jacobian, 1)
    if kind == "rank_deficient":
        rank = max(1, num_tasks // 3)
        jacobian = rng.normal(size=(num_tasks, rank)) @ rng.normal(size=(rank, WIDTH))
        return jacobian, reference(jacobian, rank)
    if kind == "duplicated_rows":
        unique = (num_tasks + 1) // 2
        rows = rng.normal(size=(unique, WIDTH))
        jacobian = rows[rng.permutation(np.arange(num_tasks) % unique)]
        return jacobian, reference(jacobian, unique)
    if kind == "zero_rows":
        jacobian = rng.normal(size=(num_tasks, WIDTH))
        zeros = num_tasks // 3 + 1
        jacobian[rng.choice(num_tasks, zeros, replace=False)] = 0.0
        return jacobian, reference(jacobian, num_tasks - zeros)
    if kind == "badly_scaled_parallel":
        # Linearly dependent, with norms 4 orders of magnitude apart: float32
        # rounding of the rows couples the groups by about 1e-7, which a
        # norm ratio K amplifies to errors of about 1e-8 K here.
        groups = np.arange(num_tasks) % max(1, num_tasks // 4)
        directions = np.linalg.qr(rng.normal(size=(WIDTH, groups.max() + 1)))[0].T
        signs = rng.choice([-1.0, 1.0], num_tasks)
        norms = np.exp(rng.uniform(np.log(1e-2), np.log(1e2), num_tasks))
        jacobian = (signs * norms)[:, None] * directions[groups]
        # The reference sees the rounded norms; the directions stay exact.
        rounded = jacobian.astype("float32")
        return jacobian, parallel_groups_reference(rounded, signs, groups)
    raise ValueError(kind)


def make_case(kind, num_tasks, seed):
    """`(float32 Jacobian, float64 reference weights)`, away from cancellation."""
    rng = np.random.default_rng(1000 * num_tasks + seed)
    for _ in range(20):
        jacobian, expected = draw_case(kind, num_tasks, rng)
        if expected is not None:
            return jacobian.astype("float32"), expected
    raise AssertionError(f"No balanced {kind} case with {num_tasks} tasks.")


def assert_matches(direction, weights, jacobian, expected_weights, case):
    expected = expected_weights @ jacobian.astype("float64")
    direction = direction.astype("float64")
    cosine = direction @ expected / np.linalg.norm(direction) / np.linalg.norm(expected)
    assert cosine >= 1 - 1e-5, case
    length = np.linalg.norm(direction) / np.linalg.norm(expected)
    assert abs(length - 1) <= 1e-3, (case, length)
    np.testing.assert_allclose(
        weights,
        expected_weights,
        rtol=0,
        atol=1e-3 * np.abs(expected_weights).max(),
        err_msg=case,
    )
    np.testing.assert_allclose(weights.sum(), 1.0, rtol=1e-4, err_msg=case)


def test_matches_the_pseudo_inverse_closed_form():
    for kind in KINDS:
        for num_tasks in SIZES:
            jacobian, expected = make_case(kind, num_tasks, seed=0)
            direction, weights = weigh(jacobian)
            assert_matches(direction, weights, jacobian, expected, (kind, num_tasks))
            # A zero gradient gets exactly no weight.
            np.testing.assert_array_equal(weights[expected == 0], 0.0)
            if kind in ("full_rank", "badly_scaled"):
                # The defining property: equal projections onto the unit
                # gradients.
                exact = jacobian.astype("float64")
                units = exact / np.linalg.norm(exact, axis=1, keepdims=True)
                projections = units @ (weights.astype("float64") @ exact)
                # With norms 1e12 apart, tiny weights on huge gradients carry
                # a cosine matrix's float32 error (condition numbers up to
                # about 500 at 40 tasks) into the projections.
                rtol = 1e-3 if kind == "badly_scaled" else 1e-4
                np.testing.assert_allclose(
                    projections, projections.mean(), rtol=rtol, err_msg=kind
                )


def test_the_order_of_the_tasks_does_not_matter():
    num_tasks = 40
    order = np.random.default_rng(0).permutation(num_tasks)
    for kind in KINDS:
        jacobian, _ = make_case(kind, num_tasks, seed=1)
        direction, weights = weigh(jacobian)
        permuted_direction, permuted_weights = weigh(jacobian[order])
        np.testing.assert_allclose(
            permuted_weights,
            weights[order],
            rtol=0,
            atol=1e-5 * np.abs(weights).max(),
            err_msg=kind,
        )
        np.testing.assert_allclose(
            permuted_direction,
            direction,
            rtol=0,
            atol=1e-5 * np.abs(direction).max(),
            err_msg=kind,
        )


def padded(rows, num_tasks=None):
    """Rows in the test width (the Gram matrix ignores zero columns)."""
    rows = np.asarray(rows, "float64")
    jacobian = np.zeros((num_tasks or len(rows), WIDTH))
    jacobian[: len(rows), : rows.shape[1]] = rows
    return jacobian


def test_cases_by_hand_and_special_cases():
    # Orthogonal, norms 1 and 2: w_1 / w_2 = n_2 / n_1 and w_1 + w_2 = 1, so
    # d = (2/3, 2/3) projects 2/3 onto both.
    direction, weights = weigh(padded([[1.0, 0.0], [0.0, 2.0]]))
    np.testing.assert_allclose(weights, [2 / 3, 1 / 3], rtol=1e-6)
    np.testing.assert_allclose(direction[:2], [2 / 3, 2 / 3], rtol=1e-6)
    # Parallel, s_i n_i u: w_i = s_i n_i / sum s n, d = (sum n^2 / sum s n) u.
    for rows, expected_weights, expected_direction in [
        ([[3.0, 4.0]] * 5, [1 / 5] * 5, [3.0, 4.0]),
        ([[1.0, 0.0], [2.0, 0.0]], [1 / 3, 2 / 3], [5 / 3, 0.0]),
        ([[1.0, 0.0], [-2.0, 0.0]], [-1.0, 2.0], [-5.0, 0.0]),
    ]:
        direction, weights = weigh(padded(rows))
        np.testing.assert_allclose(weights, expected_weights, rtol=1e-5)
        np.testing.assert_allclose(
            direction[:2], expected_direction, rtol=1e-5, atol=1e-6
        )
    # About 3 degrees apart, the gradients are independent: the paper's inverse
    # applies and the step is close to its parallel limit
    # (2 n_1 n_2 / (n_1 + n_2)) u = (4/3) u, not the pseudo-inverse's 5/3.
    angle = 0.05
    jacobian = padded([[1.0, 0.0], [2 * np.cos(angle), 2 * np.sin(angle)]])
    direction, weights = weigh(jacobian)
    np.testing.assert_allclose(weights, reference(jacobian, 2), rtol=1e-3)
    np.testing.assert_allclose(
        np.linalg.norm(direction), 4 / 3 * np.cos(angle / 2), rtol=1e-3
    )
    # No step balances the tasks: an all-zero Jacobian, opposite gradients
    # of equal norm (G^+ n = 0), and s_i n_i summing to 0 (1^T G^+ n = 0).
    for jacobian in [
        np.zeros((5, WIDTH)),
        padded([[1.0, 2.0], [-1.0, -2.0]]),
        padded([[1.0, 0.0]] * 4 + [[-4.0, 0.0]]),
    ]:
        direction, weights = weigh(jacobian)
        np.testing.assert_array_equal(weights, 0.0)
        np.testing.assert_array_equal(direction, 0.0)
    # An absent task gets no weight, even with a gradient; the others are
    # weighted without it.
    jacobian, _ = make_case("full_rank", 5, seed=3)
    _, weights = weigh(jacobian, present=[1, 1, 0, 1, 1])
    assert weights[2] == 0.0
    jacobian[2] = 0.0
    np.testing.assert_allclose(weights, reference(jacobian, 4), atol=1e-5)
    # A non-finite or overflowing gradient: a non-finite step, for the guard.
    for bad in (np.nan, np.inf, 1e30):
        jacobian, _ = make_case("full_rank", 5, seed=4)
        jacobian[1, 3] = bad
        direction, weights = weigh(jacobian)
        assert not np.any(np.isfinite(direction)), bad
        assert not np.any(np.isfinite(weights)), bad


def test_compiled_with_64_tasks():
    # More tasks than the rank, in the backend's compiled step: JAX's jit,
    # and TensorFlow's tf.function without XLA (XLA compiles the eigen and
    # QR decompositions for seconds; tests/test_min_norm_methods.py runs it
    # on 3 tasks).
    rng = np.random.default_rng(5)
    exact = rng.normal(size=(64, 10)) @ rng.normal(size=(10, WIDTH))
    jacobian = exact.astype("float32")
    expected = reference(exact, 10)
    method = IMTLG()
    method.build([f"task_{i}" for i in range(64)])
    if BACKEND == "tensorflow":
        import tensorflow as tf

        result = tf.function(method.aggregate, jit_compile=False)(
            tf.constant(jacobian), tf.ones(64)
        )
        direction, weights = (value.numpy() for value in result)
    else:
        direction, weights = compiled_aggregate(method, jacobian, np.ones(64))
    assert_matches(direction, weights, jacobian, expected, "64 tasks")
