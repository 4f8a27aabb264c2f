"""Simplex weights stepped on the cross Gram matrix of two independent Jacobians."""

import keras
from keras import ops

from keras_dwo.weighting.base import GradientWeighting
from keras_dwo.weighting.base import presence
from keras_dwo.weighting.simplex import present_share
from keras_dwo.weighting.simplex import uniform_simplex_weight


@keras.saving.register_keras_serializable(package="keras_dwo")
class DoubleSampling(GradientWeighting):
    """Base of MoDo and SDMGrad: weights on the simplex, from two samples.

    Both update weights `w` on the simplex (state) from `G_a G_b^T`, the
    product of two independently sampled Jacobians, which makes the update
    unbiased. Their papers sample three batches per step; here `G_a` is the
    previous step's Jacobian (state, one `(T, P)` variable) and `G_b` the
    current one, which also gives the direction: no extra pass, at the
    price of gradients one step old in the weights' update. A task without
    a label in the batch keeps its weight and its stored gradient; the
    present tasks' weights are renormalised to their own simplex first.

    Subclasses implement `step_weights(cross, weights, present)`, which
    returns the new weights, and may override `coefficients`.
    """

    column_state = True

    def build(self, task_names):
        super().build(task_names)
        self.simplex_weights = uniform_simplex_weight(self, "simplex_weights")

    def build_columns(self, group_sizes):
        super().build_columns(group_sizes)
        self.previous_jacobian = self.per_column_weight("previous_jacobian")

    def step_weights(self, cross, weights, present):
        """Returns the new `(T,)` simplex weights.

        Args:
            cross: The `(T, T)` matrix `G_a G_b^T`.
            weights: The present tasks' weights, on their simplex.
            present: The `(T,)` presence mask.
        """
        raise NotImplementedError(
            f"{type(self).__name__} must implement `step_weights(cross, weights, "
            "present)`."
        )

    def coefficients(self, weights, present):
        """The coefficients of the current task gradients in the direction."""
        del present
        return weights

    def aggregate(self, jacobian, losses, training=True, present=None):
        self.checked_column_groups(jacobian)
        present = presence(present, losses)
        previous = ops.convert_to_tensor(self.previous_jacobian)
        stored = ops.convert_to_tensor(self.simplex_weights)
        cross = ops.matmul(previous, ops.transpose(jacobian))
        weights = self.step_weights(cross, present_share(stored, present), present)
        if training:
            kept = ops.expand_dims(present, 1) > 0
            self.previous_jacobian.assign(ops.where(kept, jacobian, previous))
            self.simplex_weights.assign(ops.where(present > 0, weights, stored))
        coefficients = self.coefficients(weights, present)
        return ops.matmul(coefficients, jacobian), coefficients
