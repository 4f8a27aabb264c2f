"""Scale-invariant (log) losses, as studied by Navon et al. 2022."""

import keras
from keras import ops

from keras_dwo.arguments import checked_number
from keras_dwo.weighting.base import LossWeighting
from keras_dwo.weighting.base import positive_presence


@keras.saving.register_keras_serializable(package="keras_dwo")
class ScaleInvariant(LossWeighting):
    """Sum of log losses: `sum_i log(L_i + epsilon)`.

    The gradient weighs task i by `1 / (L_i + epsilon)`, so multiplying a loss
    by a constant does not change the update.

    The logarithm is defined for positive losses only: a task whose loss is 0
    (as a task weight of 0 makes it) or negative is treated in that step
    exactly like an absent task (`present` 0): its term drops out of the
    objective and it gets the weight 0.

    Args:
        epsilon: Small constant that bounds the weight `1 / (L_i + epsilon)`
            of a tiny positive loss.
        **kwargs: Passed to `LossWeighting`.

    References:
        - Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik and Fetaya,
          "Multi-Task Learning as a Bargaining Game", ICML 2022 (the SI
          baseline).
    """

    def __init__(self, epsilon=1e-8, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = checked_number("epsilon", epsilon, low=0)

    def call(self, losses, training=False, present=None):
        present = positive_presence(present, losses)
        shifted = ops.where(present > 0, losses, 1.0) + self.epsilon
        return (
            ops.sum(present * ops.log(shifted)),
            ops.stop_gradient(present / shifted),
        )

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon}
