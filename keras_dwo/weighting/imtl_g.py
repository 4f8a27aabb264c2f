"""IMTL-G, the gradient-balancing half of impartial multi-task learning."""

import keras
from keras import ops

from keras_dwo.weighting.base import GradientWeighting
from keras_dwo.weighting.gram import cosine_matrix
from keras_dwo.weighting.gram import finite_gram

# Eigenvalues of the cosine matrix below this fraction of its largest one are
# treated as zero. Float32 rounding leaves the zero eigenvalues of an exactly
# rank-deficient cosine matrix at up to about 4e-7 of the largest (measured
# with 1e6 parameters on the three backends), so the cutoff sits 25 times
# above that floor, while two gradients still count as independent down to
# about 0.4 degrees apart (their eigenvalues' ratio is (1 - cos) / (1 + cos)).
CUTOFF = 1e-5

# Below this fraction of `sum |v_i|`, `sum v_i` (v = G^+ n) is too close to
# cancelling for its sign and size to be trusted in float32, and the weights
# `v / sum v` would exceed 1e4 in absolute sum.
DEGENERATE = 1e-4


def imtl_g_weights(gram, present=None):
    """Returns the IMTL-G weights `G^+ n / (1^T G^+ n)` of a Gram matrix.

    `G^+` is the pseudo-inverse of `G` and `n` the gradient norms. With the
    gradients `g_i = n_i u_i` and their cosine matrix `C = U U^T`,
    `G = N C N` for `N = diag(n)`. Float32 gives the entries of `C` to about
    the same absolute precision whatever the norms, so the rank is decided
    on `C`: eigenvalues at most `CUTOFF` times the largest are dropped. With
    `Q_r`, `L_r` the kept eigenvectors and eigenvalues and `N Q_r = Q R` (a
    QR decomposition), `G = Q R L_r R^T Q^T`, so
    `G^+ n = Q R^{-T} L_r^{-1} R^{-1} Q^T n`. Decomposing `G` itself would
    not do: its eigenvalues span the squared ratio of the norms, and for
    norms 1e4 apart the smaller tasks would fall below float32's resolution.

    Linearly independent gradients keep float32 accuracy for norms 1e12
    apart. Linearly dependent ones are more sensitive: rounding the rows to
    float32 couples them by about 1e-7, which a ratio K between the norms
    amplifies, to relative errors of a few times 1e-8 K in the step.

    The tasks are processed in order of decreasing norm, which suits the QR
    decomposition of rows of very different sizes and makes the result
    independent of the order in which the tasks come.

    Args:
        gram: `(T, T)` finite Gram matrix `J J^T`.
        present: None, or the `(T,)` presence mask; an absent task is
            treated as a zero gradient.

    Returns:
        The `(T,)` weights, summing to 1, or all 0 where `1^T G^+ n` is at
        most `DEGENERATE` times `sum |G^+ n|` (including `G = 0`).
    """
    num_tasks = ops.shape(gram)[0]
    if present is not None:
        kept = ops.cast(present, gram.dtype) > 0
        gram = ops.where(ops.logical_and(kept[:, None], kept[None, :]), gram, 0.0)
    norms = ops.sqrt(ops.maximum(ops.diagonal(gram), 0.0))
    # Decreasing norms; undone on the weights at the end.
    order = ops.argsort(-norms)
    norms = ops.take(norms, order)
    gram = ops.take(ops.take(gram, order, axis=0), order, axis=1)

    nonzero = norms > 0
    # A zero gradient's task is in the null space of the cosine matrix, and
    # the kept eigenvectors are 0 there.
    cosines = cosine_matrix(gram, norms)
    identity = ops.eye(num_tasks, dtype=gram.dtype)

    eigenvalues, eigenvectors = ops.eigh(cosines)
    # Decreasing, so that the kept eigenvectors are the leading columns.
    eigenvalues = ops.flip(eigenvalues, axis=0)
    eigenvectors = ops.flip(eigenvectors, axis=1)
    keep = eigenvalues > CUTOFF * eigenvalues[0]
    keep_mask = ops.cast(keep, gram.dtype)
    inverse_eigenvalues = ops.where(keep, 1.0 / ops.where(keep, eigenvalues, 1.0), 0.0)

    # Norms relative to the largest, so that every entry is at most 1.
    largest = norms[0]
    scaled_norms = norms / ops.where(largest > 0, largest, 1.0)
    basis, triangle = ops.qr(scaled_norms[:, None] * eigenvectors * keep_mask[None, :])
    # The leading block of R belongs to the kept columns; the identity
    # elsewhere leaves the dropped ones at 0 instead of dividing by 0.
    triangle = triangle * (keep_mask[:, None] * keep_mask[None, :]) + identity * (
        1.0 - keep_mask
    )
    solution = ops.matmul(scaled_norms, basis) * keep_mask
    solution = ops.solve_triangular(triangle, solution[:, None], lower=False)
    solution = solution * inverse_eigenvalues[:, None]
    solution = ops.solve_triangular(ops.transpose(triangle), solution, lower=True)[:, 0]
    solution = ops.matmul(basis, solution * keep_mask)
    solution = ops.where(nonzero, solution, 0.0)

    total = ops.sum(solution)
    degenerate = ops.abs(total) <= DEGENERATE * ops.sum(ops.abs(solution))
    weights = ops.where(degenerate, 0.0, solution / ops.where(degenerate, 1.0, total))
    return ops.take(weights, ops.argsort(order))


