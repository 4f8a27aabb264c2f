"""The methods that solve or decompose the Gram matrix, on plain Jacobians.

MGDA, UPGrad, DualProj, CAGrad, IMTL-G, ConFIG, Nash-MTL and Aligned-MTL.
"""

import keras
import numpy as np
import pytest

from keras_dwo.weighting.aligned_mtl import AlignedMTL
from keras_dwo.weighting.cagrad import CAGrad
from keras_dwo.weighting.conflict_free import ConFIG
from keras_dwo.weighting.dualproj import DualProj
from keras_dwo.weighting.imtl_g import IMTLG
from keras_dwo.weighting.mgda import MGDA
from keras_dwo.weighting.nash_mtl import NashMTL
from keras_dwo.weighting.upgrad import UPGrad

from conftest import aggregate
from conftest import built
from conftest import compiled_aggregate
from conftest import to_numpy


def random_jacobian(num_tasks, size, seed):
    return np.random.default_rng(seed).normal(size=(num_tasks, size)).astype("float32")


def conflicting_jacobians(count=6):
    """Random Jacobians with at least one pair of conflicting gradients."""
    found, seed = [], 0
    while len(found) < count:
        num_tasks = 2 + seed % 4
        jacobian = random_jacobian(num_tasks, 3 + seed % 5, seed)
        gram = jacobian @ jacobian.T
        if gram.min() < 0:
            found.append(jacobian)
        seed += 1
    return found


METHODS = {
    "mgda": MGDA,
    "upgrad": UPGrad,
    "dualproj": DualProj,
    "cagrad": CAGrad,
    "imtl_g": IMTLG,
    "config": ConFIG,
    "nash_mtl": NashMTL,
    "aligned_mtl": AlignedMTL,
}


# MGDA


def test_mgda_of_two_orthogonal_unit_gradients_is_their_midpoint():
    direction, weights = aggregate(MGDA(), [[1.0, 0.0], [0.0, 1.0]])
    np.testing.assert_allclose(direction, [0.5, 0.5], rtol=1e-5)
    np.testing.assert_allclose(weights, [0.5, 0.5], rtol=1e-5)


def test_mgda_stops_at_a_vertex_of_the_hull():
    # The segment from (1, 0) to (2, 1) is nearest to the origin at (1, 0).
    direction, weights = aggregate(MGDA(), [[1.0, 0.0], [2.0, 1.0]])
    np.testing.assert_allclose(direction, [1.0, 0.0], atol=1e-3)
    np.testing.assert_allclose(weights, [1.0, 0.0], atol=1e-3)


@pytest.mark.parametrize("jacobian", conflicting_jacobians())
def test_mgda_direction_is_the_minimum_norm_point_of_the_hull(jacobian):
    direction, weights = aggregate(MGDA(), jacobian)
    scale = np.trace(jacobian @ jacobian.T)
    assert np.all(weights >= 0)
    np.testing.assert_allclose(weights.sum(), 1.0, rtol=1e-5)
    # Optimality: every gradient has at least ||d||^2 along d.
    assert np.all(jacobian @ direction >= direction @ direction - 1e-3 * scale)
    simplex = np.random.default_rng(0).dirichlet(np.ones(len(jacobian)), size=2000)
    hull_norms = np.linalg.norm(simplex @ jacobian, axis=1)
    assert np.linalg.norm(direction) <= hull_norms.min() * (1 + 1e-3)


ORTHOGONAL = [[3.0, 0.0], [0.0, 1.0]]
LOSSES = [2.0, 4.0]
NORMALIZERS = {
    "none": [1.0, 1.0],
    "l2": [3.0, 1.0],
    "loss": [2.0, 4.0],
    "loss+": [6.0, 4.0],
}


