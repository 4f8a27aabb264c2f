"""SDMGrad: direction-oriented multi-objective gradients (Xiao et al. 2023)."""

import keras
from keras import ops

from keras_dwo.arguments import checked_number
from keras_dwo.weighting.double_sampling import DoubleSampling
from keras_dwo.weighting.simplex import project_to_simplex

EPSILON = 1e-8


@keras.saving.register_keras_serializable(package="keras_dwo")
class SDMGrad(DoubleSampling):
    """SDMGrad: MGDA's weights regularised toward the mean gradient, stochastically.

    The direction is `d = (G^T w + lambda g_0) / (1 + lambda)`, with `g_0`
    the mean task gradient and `w` on the simplex minimising
    `||G^T w + lambda g_0||^2`. Per training step, `w` takes `iterations`
    projected SGD steps (learning rate 5, momentum 0.5, the authors')
    on that objective, whose gradient `H w + lambda H 1 / T` uses
    `H = G_a G_b^T` from two independently sampled Jacobians, normalised by
    the mean of its diagonal's square roots, squared.

    The paper samples three batches per step (`G_a`, `G_b` and one for the
    direction); here `G_a` is the previous step's Jacobian, see
    `DoubleSampling`. The logged weights are the coefficients of the task
    gradients in the direction, `(w + lambda / T) / (1 + lambda)`. The
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

    def __init__(
        self,
        regularization=0.3,
        iterations=20,
        learning_rate=5.0,
        momentum=0.5,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if int(iterations) < 1:
            raise ValueError(f"`iterations` must be >= 1; received {iterations}.")
        self.regularization = checked_number("regularization", regularization, low=0)
        self.iterations = int(iterations)
        self.learning_rate = checked_number(
            "learning_rate", learning_rate, low=0, low_open=True
        )
        self.momentum = checked_number(
            "momentum", momentum, low=0, high=1, high_open=True
        )

    def step_weights(self, cross, weights, present):
        count = ops.maximum(ops.sum(present), 1.0)
        roots = ops.sqrt(ops.maximum(ops.diagonal(cross), 0.0))
        scale = ops.sum(roots * present) / count
        cross = cross / (ops.square(scale) + EPSILON)
        mean_row = ops.matmul(cross, present) / count
        velocity = ops.zeros_like(weights)
        for _ in range(self.iterations):
            gradient = ops.matmul(cross, weights) + self.regularization * mean_row
            velocity = self.momentum * velocity + gradient
            weights = project_to_simplex(
                weights - self.learning_rate * velocity, present
            )
        return weights

    def coefficients(self, weights, present):
        count = ops.maximum(ops.sum(present), 1.0)
        return (weights + self.regularization * present / count) / (
            1.0 + self.regularization
        )

    def get_config(self):
        return {
            **super().get_config(),
            "regularization": self.regularization,
            "iterations": self.iterations,
            "learning_rate": self.learning_rate,
            "momentum": self.momentum,
        }
