"""MoCo: tracked task gradients and stochastic weights (Fernando et al. 2023)."""

import keras
from keras import ops

from keras_dwo.arguments import checked_number
from keras_dwo.weighting.base import GradientWeighting
from keras_dwo.weighting.base import presence
from keras_dwo.weighting.simplex import present_share
from keras_dwo.weighting.simplex import uniform_simplex_weight

EPSILON = 1e-8
# Stands for minus infinity in a softmax over the present tasks only.
ABSENT_LOGIT = -1e30


@keras.saving.register_keras_serializable(package="keras_dwo")
class MoCo(GradientWeighting):
    """MoCo: corrects the bias of stochastic MGDA with tracked gradients.

    MGDA's weights, found from one batch's gradients, are biased. MoCo
    tracks each task's gradient by a moving average `y_i` (state, one
    `(T, P)` variable) and takes one projected gradient step on the weights
    `lambda` (state) per training step, instead of solving for them:

        g_i <- L_i g_i / (||g_i|| + eps)
        y_i <- y_i - beta_t (y_i - g_i),         beta_t = beta / t^beta_sigma
        lambda <- softmax(lambda - gamma_t (Y Y^T + rho I) lambda),
                                                 gamma_t = gamma / t^gamma_sigma
        d = Y^T lambda

    with `t` the step, from 1. As in the authors' code (and LibMTL), the
    gradients are rescaled to the norm of their loss and the weights are
    kept on the simplex by a softmax (the paper writes a projection). The
    logged weights are `lambda`, the coefficients of the tracked gradients
    in the direction.

    A task without a label in the batch keeps its tracked gradient and its
    weight, and the present tasks' weights are renormalised to their own
    simplex before the update (with every task present, they sum to 1
    already). The state has
    one entry per shared parameter, made when the model plans its first
    step; the method needs the parameters' gradients (no
    `wrt="representation"`).

    Args:
        beta: Rate of the gradient tracking (default 0.5).
        beta_sigma: Its decay with the step (default 0.5).
        gamma: Step size of the weights (default 0.1).
        gamma_sigma: Its decay with the step (default 0.5).
        rho: L2 regularisation of the weights' update (default 0).
        **kwargs: Passed to `GradientWeighting`.

    References:
        - Fernando, Shen, Liu, Chaudhury, Murugesan and Chen, "Mitigating
          Gradient Bias in Multi-objective Learning: A Provably Convergent
          Approach", ICLR 2023.
        - Lin and Zhang, "LibMTL: A Python Library for Multi-Task Learning",
          JMLR 2023 (`MoCo`, defaults).
    """

    column_state = True

    def __init__(
        self, beta=0.5, beta_sigma=0.5, gamma=0.1, gamma_sigma=0.5, rho=0.0, **kwargs
    ):
        super().__init__(**kwargs)
        self.beta = checked_number("beta", beta, low=0, low_open=True)
        self.beta_sigma = checked_number("beta_sigma", beta_sigma, low=0)
        self.gamma = checked_number("gamma", gamma, low=0, low_open=True)
        self.gamma_sigma = checked_number("gamma_sigma", gamma_sigma, low=0)
        self.rho = checked_number("rho", rho, low=0)

    def build(self, task_names):
        super().build(task_names)
        self.steps = self.add_weight(
            shape=(), initializer="zeros", trainable=False, name="steps"
        )
        self.lambdas = uniform_simplex_weight(self, "lambdas")

    def build_columns(self, group_sizes):
        super().build_columns(group_sizes)
        self.tracked_gradients = self.per_column_weight("tracked_gradients")

    def aggregate(self, jacobian, losses, training=True, present=None):
        present = presence(present, losses)
        step = ops.convert_to_tensor(self.steps) + 1.0
        beta = self.beta / ops.power(step, self.beta_sigma)
        gamma = self.gamma / ops.power(step, self.gamma_sigma)
        norms = ops.sqrt(ops.sum(ops.square(jacobian), axis=1))
        scaled = jacobian * ops.expand_dims(losses / (norms + EPSILON), 1)
        self.checked_column_groups(jacobian)
        tracked = ops.convert_to_tensor(self.tracked_gradients)
        moved = tracked - beta * (tracked - scaled)
        kept = ops.expand_dims(present, 1) > 0
        moved = ops.where(kept, moved, tracked)
        stored = ops.convert_to_tensor(self.lambdas)
        lambdas = present_share(stored, present)
        hessian = ops.matmul(moved, ops.transpose(moved)) + self.rho * ops.eye(
            self.num_tasks
        )
        logits = lambdas - gamma * ops.matmul(hessian, lambdas)
        weights = ops.softmax(ops.where(present > 0, logits, ABSENT_LOGIT)) * present
        if training:
            self.tracked_gradients.assign(moved)
            self.lambdas.assign(ops.where(present > 0, weights, stored))
            self.steps.assign(step)
        return ops.matmul(weights, moved), weights

    def get_config(self):
        return {
            **super().get_config(),
            "beta": self.beta,
            "beta_sigma": self.beta_sigma,
            "gamma": self.gamma,
            "gamma_sigma": self.gamma_sigma,
            "rho": self.rho,
        }