@pytest.mark.parametrize("normalization", sorted(NORMALIZERS))
def test_mgda_normalizations_on_orthogonal_gradients(normalization):
    normalizers = np.array(NORMALIZERS[normalization])
    # For orthogonal gradients the simplex weights are proportional to the
    # inverse squared norms of the normalised gradients.
    normalized_norms = np.array([3.0, 1.0]) / normalizers
    simplex_weights = normalized_norms**-2 / np.sum(normalized_norms**-2)
    direction, weights = aggregate(MGDA(normalization), ORTHOGONAL, LOSSES)
    np.testing.assert_allclose(weights, simplex_weights / normalizers, rtol=1e-3)
    np.testing.assert_allclose(
        direction, (simplex_weights / normalizers) @ np.array(ORTHOGONAL), rtol=1e-3
    )


def test_mgda_l2_normalization_gives_the_midpoint_of_the_unit_gradients():
    direction, weights = aggregate(MGDA("l2"), ORTHOGONAL)
    np.testing.assert_allclose(direction, [0.5, 0.5], rtol=1e-4)
    np.testing.assert_allclose(weights, [0.5 / 3, 0.5], rtol=1e-4)


def test_mgda_with_a_zero_gradient_stops():
    for normalization in NORMALIZERS:
        direction, weights = aggregate(
            MGDA(normalization), [[1.0, 2.0], [0.0, 0.0]], LOSSES
        )
        np.testing.assert_allclose(direction, [0.0, 0.0], atol=1e-3)
        assert np.all(np.isfinite(weights))


# UPGrad


@pytest.mark.parametrize("jacobian", conflicting_jacobians())
def test_upgrad_direction_conflicts_with_no_task(jacobian):
    direction, weights = aggregate(UPGrad(), jacobian)
    scale = np.trace(jacobian @ jacobian.T)
    assert np.all(jacobian @ direction >= -1e-3 * scale)
    assert np.all(weights >= 1.0 / len(jacobian) - 1e-6)


