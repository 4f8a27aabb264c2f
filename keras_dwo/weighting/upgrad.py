"""Unconflicting projection of gradients, UPGrad (Quinton and Rey 2024)."""

import keras
from keras import ops

from keras_dwo.weighting import min_norm
from keras_dwo.weighting.base import GradientWeighting
from keras_dwo.weighting.base import presence
from keras_dwo.weighting.gram import finite_gram

# TorchJD's default size of the regularisation, here relative to each task's
# own squared gradient norm.
RIDGE = 1e-4
# Relative to the trace, for the tasks whose gradient is zero.
FLOOR = 1e-8


def dual_cone_weights(gram, lower):
    """Returns the weights of the projections of `u^T J` onto the dual cone.

    For each row `u` of `lower`, the projection of the combination `u^T J`
    of the task gradients onto the dual cone of the rows of `J` (the
    directions `x` with `g_j . x >= 0` for every j) is `v^T J`, with
    `v = argmin_{v >= u} v^T G v` (Quinton and Rey 2024, Proposition 1).
    UPGrad projects each gradient (`u = e_i`), DualProj their mean. `G` is
    regularised as `G + 1e-4 diag(G)`, plus `1e-8` of its trace on the
    diagonal (see `UPGrad`).

    Args:
        gram: `(T, T)` finite Gram matrix `J J^T` (see `gram.finite_gram`).
        lower: `(N, T)` combinations `u` to project, one per row.

    Returns:
        The `(N, T)` weights `v`, each at least its `u`.
    """
    identity = ops.eye(ops.shape(gram)[0], dtype=gram.dtype)
    return min_norm.lower_bounded_min_norm(
        gram + RIDGE * identity * gram, lower, ridge=FLOOR
    )


@keras.saving.register_keras_serializable(package="keras_dwo")
class UPGrad(GradientWeighting):
    """UPGrad: the mean of the task gradients projected onto their dual cone.

    Each task gradient `g_i` is projected onto the dual cone of all the task
    gradients, the directions `x` with `g_j . x >= 0` for every j, and the
    direction is the mean of the projections. It therefore has a
    non-negative inner product with every task gradient, and equals the mean
    gradient when no two gradients conflict. In the dual, the projection of
    `g_i` is `sum_j w^(i)_j g_j` with `w^(i) = argmin_{w >= e_i} w^T G w`
    (`G = J J^T`); the reported weights are the mean of the `w^(i)`, each at
    least `1/T`. The T problems are solved exactly by
    `min_norm.lower_bounded_min_norm` (for any number of tasks).

    The Gram matrix is regularised as `G + 1e-4 diag(G)`, plus `1e-8` of its
    trace on the diagonal for zero gradients: the problem of a Jacobian
    whose row `g_i` is extended by `1e-2 ||g_i||` in a coordinate of its own.
    TorchJD adds `1e-4` times the identity to the trace-normalised matrix
    instead; a ridge relative to each task keeps the method linear under a
    positive scaling of the tasks (scaling `g_i` by `c_i` scales its
    projection by `c_i`), which the paper proves for UPGrad, and lets a task
    with a small gradient keep its share. The regularised direction meets
    `g_j . d >= -1e-4 ||g_j||^2 w_j` for every task, and at a Pareto
    stationary point its norm is of the order of `1e-2` of the gradients'.

    Args:
        **kwargs: Passed to `GradientWeighting`.

    References:
        - Quinton and Rey, "Jacobian Descent for Multi-Objective
          Optimization", arXiv:2406.16232, 2024.
    """

    def gram_weights(self, gram, losses, training=True, present=None):
        gram = finite_gram(gram)
        num_tasks = ops.shape(gram)[0]
        dual_weights = dual_cone_weights(gram, ops.eye(num_tasks, dtype=gram.dtype))
        # The mean of the projections of the gradients present; an absent
        # task's zero row is orthogonal to all, so it is 0 in the others'.
        present = presence(present, losses)
        weights = ops.matmul(present, dual_weights) / ops.sum(present)
        return weights
