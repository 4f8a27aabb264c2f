"""IMTL-G, the gradient-balancing half of impartial multi-task learning."""

import keras
from keras import ops

from keras_dwo.weighting import min_norm
from keras_dwo.weighting.base import GradientWeighting


@keras.saving.register_keras_serializable(package="keras_dwo")
class IMTLG(GradientWeighting):
    """IMTL-G: the combination with equal projections onto every task gradient.

    The direction `d = sum_i w_i g_i`, with weights summing to 1, has the same
    inner product with every unit task gradient `g_i / ||g_i||`. In closed
    form: `G w = c n` with `G = J J^T` and `n` the gradient norms, so
    `w = G^{-1} n / (1^T G^{-1} n)`, the paper's solution written in the
    `(T, T)` Gram space. `G` is trace-normalised and regularised as in
    `min_norm` (`+ 1e-6 I`), which keeps the solve finite for parallel or
    zero gradients; a zero gradient gets weight 0. Where no direction has
    positive equal projections, `1^T G^{-1} n` vanishes and the paper's
    weights diverge; here the sum is kept at least `1e-6` times
    `sum_i |(G^{-1} n)_i|`, which bounds the weights by `1e6`. An all-zero
    Jacobian gets the weights `1/T`.

    Args:
        wrt: `"parameters"` (default) or `"representation"`: the cheaper
            gradients of the shared representation, which LibMTL also offers.
        **kwargs: Passed to `GradientWeighting`.

    References:
        - Liu, Li, Kuang, Xue, Chen, Yang, Liao and Zhang, "Towards Impartial
          Multi-task Learning", ICLR 2021.
    """

    allows_representation = True

    def aggregate(self, jacobian, losses, training=True):
        gram = ops.matmul(jacobian, ops.transpose(jacobian))
        norms = ops.sqrt(ops.maximum(ops.diagonal(gram), 0.0))
        # The scale of `norms` cancels in the normalisation below.
        solution = ops.solve(min_norm.regularized_gram(gram), norms[:, None])[:, 0]
        total = ops.sum(solution)
        magnitude = ops.sum(ops.abs(solution))
        floor = 1e-6 * magnitude
        total = ops.where(
            total >= 0, ops.maximum(total, floor), ops.minimum(total, -floor)
        )
        weights = solution / ops.where(magnitude > 0, total, ops.ones_like(total))
        num_tasks = ops.shape(gram)[0]
        weights = ops.where(magnitude > 0, weights, 1.0 / num_tasks)
        return ops.matmul(weights, jacobian), weights
