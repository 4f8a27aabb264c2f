"""The PyTorch training step."""

import keras
import torch
from keras.utils import unpack_x_y_sample_weight

from keras_dwo.trainers.stateful import StatefulTrainer


def _gradients(target, sources, **kwargs):
    if not sources:
        return []
    gradients = torch.autograd.grad(
        target, sources, retain_graph=True, allow_unused=True, **kwargs
    )
    return [torch.zeros_like(s) if g is None else g for g, s in zip(gradients, sources)]


class TorchTrainer(StatefulTrainer):
    """`train_step` for the PyTorch backend (eager).

    A loss-level method takes one backward pass. A gradient-level method
    takes one `torch.autograd.grad` per task through the shared part of the
    graph, then one through the task-specific part. The step is applied only
    if `step_is_finite`; otherwise the method's state is put back.
    """

    def _objective_gradients(self, task_losses, label_counts):
        objective, weights = self.compute_objective(
            task_losses, training=True, label_counts=label_counts
        )
        variables = [v.value for v in self.trainable_variables]
        gradients = _gradients(self.optimizer.scale_loss(objective), variables)
        return objective, weights, gradients

    def _combined_gradients(self, task_losses, label_counts, representation):
        plan = self.gradient_plan()
        variables = [v.value for v in self.trainable_variables]
        shared = [variables[i] for i in plan.shared_indices]
        others = [variables[i] for i in plan.other_indices]
        scaled_losses = self.optimizer.scale_loss(self.task_weights.value * task_losses)
        sources = shared if representation is None else representation
        rows = [_gradients(task_loss, sources) for task_loss in scaled_losses]
        task_gradients = [torch.stack(per_task) for per_task in zip(*rows)]
        objective, _ = self.compute_objective(
            task_losses.detach(), label_counts=label_counts
        )
        combined, weights, head_weights = self.combine_task_gradients(
            task_gradients, task_losses.detach(), label_counts
        )
        if representation is not None:
            combined = _gradients(representation, shared, grad_outputs=combined)
        gradients = [None] * len(variables)
        for index, gradient in zip(plan.shared_indices, combined):
            gradients[index] = gradient
        other_gradients = _gradients(scaled_losses, others, grad_outputs=head_weights)
        for index, gradient in zip(plan.other_indices, other_gradients):
            gradients[index] = gradient
        regularization = self.regularization_loss()
        if regularization is not None:
            scaled = self.optimizer.scale_loss(regularization)
            gradients = [
                g + r for g, r in zip(gradients, _gradients(scaled, variables))
            ]
        return objective, weights, gradients

    def guarded_optimizer_apply(self, applied, gradients):
        """Applies the gradients if `applied`.

        A `LossScaleOptimizer` is handed non-finite gradients instead of a
        skipped step, so that it lowers its loss scale as it does for a
        plain model.
        """
        variables = self.trainable_variables
        if applied:
            self.optimizer.apply(gradients, variables)
        elif isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
            self.optimizer.apply(
                [torch.full_like(g, float("nan")) for g in gradients], variables
            )

    def train_step(self, data):
        x, y, sample_weight = unpack_x_y_sample_weight(data)
        uses_task_gradients = self.uses_task_gradients()
        representation = None
        if uses_task_gradients and self.gradient_plan().trunk is not None:
            plan = self.gradient_plan()
            representation = keras.tree.flatten(plan.trunk(x, training=True))
            y_pred = self.outputs_like_model(plan.heads(representation, training=True))
        else:
            y_pred = self(x, training=True)
        task_losses = self.compute_task_losses(y, y_pred, sample_weight)
        detached = task_losses.detach()
        label_counts = self.count_task_labels(y, sample_weight)
        state = self.weighting.non_trainable_variables
        previous = [v.value.clone() for v in state]
        if uses_task_gradients:
            objective, weights, gradients = self._combined_gradients(
                task_losses, label_counts, representation
            )
        else:
            objective, weights, gradients = self._objective_gradients(
                task_losses, label_counts
            )
        objective = objective.detach()
        applied = bool(
            self.step_is_finite(
                detached, objective, gradients, [v.value for v in state]
            )
        )
        with torch.no_grad():
            self.apply_keeping_absent_tasks(
                lambda: self.guarded_optimizer_apply(applied, gradients), label_counts
            )
            keep_state = applied
            if applied and self.weighting.updates_after_step:
                self.update_weighting_after_step(
                    x, y, sample_weight, detached, label_counts
                )
                keep_state = bool(self.values_are_finite([v.value for v in state]))
            if not keep_state:
                for variable, value in zip(state, previous):
                    variable.assign(value)
        self.record_step(objective, detached, weights, x, label_counts, applied)
        return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
