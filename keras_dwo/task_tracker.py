"""Per-task loss and weight logs."""

import keras
from keras import ops


class TaskTracker(keras.metrics.Metric):
    """Tracks every task's mean loss and its weight in the last step.

    One metric for all tasks keeps the per-step cost to one vector update.
    `result()` returns `{"<task>_loss": ..., "<task>_weight": ...}`, which
    Keras merges into the logs.

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
            shape, "zeros", aggregation="only_first_replica", name="last_weights"
        )

    def update_state(self, task_losses, weights, sample_counts):
        """Adds a step's task losses, weighted by `(T,)` sample counts."""
        sample_counts = ops.cast(sample_counts, self.dtype)
        self.loss_total.assign_add(ops.cast(task_losses, self.dtype) * sample_counts)
        self.count.assign_add(sample_counts)
        self.last_weights.assign(ops.cast(weights, self.dtype))

    def result(self):
        losses = ops.divide_no_nan(self.loss_total, self.count)
        # A copy, so that logs do not alias a variable that later steps update.
        weights = ops.copy(self.last_weights)
        logs = {}
        for index, name in enumerate(self.task_names):
            logs[f"{name}_loss"] = losses[index]
            logs[f"{name}_weight"] = weights[index]
        return logs

    def get_config(self):
        return {"task_names": list(self.task_names), "name": self.name}
