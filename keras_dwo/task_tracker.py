"""Per-task loss and weight logs."""

import keras
from keras import ops

from keras_dwo import trainers


class TaskTracker(keras.metrics.Metric):
    """Tracks every task's mean loss, its weight in the last step and skipped steps.

    One metric for all tasks keeps the per-step cost to one vector update.
    `result()` returns `{"<task>_loss": ..., "<task>_weight": ...,
    "skipped_steps": ...}`, which Keras merges into the logs; `skipped_steps`
    counts the steps since the last reset (the epoch) that were not applied
    because something in them was not finite.

    Args:
        task_names: Sequence of task names, in output order.
        name: Name of the metric.
    """

    def __init__(self, task_names, name="task_tracker"):
        super().__init__(name=name)
        self.task_names = tuple(task_names)
        shape = (len(self.task_names),)
        self.loss_total = self.add_variable(shape, "zeros", name="loss_total")
        self.count = self.add_variable(shape, "zeros", name="count")
        self.last_weights = self.add_variable(
            shape, "ones", aggregation="only_first_replica", name="last_weights"
        )
        self.skipped_steps = self.add_variable(
            (), "zeros", aggregation="only_first_replica", name="skipped_steps"
        )

    def update_state(self, task_losses, weights, sample_counts, applied=True):
        """Adds a step's task losses, weighted by `(T,)` sample counts.

        `weights` None keeps the last weights: evaluation has no gradients
        to weigh, so a gradient-level method's evaluation logs repeat the
        weights of its last training step. `applied` (a boolean, or a scalar
        boolean tensor) tells whether the step was applied; a step that was
        not counts as skipped.
        """
        sample_counts = ops.cast(sample_counts, self.dtype)
        if isinstance(applied, bool):
            skipped = float(not applied)
        else:
            skipped = 1.0 - ops.cast(applied, self.dtype)
        trainers.add_to_variables(
            [self.loss_total, self.count, self.skipped_steps],
            [ops.cast(task_losses, self.dtype) * sample_counts, sample_counts, skipped],
        )
        if weights is not None:
            self.last_weights.assign(ops.cast(weights, self.dtype))

    def reset_state(self):
        # The last weights outlive the epoch, so that evaluation reports them.
        for variable in (self.loss_total, self.count, self.skipped_steps):
            variable.assign(ops.zeros(variable.shape, variable.dtype))

    def result(self):
        losses = ops.divide_no_nan(self.loss_total, self.count)
        # A copy, so that logs do not alias a variable that later steps update.
        weights = ops.copy(self.last_weights)
        logs = {}
        for index, name in enumerate(self.task_names):
            logs[f"{name}_loss"] = losses[index]
            logs[f"{name}_weight"] = weights[index]
        logs["skipped_steps"] = ops.copy(self.skipped_steps)
        return logs

    def get_config(self):
        return {"task_names": list(self.task_names), "name": self.name}
