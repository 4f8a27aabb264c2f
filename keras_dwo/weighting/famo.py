"""Fast adaptive multitask optimization, FAMO (Liu et al. 2023)."""

import keras
from keras import ops

from keras_dwo.arguments import checked_number
from keras_dwo.weighting.adam import AdamMoments
from keras_dwo.weighting.base import LossWeighting
from keras_dwo.weighting.base import positive_presence

UPDATES = ("same_batch", "next_batch")


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

    `update="next_batch"` skips the extra forward pass: each training step
    first moves the logits along `delta_i = log(L_i of the previous batch,
    before its step) - log(L_i of this batch, before this step)`, losses the
    step computes anyway, and then weights this step's losses with them.
    The change of the losses is then measured across two batches, so it
    carries their sampling noise as well as the step's effect. Where every
    step sees the same data (full-batch training) and the forward pass does
    not depend on `training` (no dropout, no batch normalization), the two
    updates are the same. The previous losses are non-trainable variables
    too, so a resumed run continues the same sequence.

    The logarithms are defined for losses above their lower bounds only: a
    task whose loss is not above `m_i` (a loss of 0, as a task weight of 0
    makes it, or a negative one) is treated in that step exactly like an
    absent task (`present` 0): it drops out of the objective and gets the
    weight 0, and in `update` (where both losses must be above `m_i`) its
    logit and Adam moments stay exactly as they were.

    Args:
        learning_rate: Adam learning rate of the logits (paper: 0.025).
        gamma: L2 decay of the logits (official code: 1e-5).
        min_losses: Optional sequence of T lower bounds `m_i` of the losses
            (default 0).
        epsilon: Small constant inside the logarithm.
        beta_1: Adam's first-moment decay for the logits.
        beta_2: Adam's second-moment decay for the logits.
        update: `"same_batch"` (default, the paper's): the logits learn
            from the losses of the same batch after the step, which costs
            a forward pass. `"next_batch"`: from the next batch's losses
            before its step, at no extra cost (see above).
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
        update="same_batch",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if update not in UPDATES:
            raise ValueError(f"`update` must be one of {UPDATES}; received {update!r}.")
        self.update_from = update
        self.updates_after_step = update == "same_batch"
        self.learning_rate = checked_number(
            "learning_rate", learning_rate, low=0, low_open=True
        )
        self.gamma = checked_number("gamma", gamma, low=0)
        self.min_losses = None
        if min_losses is not None:
            self.min_losses = [
                checked_number(f"min_losses[{index}]", value)
                for index, value in enumerate(min_losses)
            ]
        self.epsilon = checked_number("epsilon", epsilon, low=0)
        self.beta_1 = checked_number("beta_1", beta_1, low=0, high=1, high_open=True)
        self.beta_2 = checked_number("beta_2", beta_2, low=0, high=1, high_open=True)

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
        if self.update_from == "next_batch":
            self.previous_losses = self.add_weight(
                shape=shape, initializer="zeros", trainable=False, name="previous"
            )
            # 1 where the previous batch had a loss above the task's bound.
            self.previous_present = self.add_weight(
                shape=shape,
                initializer="zeros",
                trainable=False,
                name="previous_present",
            )

    def task_probabilities(self, present=None):
        """Returns `softmax(xi)`, the share of each task (of those present)."""
        if present is None:
            return ops.softmax(self.logits)
        logits = ops.convert_to_tensor(self.logits)
        shares = present * ops.exp(logits - ops.amax(logits))
        # No task present: every share is 0.
        return ops.divide_no_nan(shares, ops.sum(shares))

    def _gaps(self, losses):
        """Returns `L_i - m_i`, the losses above their lower bounds."""
        if self.min_losses is None:
            return losses
        return losses - ops.convert_to_tensor(self.min_losses, losses.dtype)

    def _shifted(self, gaps, present):
        # An absent task's gap may be 0 or negative; 1 there keeps the log
        # finite, and its share is 0.
        return ops.where(present > 0, gaps + self.epsilon, 1.0)

    def call(self, losses, training=False, present=None):
        gaps = self._gaps(losses)
        present = positive_presence(present, gaps)
        if training and self.update_from == "next_batch":
            self._update_from_previous_batch(losses, present)
        z = self.task_probabilities(present)
        shifted = self._shifted(gaps, present)
        normaliser = ops.stop_gradient(ops.sum(z / shifted))
        normaliser = ops.where(normaliser > 0, normaliser, 1.0)
        objective = ops.sum(z * ops.log(shifted)) / normaliser
        weights = ops.stop_gradient(z / (normaliser * shifted))
        return objective, weights

    def _update_from_previous_batch(self, losses, present):
        losses = ops.stop_gradient(losses)
        previous_present = ops.convert_to_tensor(self.previous_present)
        previous_losses = ops.convert_to_tensor(self.previous_losses)
        # The first step, or a task absent from either batch, moves nothing.
        self.update(
            ops.where(previous_present > 0, previous_losses, losses),
            losses,
            present=previous_present * present,
        )
        self.previous_losses.assign(ops.where(present > 0, losses, previous_losses))
        self.previous_present.assign(present)

    def update(self, losses_before, losses_after, present=None):
        gaps_before = self._gaps(losses_before)
        gaps_after = self._gaps(losses_after)
        present = positive_presence(positive_presence(present, gaps_before), gaps_after)
        delta = ops.log(self._shifted(gaps_before, present)) - ops.log(
            self._shifted(gaps_after, present)
        )
        z = self.task_probabilities(present)
        gradient = z * (delta - ops.sum(z * delta)) + self.gamma * self.logits
        step = self.logits_adam.step(gradient, present)
        logits = ops.convert_to_tensor(self.logits)
        self.logits.assign(
            ops.where(present > 0, logits - self.learning_rate * step, logits)
        )

    def get_config(self):
        return {
            **super().get_config(),
            "learning_rate": self.learning_rate,
            "gamma": self.gamma,
            "min_losses": self.min_losses,
            "epsilon": self.epsilon,
            "beta_1": self.beta_1,
            "beta_2": self.beta_2,
            "update": self.update_from,
        }
