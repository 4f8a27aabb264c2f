"""Multiple-gradient descent, MGDA (Sener and Koltun 2018)."""

import keras
from keras import ops

from keras_dwo.weighting import min_norm
from keras_dwo.weighting.base import GradientWeighting

NORMALIZATIONS = ("none", "l2", "loss", "loss+")


@keras.saving.register_keras_serializable(package="keras_dwo")
class MGDA(GradientWeighting):
    """MGDA: the minimum-norm point of the convex hull of the task gradients.

    The direction is `d = sum_i w_i g_i / s_i` with `w` the minimiser of
    `||sum_i w_i g_i / s_i||` over the probability simplex: the Frank-Wolfe
    problem of the paper, solved exactly by `min_norm.simplex_min_norm` (for
    any number of tasks). Unless it is zero, the direction has a
    positive inner product with every (normalised) task gradient, so a small
    enough step decreases every loss; it is zero only at a Pareto-stationary
    point. The normalisers `s_i` are

    - `"none"`: 1 (the paper's algorithm);
    - `"l2"`: the gradient norm `||g_i||`;
    - `"loss"`: the task loss `L_i`;
    - `"loss+"`: `L_i ||g_i||`.

    A normaliser that is not positive (a zero gradient, a zero loss) is
    replaced by 1. The reported weights are the coefficients of the original
    gradients, `w_i / s_i`; they sum to 1 for `"none"`. With
    `wrt="representation"` this is MGDA-UB, the paper's upper-bound
    approximation, which differentiates only with respect to the shared
    representation.

    Args:
        normalization: One of `"none"` (default, as in LibMTL), `"l2"`,
            `"loss"` or `"loss+"`.
        wrt: `"parameters"` (default) or `"representation"` (MGDA-UB).
        **kwargs: Passed to `GradientWeighting`.

    Example:

    ```python
    mgda = keras_dwo.weighting.MGDA()
    mgda.combine([[1.0, 0.0], [0.0, 1.0]], [1.0, 1.0])  # [0.5, 0.5]
    model = keras_dwo.DynamicWeightedModel(
        inputs, outputs, weighting=keras_dwo.weighting.MGDA(wrt="representation"))
    ```

    References:
        - Sener and Koltun, "Multi-Task Learning as Multi-Objective
          Optimization", NeurIPS 2018.
        - Désidéri, "Multiple-gradient descent algorithm (MGDA) for
          multiobjective optimization", Comptes Rendus Mathematique 2012.
    """

    allows_representation = True

    def __init__(self, normalization="none", wrt="parameters", **kwargs):
        super().__init__(wrt=wrt, **kwargs)
        if normalization not in NORMALIZATIONS:
            raise ValueError(
                f"`normalization` must be one of {NORMALIZATIONS}; received "
                f"{normalization!r}."
            )
        self.normalization = normalization

    def _normalizers(self, gram, losses):
        norms = ops.sqrt(ops.maximum(ops.diagonal(gram), 0.0))
        normalizers = {
            "none": ops.ones_like(losses),
            "l2": norms,
            "loss": losses,
            "loss+": losses * norms,
        }[self.normalization]
        return ops.where(normalizers > 0, normalizers, ops.ones_like(normalizers))

    def gram_weights(self, gram, losses, training=True, present=None):
        inverse = 1.0 / self._normalizers(gram, losses)
        normalized_gram = gram * inverse[:, None] * inverse[None, :]
        weights = min_norm.simplex_min_norm(normalized_gram, present=present) * inverse
        return weights

    def get_config(self):
        return {**super().get_config(), "normalization": self.normalization}
