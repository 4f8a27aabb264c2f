"""Smooth Tchebycheff scalarisation, STCH (Lin et al. 2024)."""

import keras
from keras import ops

from keras_dwo.arguments import checked_number
from keras_dwo.weighting.base import LossWeighting
from keras_dwo.weighting.base import positive_presence


@keras.saving.register_keras_serializable(package="keras_dwo")
class STCH(LossWeighting):
    """STCH: a smooth maximum of the log losses relative to a nadir point.

    After a warm-up, the objective is the smooth Tchebycheff scalarisation
    of the log losses relative to the nadir point `z` (the losses of the
    warm-up), `T mu log sum_i exp((l_i - max_j l_j) / mu)` with
    `l_i = log((L_i + epsilon) / (z_i + epsilon))`, as LibMTL and the
    paper's code write it (the maximum, held constant, only keeps the
    exponentials finite), T the number of tasks taking part. Its gradient
    weighs each task by
    `T softmax(l / mu)_i / (L_i + epsilon)`: the task that has improved
    least relative to where it started gets most of the step, more sharply
    as `mu` shrinks (the Tchebycheff scalarisation, the maximum, as
    `mu -> 0`).

    During the first `warmup_steps + nadir_steps` training steps the
    objective is the sum of the log losses, `sum_i log(L_i + epsilon)`, and
    the nadir point is the mean of each task's losses over the last
    `nadir_steps` of them (LibMTL warms up for 4 epochs and takes the mean
    over the fifth: `warmup_steps=4 * steps_per_epoch,
    nadir_steps=steps_per_epoch`). By default the first step's losses are
    the nadir point. A task without labels in those steps takes its first
    labelled loss after them. The step count and the nadir point are
    non-trainable variables, saved with the model, so a resumed run carries
    on where it stopped.

    The logarithm is defined for positive losses only: a task whose loss is
    not positive is left out of the step, as a task without labels is.
    Evaluation reports the objective of the phase the training is in.

    Args:
        mu: The smoothing, positive (default 1.0, LibMTL's).
        warmup_steps: Training steps on the sum of log losses before the
            nadir point is measured (default 0).
        nadir_steps: Training steps whose losses are averaged into the
            nadir point, at least 1 (default 1).
        epsilon: Added to every loss and nadir value before the logarithm,
            as for `ScaleInvariant`, so that a tiny loss gets a bounded
            weight.
        **kwargs: Passed to `LossWeighting`.

    References:
        - Lin, Zhang, Zhong, Liu, Zhang and Ye, "Smooth Tchebycheff
          Scalarization for Multi-Objective Optimization", ICML 2024.
    """

    def __init__(self, mu=1.0, warmup_steps=0, nadir_steps=1, epsilon=1e-8, **kwargs):
        super().__init__(**kwargs)
        if int(warmup_steps) < 0:
            raise ValueError(
                f"`warmup_steps` must be non-negative; received {warmup_steps}."
            )
        if int(nadir_steps) < 1:
            raise ValueError(
                f"`nadir_steps` must be at least 1; received {nadir_steps}."
            )
        self.mu = checked_number("mu", mu, low=0, low_open=True)
        self.warmup_steps = int(warmup_steps)
        self.nadir_steps = int(nadir_steps)
        self.epsilon = checked_number("epsilon", epsilon, low=0)

    def build(self, task_names):
        super().build(task_names)
        shape = (len(task_names),)
        self.steps = self.add_weight(
            shape=(), initializer="zeros", trainable=False, name="steps"
        )
        self.nadir_sum = self.add_weight(
            shape=shape, initializer="zeros", trainable=False, name="nadir_sum"
        )
        self.nadir_count = self.add_weight(
            shape=shape, initializer="zeros", trainable=False, name="nadir_count"
        )

    def call(self, losses, training=False, present=None):
        present = positive_presence(present, losses)
        shifted = ops.where(present > 0, losses, 1.0) + self.epsilon
        steps = ops.convert_to_tensor(self.steps)
        nadir_sum = ops.convert_to_tensor(self.nadir_sum)
        nadir_count = ops.convert_to_tensor(self.nadir_count)
        measured = nadir_count > 0
        warming_up = steps < self.warmup_steps + self.nadir_steps

        # Only the tasks present, with a nadir point, take part.
        taking_part = ops.logical_and(present > 0, measured)
        nadir = ops.where(measured, nadir_sum / ops.maximum(nadir_count, 1.0), 1.0)
        relative = ops.log(shifted / (nadir + self.epsilon))
        largest = ops.amax(ops.where(taking_part, relative, -float("inf")))
        largest = ops.stop_gradient(ops.where(ops.isfinite(largest), largest, 0.0))
        exponentials = ops.where(
            taking_part, ops.exp((relative - largest) / self.mu), 0.0
        )
        total = ops.sum(exponentials)
        participants = ops.sum(ops.cast(taking_part, losses.dtype))
        smooth_maximum = (
            participants * self.mu * ops.log(ops.where(total > 0, total, 1.0))
        )
        shares = ops.divide_no_nan(exponentials, total)
        log_sum = ops.sum(present * ops.log(shifted))

        objective = ops.where(warming_up, log_sum, smooth_maximum)
        weights = ops.where(warming_up, present, participants * shares) / shifted
        if training:
            in_window = ops.logical_and(steps >= self.warmup_steps, warming_up)
            # After the window, a task not yet measured takes its first loss.
            unmeasured = ops.logical_and(
                ops.logical_not(warming_up), ops.logical_not(measured)
            )
            measuring = ops.logical_and(
                present > 0, ops.logical_or(in_window, unmeasured)
            )
            self.nadir_sum.assign(nadir_sum + ops.where(measuring, losses, 0.0))
            self.nadir_count.assign(nadir_count + ops.cast(measuring, "float32"))
            self.steps.assign(steps + 1.0)
        return objective, ops.stop_gradient(weights)

    def get_config(self):
        return {
            **super().get_config(),
            "mu": self.mu,
            "warmup_steps": self.warmup_steps,
            "nadir_steps": self.nadir_steps,
            "epsilon": self.epsilon,
        }
