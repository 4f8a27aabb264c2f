"""Geometric loss strategy, GLS (Chennupati et al. 2019)."""

import keras
from keras import ops

from keras_dwo.weighting.base import LossWeighting
from keras_dwo.weighting.base import positive_presence


@keras.saving.register_keras_serializable(package="keras_dwo")
class GLS(LossWeighting):
    """Geometric mean of the task losses: `(prod_i L_i)^(1/T)`.

    Its gradient weighs task i by `G / (T L_i)`, where `G` is the geometric
    mean, so the objective is invariant to rescaling any one loss. It is
    computed as `exp(mean(log L_i))` for numerical range.

    The geometric mean is defined for positive losses only: a task whose loss
    is 0 (as a task weight of 0 makes it) or negative is treated in that step
    exactly like an absent task (`present` 0): it is left out of the mean and
    gets the weight 0. If no task is left, the objective is the constant 1.

    Args:
        **kwargs: Passed to `LossWeighting`.

    References:
        - Chennupati, Sistu, Yogamani and Rawashdeh, "MultiNet++: Multi-Stream
          Feature Aggregation and Geometric Loss Strategy for Multi-Task
          Learning", CVPR Workshops 2019.
    """

    def call(self, losses, training=False, present=None):
        present = positive_presence(present, losses)
        # The geometric mean of the positive losses present.
        losses = ops.where(present > 0, losses, 1.0)
        count = ops.maximum(ops.sum(present), 1.0)
        objective = ops.exp(ops.sum(present * ops.log(losses)) / count)
        weights = ops.stop_gradient(present * objective / (count * losses))
        return objective, weights
