"""Dual-Balancing Multi-Task Learning, DB-MTL (Lin et al. 2023)."""

import keras
from keras import ops

from keras_dwo.arguments import checked_number
from keras_dwo.weighting.base import GradientWeighting
from keras_dwo.weighting.base import positive_presence

EPSILON = 1e-8


@keras.saving.register_keras_serializable(package="keras_dwo")
class DBMTL(GradientWeighting):
    """DB-MTL: balances the losses' scales by a logarithm and the gradients' norms.

    Two balancing steps. The loss scale: each task is trained on the
    logarithm of its loss, whose gradient is `g_i / L_i`, so that a task
    whose loss is a hundred times larger gets no larger gradient for it.
    The gradient magnitude: a moving average of each task's log-loss
    gradient (state, one `(T, P)` variable),

        m_i <- h_i + beta_t (m_i - h_i),  h_i = g_i / (L_i + eps),
        beta_t = beta / t^beta_sigma  (t: the step, from 1),

    is rescaled to the largest of their norms, and the direction is their
    sum, `d = sum_i (max_k ||m_k|| / ||m_i||) m_i`. The logged weights are
    those rescaling factors, the coefficients of the moving averages in the
    direction (the direction is not a combination of the current
    gradients alone).

    `g_i` is the gradient of the weighted task loss, so a task weight
    scales its task. The logarithm is defined for positive losses: a task
    whose loss is not positive, or that has no label in the batch, is left
    out of the step and keeps its moving average. The state has one entry
    per shared parameter, made when the model plans its first step; the
    method needs the parameters' gradients (no `wrt="representation"`).

    Args:
        beta: Rate of the moving average (default 0.9, the paper's and
            LibMTL's).
        beta_sigma: Decay of that rate with the step (default 0.5).
        **kwargs: Passed to `GradientWeighting`.

    References:
        - Lin, Ye, Xu, Shi and Zhang, "Dual-Balancing for Multi-Task
          Learning", arXiv:2308.12029, 2023.
        - Lin and Zhang, "LibMTL: A Python Library for Multi-Task Learning",
          JMLR 2023 (`DB_MTL`).
    """

    column_state = True

    def __init__(self, beta=0.9, beta_sigma=0.5, **kwargs):
        super().__init__(**kwargs)
        self.beta = checked_number("beta", beta, low=0, high=1, high_open=True)
        self.beta_sigma = checked_number("beta_sigma", beta_sigma, low=0)

    def build(self, task_names):
        super().build(task_names)
        self.steps = self.add_weight(
            shape=(), initializer="zeros", trainable=False, name="steps"
        )

    def build_columns(self, group_sizes):
        super().build_columns(group_sizes)
        self.moving_gradients = self.per_column_weight("moving_gradients")

    def aggregate(self, jacobian, losses, training=True, present=None):
        present = positive_presence(present, losses)
        step = ops.convert_to_tensor(self.steps) + 1.0
        rate = self.beta / ops.power(step, self.beta_sigma)
        log_gradients = jacobian / ops.expand_dims(ops.abs(losses) + EPSILON, 1)
        self.checked_column_groups(jacobian)
        moving = ops.convert_to_tensor(self.moving_gradients)
        moved = log_gradients + rate * (moving - log_gradients)
        moved = ops.where(ops.expand_dims(present, 1) > 0, moved, moving)
        norms = ops.sqrt(ops.sum(ops.square(moved), axis=1))
        scales = present * ops.amax(norms * present) / (norms + EPSILON)
        if training:
            self.moving_gradients.assign(moved)
            self.steps.assign(step)
        return ops.matmul(scales, moved), scales

    def get_config(self):
        return {
            **super().get_config(),
            "beta": self.beta,
            "beta_sigma": self.beta_sigma,
        }
