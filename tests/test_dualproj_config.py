"""DualProj and ConFIG against TorchJD's aggregators and float64 references.

The NumPy references run on every backend: DualProj's quadratic program is
solved by quadprog in float64 on the same regularised Gram matrix, ConFIG's
direction comes from `numpy.linalg.pinv` in float64. TorchJD's aggregators
need torch, which the TensorFlow and JAX environments do not install.
"""

import importlib.util

import keras
import numpy as np
import pytest
import quadprog

from keras_dwo import weighting
from keras_dwo.weighting import min_norm
from keras_dwo.weighting import upgrad
from keras_dwo.weighting.conflict_free import ConFIG
from keras_dwo.weighting.dualproj import DualProj

from conftest import TWO_TASK_LOSSES
from conftest import aggregate
from conftest import built
from conftest import compiled_aggregate
from conftest import to_numpy
from conftest import two_task_data
from conftest import two_task_model

METHODS = {"dualproj": DualProj, "config": ConFIG}
needs_torchjd = pytest.mark.skipif(
    importlib.util.find_spec("torchjd") is None,
    reason="TorchJD needs torch, which this environment does not install",
)
# TorchJD's DualProj solves its program with qpsolvers, an extra of TorchJD's
# that the tests do not install; quadprog checks DualProj's program anyway.
needs_torchjd_projector = pytest.mark.skipif(
    importlib.util.find_spec("torchjd") is None
    or importlib.util.find_spec("qpsolvers") is None,
    reason="TorchJD's DualProj needs qpsolvers (torchjd[quadprog_projector])",
)


