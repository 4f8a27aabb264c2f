"""MoDo: multi-objective gradient with double sampling (Chen et al. 2023)."""

import keras
from keras import ops

from keras_dwo.arguments import checked_number
from keras_dwo.weighting.double_sampling import DoubleSampling
from keras_dwo.weighting.simplex import project_to_simplex


@keras.saving.register_keras_serializable(package="keras_dwo")
class MoDo(DoubleSampling):
    """MoDo: one projected step on MGDA's weights per training step.

    MGDA solves for the weights on the simplex that minimise the norm of
    the combined gradient. MoDo takes one projected gradient step on that
    problem per training step, on the product of two independently sampled
    Jacobians, so that the step is unbiased:

        lambda <- proj_simplex(lambda - gamma (G_a G_b^T lambda + rho lambda))
        d = G_b^T lambda

    The paper samples three batches per step (`G_a`, `G_b` and a third for
    the direction); here `G_a` is the previous step's Jacobian, see
    `DoubleSampling`. The logged weights are `lambda`. The method needs the
    parameters' gradients (no `wrt="representation"`).

    Args:
        gamma: Step size of the weights (default 0.001).
        rho: L2 regularisation of the weights' update (default 0.1).
        **kwargs: Passed to `GradientWeighting`.

    References:
        - Chen, Fernando, Ying and Chen, "Three-Way Trade-Off in
          Multi-Objective Learning: Optimization, Generalization and
          Conflict-Avoidance", NeurIPS 2023.
        - Lin and Zhang, "LibMTL: A Python Library for Multi-Task Learning",
          JMLR 2023 (`MoDo`, defaults).
    """

    def __init__(self, gamma=0.001, rho=0.1, **kwargs):
        super().__init__(**kwargs)
        self.gamma = checked_number("gamma", gamma, low=0, low_open=True)
        self.rho = checked_number("rho", rho, low=0)

    def step_weights(self, cross, weights, present):
        step = self.gamma * (ops.matmul(cross, weights) + self.rho * weights)
        return project_to_simplex(weights - step, present)

    def get_config(self):
        return {**super().get_config(), "gamma": self.gamma, "rho": self.rho}
