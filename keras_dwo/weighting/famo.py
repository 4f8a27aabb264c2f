"""Fast adaptive multitask optimization, FAMO (Liu et al. 2023)."""

import keras
from keras import ops

from keras_dwo.weighting.adam import AdamMoments
from keras_dwo.weighting.base import LossWeighting
from keras_dwo.weighting.base import presence


@keras.saving.register_keras_serializable(package="keras_dwo")
class FAMO(LossWeighting):
    """FAMO: balances the rates at which the task losses decrease, in O(1).

    Task logits `xi` give `z = softmax(xi)`. The model minimises
    `sum_i z_i log(L_i - m_i + epsilon) / c` with `c = sum_i z_i / (L_i - m_i
    + epsilon)` (z and c held constant), so task i's gradient is weighted by
    `z_i / (c (L_i - m_i + epsilon))`, the logged weight. After each optimizer
    step the model evaluates the same batch again and calls `update`, which
    moves the logits along `delta_i = log(L_i before) - log(L_i after)`
    through the softmax Jacobian with Adam (learning rate `learning_rate`, L2
    decay `gamma`), as the paper's Algorithm 1 does. That extra forward pass
    costs about a third of a step. The logits and their Adam moments are
    non-trainable variables, saved with the model.

    Args:
        learning_rate: Adam learning rate of the logits (paper: 0.025).
        gamma: L2 decay of the logits (official code: 1e-5).
        min_losses: Optional sequence of T lower bounds `m_i` of the losses
            (default 0).
        epsilon: Small constant inside the logarithm.
        beta_1: Adam's first-moment decay for the logits.
        beta_2: Adam's second-moment decay for the logits.
        **kwargs: Passed to `LossWeighting`.

    References:
        - Liu, Feng, Stone and Liu, "FAMO: Fast Adaptive Multitask
          Optimization", NeurIPS 2023.
    """

    updates_after_step = True

    def __init__(
        self,
        learning_rate=0.025,
        gamma=1e-5,
        min_losses=None,
        epsilon=1e-8,
        beta_1=0.9,
        beta_2=0.999,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.learning_rate = float(learning_rate)
        self.gamma = float(gamma)
        self.min_losses = None if min_losses is None else [float(m) for m in min_losses]
        self.epsilon = float(epsilon)
        self.beta_1 = float(beta_1)
        self.beta_2 = float(beta_2)

    def build(self, task_names):
        super().build(task_names)
        shape = (len(task_names),)
        if self.min_losses is not None and len(self.min_losses) != len(task_names):
            raise ValueError(
                f"`min_losses` has {len(self.min_losses)} entries for "
                f"{len(task_names)} tasks."
            )
        self.logits = self.add_weight(
            shape=shape, initializer="zeros", trainable=False, name="logits"
        )
        self.logits_adam = AdamMoments(
            self, shape, "logits", beta_1=self.beta_1, beta_2=self.beta_2
        )

    def task_probabilities(self, present=None):
        """Returns `softmax(xi)`, the share of each task (of those present)."""
        if present is None:
            return ops.softmax(self.logits)
        shares = present * ops.exp(self.logits - ops.max(self.logits))
        return shares / ops.sum(shares)

    def _shifted(self, losses):
        if self.min_losses is not None:
            losses = losses - ops.convert_to_tensor(self.min_losses, losses.dtype)
        return losses + self.epsilon

    def call(self, losses, training=False, present=None):
        present = presence(present, losses)
        z = self.task_probabilities(present)
        # An absent task's loss is 0; a loss of 1 there keeps the log finite.
        shifted = ops.where(present > 0, self._shifted(losses), 1.0)
        normaliser = ops.stop_gradient(ops.sum(z / shifted))
        objective = ops.sum(z * ops.log(shifted)) / normaliser
        weights = ops.stop_gradient(z / (normaliser * shifted))
        return objective, weights

    def update(self, losses_before, losses_after, present=None):
        present = presence(present, losses_before)

        def log_shifted(losses):
            return ops.log(ops.where(present > 0, self._shifted(losses), 1.0))

        delta = log_shifted(losses_before) - log_shifted(losses_after)
        z = self.task_probabilities(present)
        gradient = z * (delta - ops.sum(z * delta)) + self.gamma * self.logits
        step = self.logits_adam.step(present * gradient)
        self.logits.assign(self.logits - self.learning_rate * present * step)

    def get_config(self):
        return {
            **super().get_config(),
            "learning_rate": self.learning_rate,
            "gamma": self.gamma,
            "min_losses": self.min_losses,
            "epsilon": self.epsilon,
            "beta_1": self.beta_1,
            "beta_2": self.beta_2,
        }
