"""Gradient normalization, GradNorm (Chen et al. 2018)."""

import keras
from keras import ops

from keras_dwo.arguments import checked_number
from keras_dwo.weighting.adam import AdamMoments
from keras_dwo.weighting.base import GradientWeighting
from keras_dwo.weighting.base import linear_objective
from keras_dwo.weighting.base import presence

# Adam can step a weight below zero; the floor keeps every task in the
# objective so that its gradient norm, and with it its weight, can recover.
MIN_LOSS_WEIGHT = 1e-6


@keras.saving.register_keras_serializable(package="keras_dwo")
class GradNorm(GradientWeighting):
    """GradNorm: learns loss weights that balance the tasks' training rates.

    The loss weights `w` start at 1. At each training step, with `g_i` task
    i's gradient and `L_i(0)` its loss at the first training step where it
    has labels and a positive loss (until then `L_i / L_i(0)` counts as 1):

    - `G_i = w_i ||g_i||` is the norm of task i's weighted gradient;
    - `r_i = (L_i / L_i(0)) / mean_j(L_j / L_j(0))` is its relative inverse
      training rate: above 1 for a task whose loss decreases slower;
    - the target norm is `mean(G) r_i^alpha`, held constant;
    - `w` takes an Adam step (learning rate `learning_rate`) along the
      gradient of `sum_i |G_i - mean(G) r_i^alpha|` with respect to `w`,
      is clipped to stay positive (`MIN_LOSS_WEIGHT`) and renormalised to
      sum to T.

    The direction is `sum_i w_i g_i` with the weights from before the step's
    update, and the heads' gradients are scaled by the same weights
    (`weights_heads`), so training minimises `sum_i w_i L_i`; evaluation
    reports that objective with the learned weights. The weights, their
    Adam moments and the initial losses are non-trainable variables, saved
    with the model, so a resumed run keeps its `L_i(0)`. A task absent from
    a step (`present` 0) keeps its weight, moments and `L_i(0)` exactly; the
    others are renormalised to keep the sum T.

    The norms are those of the rows of the Jacobian: the gradients of all
    shared parameters, or with `wrt="representation"` of the shared
    representation; the paper applies GradNorm to the last shared layer,
    which the representation approximates at a fraction of the cost.

    Args:
        alpha: Strength of the pull towards equal training rates (paper's
            value for NYUv2 and LibMTL's default: 1.5; 0 equalises the
            gradient norms).
        learning_rate: Adam learning rate of the loss weights. Neither the
            paper nor LibMTL (which trains softmax-parametrised weights
            with the model's optimizer) fixes one; 0.025 is the rate FAMO
            uses for its task logits.
        wrt: `"parameters"` or `"representation"`, as for
            `GradientWeighting`.
        **kwargs: Passed to `GradientWeighting`.

    References:
        - Chen, Badrinarayanan, Lee and Rabinovich, "GradNorm: Gradient
          Normalization for Adaptive Loss Balancing in Deep Multitask
          Networks", ICML 2018.
        - Lin and Zhang, "LibMTL: A Python Library for Multi-Task Learning",
          JMLR 2023 (default `alpha`).
    """

    weights_heads = True
    allows_representation = True

    def __init__(self, alpha=1.5, learning_rate=0.025, wrt="parameters", **kwargs):
        super().__init__(wrt=wrt, **kwargs)
        self.alpha = checked_number("alpha", alpha, low=0)
        self.learning_rate = checked_number(
            "learning_rate", learning_rate, low=0, low_open=True
        )

    def build(self, task_names):
        super().build(task_names)
        shape = (len(task_names),)
        self.loss_weights = self.add_weight(
            shape=shape, initializer="ones", trainable=False, name="loss_weights"
        )
        self.initial_losses = self.add_weight(
            shape=shape, initializer="zeros", trainable=False, name="initial_losses"
        )
        self.initial_losses_recorded = self.add_weight(
            shape=shape,
            initializer="zeros",
            trainable=False,
            name="initial_losses_recorded",
        )
        self.loss_weights_adam = AdamMoments(self, shape, "loss_weights")

    def call(self, losses, training=False, present=None):
        del present
        return linear_objective(self.loss_weights, losses)

    def gram_weights(self, gram, losses, training=True, present=None):
        # A copy: the update below may assign the variable in place.
        weights = ops.copy(self.loss_weights.value)
        if training:
            self._update_loss_weights(gram, losses, presence(present, losses))
        return weights

    def _update_loss_weights(self, gram, losses, present):
        # As tensors: `ops.where` rejects variables on JAX.
        loss_weights = ops.convert_to_tensor(self.loss_weights)
        recorded = ops.convert_to_tensor(self.initial_losses_recorded) > 0
        # L_i(0) is a task's loss in the first step that has its labels and a
        # positive loss: a ratio to a zero L_i(0) would hold its rate at 0.
        recording = ops.logical_and(
            ops.logical_not(recorded), ops.logical_and(present > 0, losses > 0)
        )
        initial_losses = ops.where(
            recording, losses, ops.convert_to_tensor(self.initial_losses)
        )
        recorded = ops.logical_or(recorded, recording)
        self.initial_losses.assign(initial_losses)
        self.initial_losses_recorded.assign(ops.cast(recorded, "float32"))

        def mean_present(values):
            return ops.divide_no_nan(ops.sum(present * values), ops.sum(present))

        gradient_norms = ops.sqrt(ops.maximum(ops.diagonal(gram), 0.0))
        weighted_norms = loss_weights * gradient_norms
        # Until L_i(0) is recorded, a task counts as training at the mean rate.
        loss_ratios = ops.where(
            recorded, ops.divide_no_nan(losses, initial_losses), 1.0
        )
        # Negative losses (log-likelihoods) have no training rate; clamping
        # keeps the fractional power real.
        rates = ops.maximum(
            ops.divide_no_nan(loss_ratios, mean_present(loss_ratios)), 0.0
        )
        target_norms = mean_present(weighted_norms) * ops.power(rates, self.alpha)
        gradient = ops.sign(weighted_norms - target_norms) * gradient_norms

        step = self.loss_weights_adam.step(gradient, present)
        updated = ops.maximum(loss_weights - self.learning_rate * step, MIN_LOSS_WEIGHT)
        # The weights present are renormalised so that all still sum to T;
        # an absent task keeps its weight exactly.
        kept = ops.sum(ops.where(present > 0, 0.0, loss_weights))
        scale = ops.divide_no_nan(
            self.num_tasks - kept, ops.sum(ops.where(present > 0, updated, 0.0))
        )
        self.loss_weights.assign(ops.where(present > 0, updated * scale, loss_weights))

    def get_config(self):
        return {
            **super().get_config(),
            "alpha": self.alpha,
            "learning_rate": self.learning_rate,
        }
