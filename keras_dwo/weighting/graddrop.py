"""Gradient sign dropout, GradDrop (Chen et al. 2020)."""

import keras
from keras import ops

from keras_dwo.arguments import checked_number
from keras_dwo.weighting.base import GradientWeighting
from keras_dwo.weighting.random_state import RandomState


@keras.saving.register_keras_serializable(package="keras_dwo")
class GradDrop(RandomState, GradientWeighting):
    """GradDrop: keeps, coordinate by coordinate, the task gradients of one sign.

    For every coordinate of the Jacobian the sign purity is
    `P = (1 + sum_i g_i / sum_i |g_i|) / 2`, the share of the gradient mass
    that is positive. With `U ~ U[0, 1)` drawn per coordinate, the positive
    task gradients are kept where `P > U` and the negative ones where
    `P < U`, so each coordinate of the direction has the sign of one side
    only, the side chosen with probability proportional to its mass. A
    dropped gradient keeps the fraction `leak` of itself. The direction is
    the sum of the kept gradients; where all tasks agree in sign, everything
    is kept.

    The masks are drawn for each coordinate of the flattened Jacobian: with
    `wrt="representation"` that is every sample and feature. The paper pools
    the representation gradients over the batch, signed by the activations,
    before computing the purity; the Jacobian arrives without the
    activations, so that variant is not done here.

    The direction is not a linear combination of the task gradients. The
    reported `weights` are, for each task, the fraction of its gradient's
    L1 mass that the direction kept: `sum |kept g_i| / sum |g_i|`, between
    `leak` and 1 (1 for a zero gradient, which loses nothing). The draws come
    from a `keras.random.SeedGenerator` saved with the model.

    Args:
        leak: Fraction of a dropped gradient that is kept, in [0, 1]
            (default 0, the paper's GradDrop; LibMTL's default too).
        seed: Optional integer seed of the draws.
        **kwargs: Passed to `GradientWeighting`.

    References:
        - Chen, Ngiam, Huang, Luong, Kretzschmar, Chai and Anguelov, "Just
          Pick a Sign: Optimizing Deep Multitask Models with Gradient Sign
          Dropout", NeurIPS 2020.
    """

    allows_representation = True

    def __init__(self, leak=0.0, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.leak = checked_number("leak", leak, low=0, high=1)
        self.seed = seed

    def aggregate(self, jacobian, losses, training=True, present=None):
        # An absent task's zero row adds nothing to the sign purity.
        del losses, present
        magnitudes = ops.abs(jacobian)
        # Sums over tasks as products with a row of ones: XLA on CPU reduces
        # the leading axis of a wide matrix some 50 times slower.
        ones = ops.ones_like(magnitudes[:, 0])
        purity = 0.5 * (
            1.0
            + ops.divide_no_nan(
                ops.matmul(ones, jacobian), ops.matmul(ones, magnitudes)
            )
        )
        draws = self.uniform(ops.shape(purity), training)
        kept_sign = ops.logical_or(
            ops.logical_and(jacobian > 0, purity > draws),
            ops.logical_and(jacobian < 0, purity < draws),
        )
        kept = jacobian * (
            self.leak + (1.0 - self.leak) * ops.cast(kept_sign, "float32")
        )
        mass = ops.sum(magnitudes, axis=1)
        kept_mass = ops.sum(ops.abs(kept), axis=1)
        weights = ops.where(mass > 0, ops.divide_no_nan(kept_mass, mass), 1.0)
        # A column with a NaN or an infinity has a NaN purity and is dropped,
        # and XLA folds the product of its NaN with 0 to 0; the direction
        # must stay non-finite there for the guard that drops the step.
        direction = ops.where(
            ops.isfinite(purity), ops.matmul(ones, kept), float("nan")
        )
        return direction, weights

    def get_config(self):
        return {**super().get_config(), "leak": self.leak, "seed": self.seed}
