"""ExcessMTL: weights that follow each task's excess risk (He et al. 2024)."""

import keras
from keras import ops

from keras_dwo.arguments import checked_number
from keras_dwo.weighting.base import GradientWeighting
from keras_dwo.weighting.base import presence

EPSILON = 1e-7


@keras.saving.register_keras_serializable(package="keras_dwo")
class ExcessMTL(GradientWeighting):
    """ExcessMTL: raises the weights of the tasks furthest from their optimum.

    A task's excess risk, how far its loss is above the lowest it could
    reach, is estimated from a second-order model with an AdaGrad-like
    diagonal curvature: with `s_i` the running sum of the squares of task
    i's gradients (state, one `(T, P)` variable),

        s_i <- s_i + g_i^2,   e_i = sum(g_i^2 / sqrt(s_i + eps)).

    The first step records each task's `e_i` as its scale; at every later
    step the loss weights (state, summing to T) take a step of
    exponentiated gradient ascent on the scaled estimates,

        w_i <- w_i exp(step_size e_i / e_i^(0)),   then w <- T w / sum(w),

    and the direction is `sum_i w_i g_i`, the gradient of the weighted
    loss (the task heads take their weighted losses too). Tasks whose
    gradients are noise rather than signal keep a small excess risk, so the
    weights resist label noise, the paper's aim.

    A task without a label in the batch keeps its state and weight; the
    present tasks' weights keep their sum. The state has one entry per
    shared parameter, made when the model plans its first step; the method
    needs the parameters' gradients (no `wrt="representation"`).

    Args:
        step_size: Step of the weights' update (default 0.01).
        **kwargs: Passed to `GradientWeighting`.

    References:
        - He, Zhou, Zhao and Han, "Robust Multi-Task Learning with Excess
          Risks", ICML 2024.
        - Lin and Zhang, "LibMTL: A Python Library for Multi-Task Learning",
          JMLR 2023 (`ExcessMTL`).
    """

    column_state = True
    weights_heads = True

    def __init__(self, step_size=0.01, **kwargs):
        super().__init__(**kwargs)
        self.step_size = checked_number("step_size", step_size, low=0, low_open=True)

    def build(self, task_names):
        super().build(task_names)
        num_tasks = len(task_names)
        self.loss_weights = self.add_weight(
            shape=(num_tasks,), initializer="ones", trainable=False, name="loss_weights"
        )
        self.initial_excess = self.add_weight(
            shape=(num_tasks,),
            initializer="zeros",
            trainable=False,
            name="initial_excess",
        )

    def build_columns(self, group_sizes):
        super().build_columns(group_sizes)
        self.squared_sums = self.per_column_weight("squared_sums")

    def aggregate(self, jacobian, losses, training=True, present=None):
        present = presence(present, losses)
        squares = ops.square(jacobian)
        self.checked_column_groups(jacobian)
        sums = ops.convert_to_tensor(self.squared_sums) + squares
        excess = ops.sum(squares / ops.sqrt(sums + EPSILON), axis=1)
        initial = ops.convert_to_tensor(self.initial_excess)
        started = ops.cast(initial > 0, "float32") * present
        initial = ops.where((present > 0) & (initial <= 0), excess, initial)
        weights = ops.convert_to_tensor(self.loss_weights)
        raised = weights * ops.exp(
            started * self.step_size * ops.divide_no_nan(excess, initial)
        )
        # The updated tasks' weights keep their sum.
        scale = ops.divide_no_nan(ops.sum(weights * started), ops.sum(raised * started))
        raised = ops.where(started > 0, raised * scale, weights)
        if training:
            self.squared_sums.assign(sums)
            self.initial_excess.assign(initial)
            self.loss_weights.assign(raised)
        weights = raised * present
        return ops.matmul(weights, jacobian), weights

    def get_config(self):
        return {**super().get_config(), "step_size": self.step_size}
