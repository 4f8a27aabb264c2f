"""MoDo: multi-objective gradient with double sampling (Chen et al. 2023)."""

import keras
from keras import ops

from keras_dwo.weighting.base import GradientWeighting
from keras_dwo.weighting.base import presence
from keras_dwo.weighting.simplex import present_share
from keras_dwo.weighting.simplex import project_to_simplex


@keras.saving.register_keras_serializable(package="keras_dwo")
class MoDo(GradientWeighting):
    """MoDo: one projected step on MGDA's weights per training step.

    MGDA solves for the weights on the simplex that minimise the norm of
    the combined gradient. MoDo takes one projected gradient step on that
    problem per training step, on the product of two independently sampled
    Jacobians, so that the step is unbiased:

        lambda <- proj_simplex(lambda - gamma (G_a G_b^T lambda + rho lambda))
        d = G_b^T lambda

    The paper samples three batches per step (`G_a`, `G_b` and a third for
    the direction). Here `G_a` is the previous step's Jacobian (state, one
    `(T, P)` variable), independent of the current batch's `G_b`, which
    also gives the direction: no extra passes, at the price of gradients
    one step old in the weights' update. The logged weights are `lambda`.
    A task without a label in the batch keeps its weight and its stored
    gradient; the present tasks' weights are projected onto their own
    simplex. The method needs the parameters' gradients (no
    `wrt="representation"`).

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

    column_state = True

    def __init__(self, gamma=0.001, rho=0.1, **kwargs):
        super().__init__(**kwargs)
        if gamma <= 0.0:
            raise ValueError(f"`gamma` must be positive; received {gamma}.")
        if rho < 0.0:
            raise ValueError(f"`rho` must be >= 0; received {rho}.")
        self.gamma = float(gamma)
        self.rho = float(rho)

    def build(self, task_names):
        super().build(task_names)
        self.lambdas = self.add_weight(
            shape=(len(task_names),),
            initializer=keras.initializers.Constant(1.0 / len(task_names)),
            trainable=False,
            name="lambdas",
        )

    def build_columns(self, group_sizes):
        super().build_columns(group_sizes)
        self.previous_jacobian = self.per_column_weight("previous_jacobian")

    def aggregate(self, jacobian, losses, training=True, present=None):
        self.checked_column_groups(jacobian)
        present = presence(present, losses)
        previous = ops.convert_to_tensor(self.previous_jacobian)
        stored = ops.convert_to_tensor(self.lambdas)
        lambdas = present_share(stored, present)
        cross = ops.matmul(previous, ops.transpose(jacobian))
        step = self.gamma * (ops.matmul(cross, lambdas) + self.rho * lambdas)
        weights = project_to_simplex(lambdas - step, present)
        if training:
            kept = ops.expand_dims(present, 1) > 0
            self.previous_jacobian.assign(ops.where(kept, jacobian, previous))
            self.lambdas.assign(ops.where(present > 0, weights, stored))
        return ops.matmul(weights, jacobian), weights

    def get_config(self):
        return {**super().get_config(), "gamma": self.gamma, "rho": self.rho}
