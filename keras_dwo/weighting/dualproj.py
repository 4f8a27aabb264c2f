"""Dual-cone projection of the mean gradient, DualProj (Quinton and Rey 2024)."""

import keras
from keras import ops

from keras_dwo.weighting.base import GradientWeighting
from keras_dwo.weighting.base import presence
from keras_dwo.weighting.gram import finite_gram
from keras_dwo.weighting.upgrad import dual_cone_weights


@keras.saving.register_keras_serializable(package="keras_dwo")
class DualProj(GradientWeighting):
    """DualProj: the mean gradient projected onto the dual cone of the gradients.

    The direction is the least change of the mean gradient `g = 1^T J / T`
    that raises no task's loss to first order: `argmin_d ||d - g||^2`
    subject to `g_j . d >= 0` for every task j, the projection of `g` onto
    the dual cone of the task gradients (equation 11 of GEM, Lopez-Paz and
    Ranzato 2017, applied to the mean). It equals the mean gradient when the
    mean conflicts with no task. In the dual, `d = w^T J` with
    `w = argmin_{w >= 1/T} w^T G w` (`G = J J^T`), solved exactly as for
    `UPGrad`, which projects each gradient instead of their mean and
    averages the projections; the weights are each at least `1/T`.

    The Gram matrix is regularised as in `UPGrad`: `G + 1e-4 diag(G)`,
    plus `1e-8` of its trace on the diagonal for zero gradients, instead of
    TorchJD's `1e-4` times the identity added to the trace-normalised
    matrix, so that scaling a task's gradient changes the problem only
    through that gradient. The regularised direction meets
    `g_j . d >= -1e-4 ||g_j||^2 w_j` for every task.

    An absent task (`present` 0) is left out of the mean, and its zero row
    gets weight 0.

    Args:
        **kwargs: Passed to `GradientWeighting`.

    Example:

    ```python
    method = DualProj()
    method.combine([[1.0, 0.0], [-1.0, 1.0]], [1.0, 1.0])
    # The mean [0, 0.5] conflicts with neither gradient: [0, 0.5].
    method.combine([[1.0, 0.0], [-2.0, 1.0]], [1.0, 1.0])
    # The mean [-0.5, 0.5] raises the first loss; projected: [0, 0.5].
    model = keras_dwo.DynamicWeightedModel(inputs, outputs, weighting="dualproj")
    ```

    References:
        - Quinton and Rey, "Jacobian Descent for Multi-Objective
          Optimization", arXiv:2406.16232, 2024.
        - Lopez-Paz and Ranzato, "Gradient Episodic Memory for Continual
          Learning", NeurIPS 2017.
    """

    def gram_weights(self, gram, losses, training=True, present=None):
        present = presence(present, losses)
        count = ops.sum(present)
        # The mean of the gradients present; none present gives 0.
        mean = present / ops.where(count > 0, count, ops.ones_like(count))
        weights = dual_cone_weights(finite_gram(gram), mean[None, :])[0]
        return weights
