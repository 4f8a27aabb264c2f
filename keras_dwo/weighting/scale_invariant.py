"""Scale-invariant (log) losses, as studied by Navon et al. 2022."""

import keras
from keras import ops

from keras_dwo.weighting.base import LossWeighting
from keras_dwo.weighting.base import presence


@keras.saving.register_keras_serializable(package="keras_dwo")
class ScaleInvariant(LossWeighting):
    """Sum of log losses: `sum_i log(L_i + epsilon)`.

    The gradient weighs task i by `1 / (L_i + epsilon)`, so multiplying a loss
    by a constant does not change the update. Task losses must be
    non-negative.

    Args:
        epsilon: Small constant that keeps the logarithm finite at zero loss.
        **kwargs: Passed to `LossWeighting`.

    References:
        - Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik and Fetaya,
          "Multi-Task Learning as a Bargaining Game", ICML 2022 (the SI
          baseline).
    """

    def __init__(self, epsilon=1e-8, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = float(epsilon)

    def call(self, losses, training=False, present=None):
        present = presence(present, losses)
        shifted = losses + self.epsilon
        return (
            ops.sum(present * ops.log(shifted)),
            ops.stop_gradient(present / shifted),
        )

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon}