@keras.saving.register_keras_serializable(package="keras_dwo")
class IMTLG(GradientWeighting):
    """IMTL-G: the combination with equal projections onto every task gradient.

    The direction `d = sum_i w_i g_i`, with weights summing to 1, has the same
    inner product with every unit task gradient `u_i = g_i / ||g_i||`. The
    paper's closed form, `w_{2:T} = g_1 U^T (D U^T)^{-1}` and
    `w_1 = 1 - sum_{t>1} w_t` (rows `g_1 - g_t` of `D` and `u_1 - u_t` of
    `U`), is, in the `(T, T)` Gram space, `w = G^{-1} n / (1^T G^{-1} n)`
    with `G = J J^T` and `n` the gradient norms. Where the gradients are
    linearly dependent (more tasks than the rank of the Jacobian, parallel
    or duplicated gradients), `G` has no inverse and its pseudo-inverse
    `G^+` takes its place, as in TorchJD's `IMTLG`: the step
    `J^T G^+ n / (1^T G^+ n)` is then `J^+ n`, the minimum-norm
    least-squares solution of `g_i . d = n_i`, scaled so that the weights
    sum to 1. Eigenvalues of the cosine matrix below `1e-5` times its
    largest count as zero (for two gradients: less than about 0.4 degrees
    apart). The result does not depend on the order of the tasks beyond
    float32 rounding.

    Special cases:

    - Parallel gradients `g_i = s_i n_i u` (`s_i = +1` or `-1`) get the
      weights `s_i n_i / sum_j s_j n_j` and the step
      `(sum_j n_j^2 / sum_j s_j n_j) u`: the gradient itself for equal
      gradients, `(5/3) u` for `u` and `2 u`, and `-5 u` for `u` and
      `-2 u`. As the angle between two gradients shrinks to 0, the paper's
      closed form tends to `(2 n_1 n_2 / (n_1 + n_2)) u` instead (`(4/3) u`
      for `u` and `2 u`): the pseudo-inverse is not continuous there.
    - A zero gradient, or an absent task (`present` 0), gets weight 0 and
      the others are weighted as if it were not there.
    - Where `1^T G^+ n` cancels, to within `1e-4` times `sum |(G^+ n)_i|`,
      no step balances the tasks (for example, opposite gradients of equal
      norm, for which `G^+ n = 0`): the weights are all 0, and so is the
      step. An all-zero Jacobian gets zero weights too.
    - A negative `1^T G^+ n` is kept, as in the paper and TorchJD: the
      weights sum to 1, and for independent gradients the common
      projection `1 / (1^T G^+ n)` of the step onto the unit gradients is
      negative, so the step raises every loss to first order. This happens
      even without conflicts, for example with a small gradient between
      two larger orthogonal ones.
    - A non-finite Gram matrix (a non-finite or overflowing gradient) gives
      non-finite weights and step, which the model's guard drops.

    Args:
        wrt: `"parameters"` (default) or `"representation"`: the cheaper
            gradients of the shared representation, which LibMTL also offers.
        **kwargs: Passed to `GradientWeighting`.

    References:
        - Liu, Li, Kuang, Xue, Chen, Yang, Liao and Zhang, "Towards Impartial
          Multi-task Learning", ICLR 2021.
        - Quinton and Rey, "Jacobian Descent for Multi-Objective
          Optimization", 2024 (the pseudo-inverse form).
    """

    allows_representation = True

    def gram_weights(self, gram, losses, training=True, present=None):
        weights = imtl_g_weights(finite_gram(gram), present)
        return weights