def generated_jacobian(num_tasks, kind, size=12):
    rng = np.random.default_rng([num_tasks, len(kind)])
    jacobian = rng.normal(size=(num_tasks, size))
    if kind == "conflicting":
        # Every other gradient pulls against its neighbour.
        jacobian[1::2] -= 1.5 * jacobian[::2][: num_tasks // 2]
    elif kind == "rank_deficient":
        # Small integers, so that the dependence is exact in float32.
        rank = max(1, num_tasks // 2)
        jacobian = rng.integers(-3, 4, size=(num_tasks, rank)) @ rng.integers(
            -3, 4, size=(rank, size)
        )
    elif kind == "zero_row":
        jacobian[num_tasks // 2] = 0.0
    return jacobian.astype("float32")


CASES = [
    (num_tasks, kind)
    for num_tasks in (2, 3, 5, 8)
    for kind in ("random", "conflicting", "rank_deficient", "zero_row")
]
CASE_IDS = [f"{num_tasks}-{kind}" for num_tasks, kind in CASES]


def direction_of(name, jacobian, present=None):
    """The method's direction, under the backend's compiler unless `present`."""
    method = built(weighting.get(name), len(jacobian))
    if present is None:
        return compiled_aggregate(method, jacobian, np.ones(len(jacobian)))
    direction, weights = method.aggregate(
        keras.ops.convert_to_tensor(jacobian),
        keras.ops.ones((len(jacobian),)),
        present=keras.ops.convert_to_tensor(np.asarray(present, "float32")),
    )
    return to_numpy(direction), to_numpy(weights)


def assert_close(direction, expected, jacobian):
    """Equal to float32 accuracy, relative to the size of the gradients."""
    scale = max(np.linalg.norm(expected), np.linalg.norm(jacobian, axis=1).max())
    np.testing.assert_allclose(direction, expected, rtol=0, atol=1e-4 * scale)


def dualproj_gram(jacobian):
    """DualProj's (and UPGrad's) regularised Gram matrix, in float64."""
    gram = jacobian.astype("float64") @ jacobian.T.astype("float64")
    tilted = gram + upgrad.RIDGE * np.diag(np.diag(gram))
    return tilted / np.trace(tilted) + upgrad.FLOOR * np.eye(len(gram))


def numpy_dualproj(jacobian):
    """min v^T G v subject to v >= 1/T, by quadprog, and its direction."""
    num_tasks = len(jacobian)
    lower = np.full(num_tasks, 1.0 / num_tasks)
    weights = quadprog.solve_qp(
        dualproj_gram(jacobian), np.zeros(num_tasks), np.eye(num_tasks), lower, 0
    )[0]
    return weights @ jacobian.astype("float64")


def numpy_config(jacobian):
    """ConFIG's direction, with numpy.linalg.pinv in float64."""
    jacobian = jacobian.astype("float64")
    norms = np.linalg.norm(jacobian, axis=1, keepdims=True)
    units = np.divide(jacobian, norms, out=np.zeros_like(jacobian), where=norms > 0)
    best = np.linalg.pinv(units, rcond=1e-10) @ np.ones(len(jacobian))
    length = np.linalg.norm(best)
    if length == 0:
        return np.zeros(jacobian.shape[1])
    unit = best / length
    return np.sum(jacobian @ unit) * unit


NUMPY_REFERENCES = {"dualproj": numpy_dualproj, "config": numpy_config}


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_direction_matches_the_numpy_reference(name, case):
    jacobian = generated_jacobian(*case)
    direction, weights = direction_of(name, jacobian)
    assert_close(direction, NUMPY_REFERENCES[name](jacobian), jacobian)
    np.testing.assert_allclose(
        weights @ jacobian, direction, rtol=1e-5, atol=1e-5 * np.abs(jacobian).max()
    )


def torchjd_direction(name, jacobian, regularised=False):
    """TorchJD's direction in float64.

    `regularised` gives DualProj the program this package solves: TorchJD's
    projector on the Jacobian extended by `1e-2 ||g_i||` in a coordinate of
    each task's own (the ridge relative to each task), with TorchJD's ridge
    set to the trace-relative floor.
    """
    import torch
    from torchjd._linalg import QuadprogProjector
    from torchjd.aggregation import ConFIG as TorchConFIG
    from torchjd.aggregation import DualProj as TorchDualProj

    matrix = torch.tensor(jacobian, dtype=torch.float64)
    if name == "config":
        return TorchConFIG()(matrix).numpy()
    if not regularised:
        return TorchDualProj()(matrix).numpy()
    norms = torch.linalg.norm(matrix, dim=1)
    extended = torch.cat([matrix, np.sqrt(upgrad.RIDGE) * torch.diag(norms)], dim=1)
    projector = QuadprogProjector(norm_eps=0.0, reg_eps=upgrad.FLOOR)
    return TorchDualProj(projector=projector)(extended)[: jacobian.shape[1]].numpy()


@needs_torchjd
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_config_matches_torchjd(case):
    jacobian = generated_jacobian(*case)
    direction, _ = direction_of("config", jacobian)
    assert_close(direction, torchjd_direction("config", jacobian), jacobian)


@needs_torchjd_projector
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_dualproj_matches_torchjd_on_the_same_program(case):
    jacobian = generated_jacobian(*case)
    direction, _ = direction_of("dualproj", jacobian)
    expected = torchjd_direction("dualproj", jacobian, regularised=True)
    assert_close(direction, expected, jacobian)


@needs_torchjd_projector
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_dualproj_is_near_torchjd_with_its_default_ridge(case):
    # TorchJD adds 1e-4 I to the trace-normalised Gram matrix, this package
    # 1e-4 diag(G): the directions differ by the ridges' effect, at most
    # about 1e-2 of the largest gradient (near Pareto-stationary points).
    jacobian = generated_jacobian(*case)
    direction, _ = direction_of("dualproj", jacobian)
    expected = torchjd_direction("dualproj", jacobian)
    scale = np.linalg.norm(jacobian, axis=1).max()
    assert np.linalg.norm(direction - expected) <= 1e-2 * scale


# By hand


def test_dualproj_by_hand():
    # Orthogonal unit gradients: the mean conflicts with neither.
    direction, weights = direction_of("dualproj", np.eye(2, dtype="float32"))
    np.testing.assert_allclose(direction, [0.5, 0.5], atol=1e-7)
    np.testing.assert_allclose(weights, [0.5, 0.5], atol=1e-7)
    # Opposite gradients: the dual cone is the orthogonal complement, where
    # the mean [-0.5, 0] projects to 0.
    direction, _ = direction_of("dualproj", np.array([[1.0, 0.0], [-2.0, 0.0]], "f"))
    np.testing.assert_allclose(direction, [0.0, 0.0], atol=2e-4)
    # The mean [-0.5, 0.5] raises the first loss; projected onto
    # {d_1 >= 0, -2 d_1 + d_2 >= 0}: [0, 0.5].
    direction, _ = direction_of("dualproj", np.array([[1.0, 0.0], [-2.0, 1.0]], "f"))
    np.testing.assert_allclose(direction, [0.0, 0.5], atol=2e-4)


def test_config_by_hand():
    # Orthogonal unit gradients: b = [1, 1] / sqrt(2), of length sqrt(2).
    direction, weights = direction_of("config", np.eye(2, dtype="float32"))
    np.testing.assert_allclose(direction, [1.0, 1.0], rtol=1e-6)
    np.testing.assert_allclose(weights, [1.0, 1.0], rtol=1e-6)
    # Opposite gradients: the pseudo-inverse sends the ones vector to 0.
    for jacobian in ([[1.0, 0.0], [-1.0, 0.0]], [[1.0, 0.0], [-2.0, 0.0]]):
        direction, weights = direction_of("config", np.array(jacobian, "float32"))
        np.testing.assert_array_equal(direction, [0.0, 0.0])
        np.testing.assert_array_equal(weights, [0.0, 0.0])
    # Orthogonal gradients of norms 1 and 3: b is still the diagonal, and the
    # length the sum of the projections, (1 + 3) / sqrt(2).
    direction, _ = direction_of("config", np.array([[1.0, 0.0], [0.0, 3.0]], "f"))
    np.testing.assert_allclose(direction, [2.0, 2.0], rtol=1e-6)


# Properties


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_dualproj_conflicts_with_no_task(case):
    jacobian = generated_jacobian(*case)
    direction, weights = direction_of("dualproj", jacobian)
    num_tasks = len(jacobian)
    assert np.all(weights >= 1.0 / num_tasks - 1e-6)
    # The regularised program allows -1e-4 ||g_j||^2 w_j (see DualProj).
    squared_norms = np.sum(jacobian.astype("float64") ** 2, axis=1)
    tolerance = 1.1e-4 * squared_norms * weights + 1e-5 * squared_norms.max()
    assert np.all(jacobian @ direction >= -tolerance)


def test_dualproj_is_the_mean_when_nothing_conflicts():
    rng = np.random.default_rng(3)
    for num_tasks in (2, 3, 5, 8):
        jacobian = np.abs(rng.normal(size=(num_tasks, 6))).astype("float32")
        direction, weights = direction_of("dualproj", jacobian)
        np.testing.assert_allclose(weights, np.full(num_tasks, 1.0 / num_tasks), 1e-5)
        np.testing.assert_allclose(direction, jacobian.mean(axis=0), rtol=1e-5)


@pytest.mark.parametrize("num_tasks", (2, 3, 5, 8))
@pytest.mark.parametrize("kind", ("random", "conflicting"))
def test_config_has_equal_positive_cosines(num_tasks, kind):
    # Linearly independent gradients (T <= 12 coordinates).
    jacobian = generated_jacobian(num_tasks, kind)
    direction, _ = direction_of("config", jacobian)
    cosines = (jacobian @ direction) / (
        np.linalg.norm(jacobian, axis=1) * np.linalg.norm(direction)
    )
    assert np.all(cosines > 0)
    np.testing.assert_allclose(cosines, cosines.mean(), rtol=1e-4)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_an_absent_task_is_left_out(name):
    jacobian = generated_jacobian(5, "conflicting")
    present = np.array([1.0, 0.0, 1.0, 1.0, 0.0], "float32")
    masked = jacobian * present[:, None]
    direction, weights = direction_of(name, masked, present)
    expected, _ = direction_of(name, jacobian[present > 0])
    np.testing.assert_allclose(direction, expected, atol=1e-5 * np.abs(jacobian).max())
    np.testing.assert_array_equal(weights[present == 0], 0.0)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_single_task_and_no_task(name):
    gradient = np.array([[1.0, -2.0, 3.0]], "float32")
    direction, _ = direction_of(name, gradient)
    np.testing.assert_allclose(direction, gradient[0], rtol=1e-5)
    method = weighting.get(name)
    empty = method.combine(np.zeros((0, 3), "float32"), np.zeros(0, "float32"))
    np.testing.assert_array_equal(to_numpy(empty), [0.0, 0.0, 0.0])
    zeros = np.zeros((3, 4), "float32")
    np.testing.assert_array_equal(direction_of(name, zeros)[0], np.zeros(4))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_identifier_and_config(name):
    method = weighting.get(name)
    assert isinstance(method, METHODS[name])
    restored = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(method)
    )
    assert type(restored) is METHODS[name]
    assert restored.get_config() == method.get_config()


def test_solver_is_the_one_upgrad_uses():
    # Past the face enumeration the active set solves the same program.
    num_tasks = min_norm.ENUMERATION_MAX_TASKS + 2
    jacobian = generated_jacobian(num_tasks, "conflicting", size=30)
    direction, _ = aggregate(DualProj(), jacobian)
    assert_close(direction, numpy_dualproj(jacobian), jacobian)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_fit_lowers_both_task_losses(name):
    x, y = two_task_data()
    model = two_task_model(name)
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss=TWO_TASK_LOSSES)
    before = model.evaluate(x, y, verbose=0, return_dict=True)
    model.fit(x, y, epochs=5, batch_size=32, verbose=0)
    after = model.evaluate(x, y, verbose=0, return_dict=True)
    for task in ("label", "value"):
        assert after[f"{task}_loss"] < before[f"{task}_loss"]
