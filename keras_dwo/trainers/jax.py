"""The JAX training step, stateless and compiled with `jax.jit`."""

from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import keras
from keras.utils import unpack_x_y_sample_weight


class _Forward(NamedTuple):
    """What a stateless forward pass returns besides the scaled objective."""

    objective: Any
    task_losses: Any
    weights: Any
    y_pred: Any
    non_trainable_variables: Any


def _select(condition, new_values, old_values):
    return [jnp.where(condition, new, old) for new, old in zip(new_values, old_values)]


class JAXTrainer:
    """`train_step` and `test_step` for the JAX backend.

    Like Keras' own JAX trainer, the steps take the model's state as arrays
    and return the new state; every variable the step reads (task weights,
    the weighting method's state) is a model-tracked variable, so a callback
    that assigns one between steps changes the next compiled step. Under
    `keras.distribution.DataParallel` the step computes on the global batch,
    so the task losses are those of one device.
    """

    def _stateless_objective(
        self,
        trainable_variables,
        non_trainable_variables,
        optimizer_variables,
        x,
        y,
        sample_weight,
        training,
    ):
        y_pred, non_trainable_variables, regularization_losses = self.stateless_call(
            trainable_variables,
            non_trainable_variables,
            x,
            return_losses=True,
            training=training,
        )
        mapping = list(zip(self.trainable_variables, trainable_variables))
        mapping += zip(self.non_trainable_variables, non_trainable_variables)
        if training:
            mapping += zip(self.optimizer.variables, optimizer_variables)
        with keras.StatelessScope(state_mapping=mapping) as scope:
            self._losses_override = regularization_losses
            try:
                task_losses = self.compute_task_losses(y, y_pred, sample_weight)
                objective, weights = self.compute_objective(task_losses, training)
            finally:
                self._losses_override = []
            scaled_objective = (
                self.optimizer.scale_loss(objective) if training else objective
            )
        non_trainable_variables = [
            scope.get_current_value(v) for v in self.non_trainable_variables
        ]
        return scaled_objective, _Forward(
            objective, task_losses, weights, y_pred, non_trainable_variables
        )

    def _stateless_weighting_update(
        self,
        trainable_variables,
        non_trainable_variables,
        x,
        y,
        sample_weight,
        losses_before,
    ):
        y_pred, _ = self.stateless_call(
            trainable_variables, non_trainable_variables, x, training=False
        )
        mapping = zip(self.non_trainable_variables, non_trainable_variables)
        with keras.StatelessScope(state_mapping=mapping) as scope:
            losses_after = self.compute_task_losses(y, y_pred, sample_weight)
            self.weighting.update(losses_before, losses_after)
        return [scope.get_current_value(v) for v in self.non_trainable_variables]

    def _stateless_record(self, metrics_variables, forward, x, y, sample_weight):
        mapping = zip(self.metrics_variables, metrics_variables)
        with keras.StatelessScope(state_mapping=mapping) as scope:
            self.record_step(forward.objective, forward.task_losses, forward.weights, x)
            logs = self.compute_metrics(x, y, forward.y_pred, sample_weight)
        return logs, [scope.get_current_value(v) for v in self.metrics_variables]

    def train_step(self, state, data):
        (
            trainable_variables,
            non_trainable_variables,
            optimizer_variables,
            metrics_variables,
        ) = state
        x, y, sample_weight = unpack_x_y_sample_weight(data)
        gradient_fn = jax.value_and_grad(self._stateless_objective, has_aux=True)
        (_, forward), gradients = gradient_fn(
            trainable_variables,
            non_trainable_variables,
            optimizer_variables,
            x,
            y,
            sample_weight,
            True,
        )
        new_non_trainable = forward.non_trainable_variables
        new_trainable, new_optimizer = self.optimizer.stateless_apply(
            optimizer_variables, gradients, trainable_variables
        )
        if self.weighting.updates_after_step:
            new_non_trainable = self._stateless_weighting_update(
                new_trainable,
                new_non_trainable,
                x,
                y,
                sample_weight,
                forward.task_losses,
            )
        finite = jnp.all(jnp.isfinite(forward.task_losses))
        logs, metrics_variables = self._stateless_record(
            metrics_variables, forward, x, y, sample_weight
        )
        state = (
            _select(finite, new_trainable, trainable_variables),
            _select(finite, new_non_trainable, non_trainable_variables),
            _select(finite, new_optimizer, optimizer_variables),
            metrics_variables,
        )
        return logs, state

    def test_step(self, state, data):
        trainable_variables, non_trainable_variables, metrics_variables = state
        x, y, sample_weight = unpack_x_y_sample_weight(data)
        _, forward = self._stateless_objective(
            trainable_variables,
            non_trainable_variables,
            None,
            x,
            y,
            sample_weight,
            False,
        )
        non_trainable_variables = forward.non_trainable_variables
        logs, metrics_variables = self._stateless_record(
            metrics_variables, forward, x, y, sample_weight
        )
        return logs, (trainable_variables, non_trainable_variables, metrics_variables)
