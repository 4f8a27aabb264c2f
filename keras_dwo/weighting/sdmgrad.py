"""SDMGrad: direction-oriented multi-objective gradients (Xiao et al. 2023)."""

import keras
from keras import ops

from keras_dwo.weighting.base import GradientWeighting
from keras_dwo.weighting.base import presence
from keras_dwo.weighting.simplex import present_share
from keras_dwo.weighting.simplex import project_to_simplex

EPSILON = 1e-8


@keras.saving.register_keras_serializable(package="keras_dwo")
class SDMGrad(GradientWeighting):
    """SDMGrad: MGDA's weights regularised toward the mean gradient, stochastically.

    The direction is `d = (G^T w + lambda g_0) / (1 + lambda)`, with `g_0`
    the mean task gradient and `w` on the simplex minimising
    `||G^T w + lambda g_0||^2`. Per training step, `w` takes `iterations`
    projected SGD steps (learning rate 5, momentum 0.5, the authors')
    on that objective, whose gradient `H w + lambda H 1 / T` uses
    `H = G_a G_b^T` from two independently sampled Jacobians, normalised by
    the mean of its diagonal's square roots, squared.

    The paper samples three batches per step (`G_a`, `G_b` and one for the
    direction). Here `G_a` is the previous step's Jacobian (state, one
    `(T, P)` variable), independent of the current batch's, which is `G_b`
    and gives the direction: no extra passes, at the price of gradients one
    step old in the weights' update. The logged weights are the
    coefficients of the task gradients in the direction,
    `(w + lambda / T) / (1 + lambda)`. A task without a label in the batch
    keeps its weight and stored gradient and is left out of the step. The
    method needs the parameters' gradients (no `wrt="representation"`).

    Args:
        regularization: `lambda`, the pull toward the mean gradient
            (default 0.3).
        iterations: Projected SGD steps on `w` per training step
            (default 20).
        learning_rate: Their learning rate (default 5.0).
        momentum: Their momentum (default 0.5).
        **kwargs: Passed to `GradientWeighting`.

    References:
        - Xiao, Ban and Ji, "Direction-oriented Multi-objective Learning:
          Simple and Provable Stochastic Algorithms", NeurIPS 2023.
        - Lin and Zhang, "LibMTL: A Python Library for Multi-Task Learning",
          JMLR 2023 (`SDMGrad`, defaults).
    """

    column_state = True

    def __init__(
        self,
        regularization=0.3,
        iterations=20,
        learning_rate=5.0,
        momentum=0.5,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if regularization < 0.0:
            raise ValueError(
                f"`regularization` must be >= 0; received {regularization}."
            )
        if int(iterations) < 1:
            raise ValueError(f"`iterations` must be >= 1; received {iterations}.")
        if learning_rate <= 0.0:
            raise ValueError(
                f"`learning_rate` must be positive; received {learning_rate}."
            )
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"`momentum` must be in [0, 1); received {momentum}.")
        self.regularization = float(regularization)
        self.iterations = int(iterations)
        self.learning_rate = float(learning_rate)
        self.momentum = float(momentum)

    def build(self, task_names):
        super().build(task_names)
        self.simplex_weights = self.add_weight(
            shape=(len(task_names),),
            initializer=keras.initializers.Constant(1.0 / len(task_names)),
            trainable=False,
            name="simplex_weights",
        )

    def build_columns(self, group_sizes):
        super().build_columns(group_sizes)
        self.previous_jacobian = self.per_column_weight("previous_jacobian")

    def aggregate(self, jacobian, losses, training=True, present=None):
        self.checked_column_groups(jacobian)
        present = presence(present, losses)
        count = ops.maximum(ops.sum(present), 1.0)
        previous = ops.convert_to_tensor(self.previous_jacobian)
        cross = ops.matmul(previous, ops.transpose(jacobian))
        roots = ops.sqrt(ops.maximum(ops.diagonal(cross), 0.0))
        scale = ops.sum(roots * present) / count
        cross = cross / (ops.square(scale) + EPSILON)
        mean_row = ops.matmul(cross, present) / count
        stored = ops.convert_to_tensor(self.simplex_weights)
        weights = present_share(stored, present)
        velocity = ops.zeros_like(weights)
        for _ in range(self.iterations):
            gradient = ops.matmul(cross, weights) + self.regularization * mean_row
            velocity = self.momentum * velocity + gradient
            weights = project_to_simplex(
                weights - self.learning_rate * velocity, present
            )
        if training:
            kept = ops.expand_dims(present, 1) > 0
            self.previous_jacobian.assign(ops.where(kept, jacobian, previous))
            self.simplex_weights.assign(ops.where(present > 0, weights, stored))
        coefficients = (weights + self.regularization * present / count) / (
            1.0 + self.regularization
        )
        return ops.matmul(coefficients, jacobian), coefficients

    def get_config(self):
        return {
            **super().get_config(),
            "regularization": self.regularization,
            "iterations": self.iterations,
            "learning_rate": self.learning_rate,
            "momentum": self.momentum,
        }
