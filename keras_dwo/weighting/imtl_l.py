"""IMTL-L, the loss-balancing half of impartial multi-task learning."""

import keras
from keras import ops

from keras_dwo.layers.uncertainty_weighting import MAX_ABS_LOG_VARIANCE
from keras_dwo.layers.uncertainty_weighting import Bounded
from keras_dwo.weighting.base import LossWeighting
from keras_dwo.weighting.base import presence


@keras.saving.register_keras_serializable(package="keras_dwo")
class IMTLL(LossWeighting):
    """Learned loss scales that make every scaled loss equal: IMTL-L.

    Each task has a trainable scale `s_i` (initialised at 0) and the objective
    is `sum_i exp(s_i) L_i - s_i`; its minimum in `s_i` is `exp(s_i) L_i = 1`,
    so every scaled loss is driven to the same value. The logged weight is
    `exp(s_i)`. The rule is uncertainty weighting with `s_i` in place of
    `-log(sigma_i^2)`; it is kept under its own name because the paper pairs
    it with IMTL-G.

    A task loss that stays at 0 (or a task weight of 0) drives its `s_i` up
    at every step, without end; as for uncertainty weighting, the scales are
    bounded to `[-20, 20]` (a constraint on the variable, which the
    optimizer applies after each update, and clipping in the objective), so
    the objective and the weights stay finite, at most `exp(20)`, about
    `5e8`.

    Args:
        **kwargs: Passed to `LossWeighting`.

    References:
        - Liu, Li, Kuang, Xue, Chen, Yang, Liao and Zhang, "Towards Impartial
          Multi-task Learning", ICLR 2021.
    """

    def build(self, task_names):
        super().build(task_names)
        self.loss_scale_bounds = Bounded(-MAX_ABS_LOG_VARIANCE, MAX_ABS_LOG_VARIANCE)
        self.loss_scales = self.add_weight(
            shape=(len(task_names),),
            initializer="zeros",
            constraint=self.loss_scale_bounds,
            name="loss_scales",
        )

    def call(self, losses, training=False, present=None):
        present = presence(present, losses)
        log_scales = self.loss_scale_bounds.differentiable_clip(self.loss_scales)
        scales = ops.exp(log_scales)
        return ops.sum(present * (scales * losses - log_scales)), present * scales