def test_upgrad_of_non_conflicting_gradients_is_the_mean():
    jacobian = np.abs(random_jacobian(4, 6, seed=1))
    direction, weights = aggregate(UPGrad(), jacobian)
    np.testing.assert_allclose(direction, jacobian.mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(weights, [0.25] * 4, rtol=1e-5)


def test_upgrad_two_conflicting_tasks_by_hand():
    # g1 = (1, 0) projects to (0.5, 0.5) = g1 + g2 / 2 and g2 = (-1, 1) to
    # (0, 1) = g1 + g2; their mean is (0.25, 0.75) = g1 + 0.75 g2.
    direction, weights = aggregate(UPGrad(), [[1.0, 0.0], [-1.0, 1.0]])
    np.testing.assert_allclose(direction, [0.25, 0.75], rtol=1e-3)
    np.testing.assert_allclose(weights, [1.0, 0.75], rtol=1e-3)


# CAGrad


@pytest.mark.parametrize("jacobian", conflicting_jacobians())
def test_cagrad_without_radius_is_the_mean_gradient(jacobian):
    direction, weights = aggregate(CAGrad(c=0.0), jacobian)
    np.testing.assert_allclose(direction, jacobian.mean(axis=0), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(
        weights, np.full(len(jacobian), 1 / len(jacobian), "float32")
    )


@pytest.mark.parametrize("c", [0.0, 1e-6, 1e-5, 1e-4, 1e-3])
@pytest.mark.parametrize("zero_mean", [False, True])
def test_cagrad_with_a_small_radius_past_the_enumeration(c, zero_mean):
    # Past the face enumeration a search over beta, which reaches 1 / radius,
    # solves the dual; a small radius once made its solves singular.
    jacobian = random_jacobian(12, 30, seed=3)
    if zero_mean:
        jacobian = jacobian - jacobian.mean(axis=0)
    direction, weights = aggregate(CAGrad(c=c), jacobian)
    assert np.all(np.isfinite(direction)) and np.all(np.isfinite(weights))
    # d = (g_0 + c ||g_0|| u) / (1 + c^2), u a unit vector.
    mean = jacobian.mean(axis=0)
    scale = np.linalg.norm(jacobian, axis=1).max()
    distance = np.linalg.norm((1 + c**2) * direction - mean)
    assert distance <= c * np.linalg.norm(mean) + 1e-5 * scale


@pytest.mark.parametrize("c", [0.2, 0.5, 2.0])
@pytest.mark.parametrize("jacobian", conflicting_jacobians())
def test_cagrad_improves_the_worst_task_within_its_ball(jacobian, c):
    direction, _ = aggregate(CAGrad(c=c, rescale=0), jacobian)
    mean = jacobian.mean(axis=0)
    scale = np.trace(jacobian @ jacobian.T)
    assert np.min(jacobian @ direction) >= np.min(jacobian @ mean) - 1e-3 * scale
    distance = np.linalg.norm(direction - mean)
    assert distance <= c * np.linalg.norm(mean) * (1 + 1e-3) + 1e-3 * np.sqrt(scale)


def test_cagrad_of_orthogonal_unit_gradients_by_hand():
    # Symmetry puts w at (1/2, 1/2), so g_w = g_0 and d = (1 + c) g_0.
    direction, weights = aggregate(CAGrad(c=0.5, rescale=0), [[1.0, 0.0], [0.0, 1.0]])
    np.testing.assert_allclose(direction, [0.75, 0.75], rtol=1e-4)
    np.testing.assert_allclose(weights, [0.75, 0.75], rtol=1e-4)


def test_cagrad_rescales_the_direction():
    jacobian = conflicting_jacobians(1)[0]
    plain = aggregate(CAGrad(c=0.4, rescale=0), jacobian)[0]
    for rescale, factor in [(1, 1 + 0.4**2), (2, 1.4)]:
        rescaled = aggregate(CAGrad(c=0.4, rescale=rescale), jacobian)[0]
        np.testing.assert_allclose(rescaled, plain / factor, rtol=1e-5, atol=1e-6)


# IMTL-G


@pytest.mark.parametrize("seed", range(4))
def test_imtl_g_projects_equally_onto_every_unit_gradient(seed):
    jacobian = random_jacobian(2 + seed, 8, seed)
    direction, weights = aggregate(IMTLG(), jacobian)
    units = jacobian / np.linalg.norm(jacobian, axis=1, keepdims=True)
    projections = units @ direction
    np.testing.assert_allclose(projections, projections[0], rtol=2e-3)
    np.testing.assert_allclose(weights.sum(), 1.0, rtol=1e-5)


def test_imtl_g_of_orthogonal_gradients_by_hand():
    # 2 w_1 = w_2 and w_1 + w_2 = 1.
    direction, weights = aggregate(IMTLG(), [[2.0, 0.0], [0.0, 1.0]])
    np.testing.assert_allclose(weights, [1 / 3, 2 / 3], rtol=1e-3)
    np.testing.assert_allclose(direction, [2 / 3, 2 / 3], rtol=1e-3)


def test_imtl_g_gives_a_zero_gradient_no_weight():
    direction, weights = aggregate(IMTLG(), [[1.0, 2.0], [0.0, 0.0]])
    np.testing.assert_allclose(weights, [1.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(direction, [1.0, 2.0], rtol=1e-6)


# Nash-MTL


def normalized_gram(jacobian):
    gram = jacobian.astype("float64") @ jacobian.T
    return gram / np.linalg.norm(gram)


@pytest.mark.parametrize("seed", range(4))
def test_nash_mtl_weights_solve_the_bargaining_equations(seed):
    norms = np.array([[0.1], [1.0], [5.0], [20.0], [0.5]])
    jacobian = random_jacobian(2 + seed, 10, seed) * norms[: 2 + seed]
    _, alpha = aggregate(NashMTL(max_norm=0.0), jacobian)
    assert np.all(alpha > 0)
    products = alpha * (normalized_gram(jacobian) @ alpha)
    np.testing.assert_allclose(products, 1.0, rtol=2e-3)


def test_nash_mtl_of_orthogonal_gradients_by_hand():
    # G = diag(4, 1) / sqrt(17), so alpha_i = 1 / sqrt(G_ii).
    _, alpha = aggregate(NashMTL(max_norm=0.0), [[2.0, 0.0], [0.0, 1.0]])
    np.testing.assert_allclose(alpha, 17**0.25 * np.array([0.5, 1.0]), rtol=1e-3)


def test_nash_mtl_clips_the_direction_to_max_norm():
    jacobian = 100.0 * random_jacobian(3, 10, seed=2)
    _, alpha = aggregate(NashMTL(max_norm=0.0), jacobian)
    direction, weights = aggregate(NashMTL(max_norm=2.0), jacobian)
    np.testing.assert_allclose(np.linalg.norm(direction), 2.0, rtol=1e-4)
    np.testing.assert_allclose(weights / alpha, weights[0] / alpha[0], rtol=1e-4)
    small = 1e-3 * jacobian
    _, small_alpha = aggregate(NashMTL(max_norm=0.0), small)
    np.testing.assert_allclose(
        aggregate(NashMTL(max_norm=2.0), small)[1], small_alpha, rtol=1e-5
    )


def test_nash_mtl_reuses_alpha_between_updates():
    first, second = random_jacobian(3, 10, seed=3), random_jacobian(3, 10, seed=4)
    expected_first = aggregate(NashMTL(max_norm=0.0), first)[1]
    expected_second = aggregate(NashMTL(max_norm=0.0), second)[1]
    method = built(NashMTL(update_every=2, max_norm=0.0), 3)
    steps = [aggregate(method, jacobian)[1] for jacobian in (first, second, second)]
    np.testing.assert_allclose(steps[0], expected_first, rtol=1e-4)
    np.testing.assert_allclose(steps[1], expected_first, rtol=1e-4)
    np.testing.assert_allclose(steps[2], expected_second, rtol=1e-4)
    # Evaluation neither counts a step nor stores alpha.
    aggregate(method, first, training=False)
    np.testing.assert_allclose(to_numpy(method.alpha), expected_second, rtol=1e-4)
    np.testing.assert_allclose(aggregate(method, first)[1], steps[2], rtol=1e-4)


# Aligned-MTL


def test_aligned_mtl_scales_orthogonal_gradients_to_the_smallest_norm():
    direction, weights = aggregate(AlignedMTL(), [[3.0, 0.0], [0.0, 1.0]])
    np.testing.assert_allclose(weights, [1 / 3, 1.0], rtol=1e-4)
    np.testing.assert_allclose(direction, [1.0, 1.0], rtol=1e-4)
    direction, weights = aggregate(AlignedMTL(), [[2.0, 0.0], [0.0, 2.0]])
    np.testing.assert_allclose(weights, [1.0, 1.0], rtol=1e-5)


def test_aligned_mtl_keeps_its_step_for_rank_deficient_jacobians():
    # Parallel rows g and 2g: rank 1, B = v v^T with v = (1, 2) / sqrt(5).
    direction, weights = aggregate(AlignedMTL(), [[1.0, 0.0], [2.0, 0.0]])
    np.testing.assert_allclose(weights, [0.6, 1.2], rtol=1e-4)
    np.testing.assert_allclose(direction, [3.0, 0.0], rtol=1e-4)
    jacobian = random_jacobian(3, 1000, seed=5)
    jacobian[2] = jacobian[0] + jacobian[1]
    smallest_nonzero = np.linalg.svd(jacobian, compute_uv=False)[1]
    direction, _ = aggregate(AlignedMTL(), jacobian)
    assert np.linalg.norm(direction) > 0.5 * smallest_nonzero


# Every method


@pytest.mark.parametrize("name", sorted(METHODS))
def test_direction_is_the_weighted_sum_of_the_rows(name):
    for jacobian in conflicting_jacobians(4):
        direction, weights = aggregate(METHODS[name](), jacobian)
        np.testing.assert_allclose(direction, weights @ jacobian, rtol=1e-5, atol=1e-5)


DEGENERATE = {
    "zero_row": [[1.0, 2.0, -1.0], [0.0, 0.0, 0.0], [-1.0, 0.5, 1.0]],
    "parallel_rows": [[1.0, 2.0, -1.0], [2.0, 4.0, -2.0], [-0.5, -1.0, 0.5]],
    "identical_rows": [[1.0, 2.0, -1.0], [1.0, 2.0, -1.0], [0.0, 1.0, 3.0]],
    "opposite_rows": [[1.0, 2.0, -1.0], [-1.0, -2.0, 1.0]],
    "single_task": [[1.0, -2.0, 3.0]],
    "all_zero": [[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]],
    "tiny": [[1e-20, 0.0], [0.0, 3e-20]],
    "huge": [[1e15, 0.0], [-1e15, 2e15]],
}


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("case", sorted(DEGENERATE))
def test_degenerate_jacobians_stay_finite(name, case):
    jacobian = np.asarray(DEGENERATE[case], "float32")
    method = built(METHODS[name](), len(jacobian))
    for losses in (np.ones(len(jacobian)), np.zeros(len(jacobian))):
        direction, weights = aggregate(method, jacobian, losses)
        assert np.all(np.isfinite(direction)) and np.all(np.isfinite(weights))
    for variable in method.non_trainable_variables:
        assert np.all(np.isfinite(to_numpy(variable)))
    if case == "all_zero":
        np.testing.assert_array_equal(direction, [0.0, 0.0])
    if case == "single_task":
        np.testing.assert_allclose(direction, weights[0] * jacobian[0], rtol=1e-6)


def test_flags_and_argument_checks():
    for method_class in (MGDA, IMTLG, AlignedMTL):
        assert method_class(wrt="representation").wrt == "representation"
    for method_class in (UPGrad, DualProj, CAGrad, ConFIG, NashMTL):
        with pytest.raises(ValueError, match="wrt='representation'"):
            method_class(wrt="representation")
    with pytest.raises(ValueError, match="normalization"):
        MGDA("l1")
    with pytest.raises(ValueError, match="rescale"):
        CAGrad(rescale=3)
    with pytest.raises(ValueError, match="`c`"):
        CAGrad(c=-1.0)
    with pytest.raises(ValueError, match="update_every"):
        NashMTL(update_every=0)


@pytest.mark.parametrize(
    "method",
    [
        MGDA("loss+", wrt="representation"),
        UPGrad(),
        DualProj(),
        ConFIG(),
        CAGrad(c=0.3, rescale=2),
        IMTLG(wrt="representation"),
        NashMTL(update_every=3, max_norm=0.5, iterations=12),
        AlignedMTL(wrt="representation"),
    ],
    ids=lambda method: type(method).__name__,
)
def test_get_config_round_trip(method):
    config = method.get_config()
    restored = type(method).from_config(config)
    assert restored.get_config() == config
    serialized = keras.saving.serialize_keras_object(method)
    assert type(keras.saving.deserialize_keras_object(serialized)) is type(method)


# Compiled


@pytest.mark.parametrize("name", sorted(METHODS))
def test_compiled_aggregate_matches_eager(name):
    kwargs = {"update_every": 2} if name == "nash_mtl" else {}
    compiled = built(METHODS[name](**kwargs), 3)
    eager = built(METHODS[name](**kwargs), 3)
    for step in range(3):
        jacobian = random_jacobian(3, 7, seed=10 + step)
        losses = [1.0, 0.5, 0.8**step]
        result = compiled_aggregate(compiled, jacobian, losses)
        expected = aggregate(eager, jacobian, losses)
        np.testing.assert_allclose(result[0], expected[0], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(result[1], expected[1], rtol=1e-4, atol=1e-5)
    for variable, other in zip(compiled.weights, eager.weights):
        np.testing.assert_allclose(to_numpy(variable), to_numpy(other), rtol=1e-4)
