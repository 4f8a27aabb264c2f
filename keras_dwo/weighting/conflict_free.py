"""Conflict-free inverse gradients, ConFIG (Liu et al. 2025)."""

import keras
from keras import ops

from keras_dwo.weighting.base import GradientWeighting
from keras_dwo.weighting.gram import cosine_matrix
from keras_dwo.weighting.gram import finite_gram
from keras_dwo.weighting.imtl_g import CUTOFF

# Below this fraction of `||1||`, the part of the ones vector in the range of
# the cosine matrix is float32 rounding: the unit gradients' pseudo-inverse
# sends the ones vector to 0 (for example, two opposite gradients), and the
# direction is 0.
DEGENERATE = 1e-4


def config_weights(gram, present=None):
    """Returns the coefficients of ConFIG's direction in the task gradients.

    With the unit gradients `u_i = g_i / n_i` (rows of `U`, a zero gradient's
    row 0) and their cosine matrix `C = U U^T`, the direction is
    `d = (sum_i g_i . b) b` with `b = U^+ 1 / ||U^+ 1||`. As
    `U^+ 1 = U^T C^+ 1`, everything is in the `(T, T)` Gram space: with
    `a = C^+ 1`, `||U^+ 1||^2 = a^T C a` and `sum_i g_i . U^T a = n^T C a`,
    so `d = sum_i w_i g_i` with `w = (a / n) (n^T C a) / (a^T C a)`. `C^+`
    comes from the eigen-decomposition of `C`, its eigenvalues at most
    `imtl_g.CUTOFF` (1e-5) times the largest counting as zero, as in IMTL-G.

    Args:
        gram: `(T, T)` finite Gram matrix `J J^T`.
        present: None, or the `(T,)` presence mask; an absent task is
            treated as a zero gradient.

    Returns:
        The `(T,)` weights; all 0 where the ones vector is, to within
        `DEGENERATE`, orthogonal to the range of `C` (including `G = 0`).
    """
    if present is not None:
        kept = ops.cast(present, gram.dtype) > 0
        gram = ops.where(ops.logical_and(kept[:, None], kept[None, :]), gram, 0.0)
    norms = ops.sqrt(ops.maximum(ops.diagonal(gram), 0.0))
    nonzero = norms > 0
    cosines = cosine_matrix(gram, norms)

    eigenvalues, eigenvectors = ops.eigh(cosines)
    keep = eigenvalues > CUTOFF * ops.amax(eigenvalues)
    inverse_eigenvalues = ops.where(keep, 1.0 / ops.where(keep, eigenvalues, 1.0), 0.0)
    # The ones vector in the eigenbasis, restricted to the range of C.
    ones = ops.where(keep, ops.sum(eigenvectors, axis=0), 0.0)
    # a = C^+ 1, C a (the projection of 1 onto the range) and a^T C a.
    inverse_ones = ops.matmul(eigenvectors, ones * inverse_eigenvalues)
    projected_ones = ops.matmul(eigenvectors, ones)
    squared_length = ops.sum(ones * ones * inverse_eigenvalues)

    count = ops.sum(ops.cast(nonzero, gram.dtype))
    degenerate = ops.sum(ones * ones) <= DEGENERATE**2 * count
    scale = ops.sum(norms * projected_ones) / ops.where(degenerate, 1.0, squared_length)
    safe_norms = ops.where(nonzero, norms, 1.0)
    weights = ops.where(nonzero, inverse_ones / safe_norms, 0.0) * scale
    return ops.where(degenerate, 0.0, weights)


@keras.saving.register_keras_serializable(package="keras_dwo")
class ConFIG(GradientWeighting):
    """ConFIG: the direction with equal cosines to every task gradient.

    The direction's unit vector `b` is the normalised minimum-norm solution
    of `u_i . b = 1` for every unit task gradient `u_i = g_i / ||g_i||`,
    `U^+ 1 / ||U^+ 1||`, so that it makes the same positive angle with every
    task gradient (where the gradients are linearly independent); its
    length is the sum of the gradients' projections on it:
    `d = (sum_i g_i . b) b`. This is equation 2 of the paper as TorchJD's
    `ConFIG` aggregator defines it, with its default preference vector of
    ones. The pseudo-inverse is computed in the `(T, T)` space of the
    cosines `U U^T` (see `config_weights`), so the method costs a Gram
    matrix and a `(T, T)` eigen-decomposition, and `d = w^T J` with the
    reported weights `w`.

    Special cases:

    - Linearly dependent gradients (more tasks than the rank of the
      Jacobian, parallel or duplicated gradients) use the pseudo-inverse,
      as TorchJD does; eigenvalues of the cosine matrix below `1e-5` times
      its largest count as zero (TorchJD's `torch.linalg.pinv` cuts
      singular values of `U` below `max(T, P)` machine epsilons instead).
      The cosines are then not all equal.
    - Where the pseudo-inverse sends the ones vector to 0 (two opposite
      gradients, whatever their norms), the direction is 0, as in
      TorchJD, whose normalisation of a zero vector gives 0.
    - A zero gradient, or an absent task (`present` 0), has a zero unit
      vector, as in TorchJD, and gets weight 0.
    - A non-finite Gram matrix (a non-finite or overflowing gradient) gives
      non-finite weights and step, which the model's guard drops.

    Args:
        **kwargs: Passed to `GradientWeighting`.

    Example:

    ```python
    method = ConFIG()
    method.combine([[1.0, 0.0], [0.0, 1.0]], [1.0, 1.0])  # [1.0, 1.0]
    method.combine([[1.0, 0.0], [-2.0, 0.0]], [1.0, 1.0])  # [0.0, 0.0]
    model = keras_dwo.DynamicWeightedModel(inputs, outputs, weighting="config")
    ```

    References:
        - Liu, Chu, Thuerey, "ConFIG: Towards Conflict-free Training of
          Physics Informed Neural Networks", ICLR 2025.
        - Quinton and Rey, "Jacobian Descent for Multi-Objective
          Optimization", arXiv:2406.16232, 2024 (TorchJD).
    """

    def gram_weights(self, gram, losses, training=True, present=None):
        weights = config_weights(finite_gram(gram), present)
        return weights
