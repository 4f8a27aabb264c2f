"""Unconflicting projection of gradients, UPGrad (Quinton and Rey 2024)."""

import keras
from keras import ops

from keras_dwo.weighting import min_norm
from keras_dwo.weighting.base import GradientWeighting
from keras_dwo.weighting.base import presence
from keras_dwo.weighting.gram import combination

# TorchJD's default regularisation of the normalised Gram matrix.
RIDGE = 1e-4


@keras.saving.register_keras_serializable(package="keras_dwo")
class UPGrad(GradientWeighting):
    """UPGrad: the mean of the task gradients projected onto their dual cone.

    Each task gradient `g_i` is projected onto the dual cone of all the task
    gradients, the directions `x` with `g_j . x >= 0` for every j, and the
    direction is the mean of the projections. It therefore has a
    non-negative inner product with every task gradient, and equals the mean
    gradient when no two gradients conflict. In the dual, the projection of
    `g_i` is `sum_j w^(i)_j g_j` with `w^(i) = argmin_{w >= e_i} w^T G w`
    (`G = J J^T`); the reported weights are the mean of the `w^(i)`, each at
    least `1/T`. The T problems are solved exactly by
    `min_norm.lower_bounded_min_norm` (at most `min_norm.MAX_TASKS` tasks),
    for the trace-normalised Gram matrix with TorchJD's default
    regularisation `1e-4 * I`. TorchJD also replaces a Gram matrix whose trace
    is below `1e-4` by zero, which makes UPGrad the mean for small gradients;
    here the normalisation is scale-free instead.

    Args:
        **kwargs: Passed to `GradientWeighting`.

    References:
        - Quinton and Rey, "Jacobian Descent for Multi-Objective
          Optimization", arXiv:2406.16232, 2024.
    """

    def build(self, task_names):
        min_norm.check_num_tasks(len(task_names), type(self).__name__)
        super().build(task_names)

    def aggregate(self, jacobian, losses, training=True, present=None):
        gram = ops.matmul(jacobian, ops.transpose(jacobian))
        num_tasks = ops.shape(gram)[0]
        dual_weights = min_norm.lower_bounded_min_norm(
            gram, ops.eye(num_tasks, dtype=gram.dtype), ridge=RIDGE
        )
        # The mean of the projections of the gradients present; an absent
        # task's zero row is orthogonal to all, so it is 0 in the others'.
        present = presence(present, losses)
        weights = ops.matmul(present, dual_weights) / ops.sum(present)
        return combination(weights, jacobian, gram)
