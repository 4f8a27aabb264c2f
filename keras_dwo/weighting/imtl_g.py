"""IMTL-G, the gradient-balancing half of impartial multi-task learning."""

import keras
from keras import ops

from keras_dwo.weighting.base import GradientWeighting
from keras_dwo.weighting.gram import combination
from keras_dwo.weighting.gram import finite_gram

# Float32 cosines of parallel gradients are off by about 1e-7; a ridge three
# orders above that keeps their solution equal for every task order.
RIDGE = 1e-4


@keras.saving.register_keras_serializable(package="keras_dwo")
class IMTLG(GradientWeighting):
    """IMTL-G: the combination with equal projections onto every task gradient.

    The direction `d = sum_i w_i g_i`, with weights summing to 1, has the same
    inner product with every unit task gradient `g_i / ||g_i||`. In closed
    form: `G w = c n` with `G = J J^T` and `n` the gradient norms, so
    `w = G^{-1} n / (1^T G^{-1} n)`, the paper's solution written in the
    `(T, T)` Gram space. It is solved as `C v = c 1` for `v = D^{1/2} w`,
    with `C = D^{-1/2} G D^{-1/2}` the unit-diagonal matrix of gradient
    cosines (`D = diag(G)`) plus a ridge of `1e-4 I`:
    tasks of very different gradient norms keep a well-conditioned system,
    every task is treated alike, and parallel gradients, for which the
    paper's inverse does not exist, get a finite solution (the equal
    combination of their unit gradients). A zero gradient gets weight 0.
    Where no direction has positive equal projections, `1^T G^{-1} n`
    vanishes and the paper's weights diverge; here the sum is kept at least
    `1e-6` times `sum_i |(G^{-1} n)_i|`, which bounds the weights by `1e6`.
    An all-zero Jacobian gets the weights `1/T`.

    Args:
        wrt: `"parameters"` (default) or `"representation"`: the cheaper
            gradients of the shared representation, which LibMTL also offers.
        **kwargs: Passed to `GradientWeighting`.

    References:
        - Liu, Li, Kuang, Xue, Chen, Yang, Liao and Zhang, "Towards Impartial
          Multi-task Learning", ICLR 2021.
    """

    allows_representation = True

    def aggregate(self, jacobian, losses, training=True, present=None):
        raw_gram = ops.matmul(jacobian, ops.transpose(jacobian))
        gram = finite_gram(raw_gram)
        norms = ops.sqrt(ops.maximum(ops.diagonal(gram), 0.0))
        # An absent task's row is zero, so it drops out with the others.
        del present
        nonzero = norms > 0
        safe_norms = ops.where(nonzero, norms, 1.0)
        # G w = c n is, for v = D^(1/2) w, the system C v = c 1 with the
        # unit-diagonal C = D^(-1/2) G D^(-1/2): its conditioning does not
        # suffer from tasks of different gradient norms, and it treats
        # every task alike. A zero gradient gets an identity row.
        pairs = ops.logical_and(nonzero[:, None], nonzero[None, :])
        correlations = ops.where(
            pairs, gram / (safe_norms[:, None] * safe_norms[None, :]), 0.0
        )
        identity = ops.eye(ops.shape(gram)[0], dtype=gram.dtype)
        correlations = ops.where(pairs, correlations, identity)
        unit_weights = ops.solve(
            correlations + RIDGE * identity,
            ops.ones_like(norms)[:, None],
        )[:, 0]
        solution = ops.where(nonzero, unit_weights / safe_norms, 0.0)
        total = ops.sum(solution)
        magnitude = ops.sum(ops.abs(solution))
        floor = 1e-6 * magnitude
        total = ops.where(
            total >= 0, ops.maximum(total, floor), ops.minimum(total, -floor)
        )
        weights = solution / ops.where(magnitude > 0, total, ops.ones_like(total))
        num_tasks = ops.shape(gram)[0]
        weights = ops.where(magnitude > 0, weights, 1.0 / num_tasks)
        return combination(weights, jacobian, raw_gram)
