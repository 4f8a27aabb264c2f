"""Aligned-MTL (Senushkin et al. 2023)."""

import keras
from keras import ops

from keras_dwo.weighting.base import GradientWeighting
from keras_dwo.weighting.gram import finite_gram

RELATIVE_RANK_TOLERANCE = 1e-5


@keras.saving.register_keras_serializable(package="keras_dwo")
class AlignedMTL(GradientWeighting):
    """Aligned-MTL: task gradients made orthogonal and of equal norm, then summed.

    With the eigen-decomposition `G = J J^T = V diag(lambda) V^T`, the
    balance matrix `B = sqrt(lambda_min) V diag(lambda)^{-1/2} V^T` maps the
    task gradients to `B J`: the nearest matrix with orthonormal rows to `J`
    (the orthogonal Procrustes solution), scaled by the smallest singular
    value `sqrt(lambda_min)` of `J`. The direction is the sum of those rows,
    `1^T B J`, so the weights are `B 1`, as in the official code (TorchJD
    uses their mean). Orthogonal gradients of equal norm are left unchanged;
    otherwise the step size follows the smallest singular value.

    A rank-deficient Jacobian is handled as in the official code, through
    the eigenvalues above a threshold only. The threshold is
    `1e-5 * lambda_max` instead of the official `T * eps * lambda_max`
    (`eps` = 1.2e-7 in float32): the float32 Gram matrix of an exactly
    rank-deficient Jacobian has spurious eigenvalues of up to about
    `1e-7 * lambda_max`, close to the official threshold, and one taken for
    the smallest singular value would shrink the step to almost nothing.
    An all-zero Jacobian gets the weights 1.

    Args:
        wrt: `"parameters"` (default) or `"representation"`: the
            upper-bound variant on the gradients of the shared
            representation (Aligned-MTL-UB in the paper).
        **kwargs: Passed to `GradientWeighting`.

    References:
        - Senushkin, Patakin, Kuznetsov and Konushin, "Independent Component
          Alignment for Multi-Task Learning", CVPR 2023.
    """

    allows_representation = True

    def gram_weights(self, gram, losses, training=True, present=None):
        # An absent task's zero row gives a zero eigenvalue, whose eigenvector
        # is left out; the other eigenvectors are 0 at that task.
        del present
        gram = finite_gram(gram)
        trace = ops.trace(gram)
        # An overflowing trace leaves the zero matrix, which decomposes.
        gram = gram / ops.where(trace > 0, trace, ops.ones_like(trace))
        eigenvalues, eigenvectors = ops.eigh(gram)
        largest = ops.amax(eigenvalues)
        kept = eigenvalues > RELATIVE_RANK_TOLERANCE * largest
        inverse_roots = ops.where(
            kept,
            ops.rsqrt(ops.where(kept, eigenvalues, ops.ones_like(eigenvalues))),
            ops.zeros_like(eigenvalues),
        )
        smallest = ops.amin(ops.where(kept, eigenvalues, largest))
        # B 1 = sqrt(lambda_min) V diag(lambda^{-1/2}) V^T 1.
        weights = ops.sqrt(smallest) * ops.matmul(
            eigenvectors,
            inverse_roots * ops.matmul(ops.ones_like(eigenvalues), eigenvectors),
        )
        weights = ops.where(ops.any(kept), weights, ops.ones_like(weights))
        return weights
