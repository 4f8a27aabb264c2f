"""What the TensorFlow and PyTorch steps share: stateful variables."""

import keras
from keras import ops


def replicas_task_losses(task_losses, label_counts, x, replicas, sum_over_replicas):
    """Combines the replicas' task losses into the global batch's.

    Each replica's task losses are means over its own (labelled) samples;
    the global loss is their mean weighted by those counts, which is exact
    for shards of any size and for labels missing unevenly over them.

    Args:
        task_losses: The `(T,)` mean task losses of this replica's samples.
        label_counts: None, or the `(T,)` labelled samples per task.
        x: This replica's inputs (their batch size counts without labels).
        replicas: The number of replicas R.
        sum_over_replicas: Returns a list of tensors summed over the
            replicas.

    Returns:
        `(task_losses, label_counts)`: the global values, with a gradient
        through this replica's losses that, divided by R and summed over the
        replicas, is the global losses' gradient; the global label counts
        (None without `label_counts`).
    """
    counts = label_counts
    if counts is None:
        first = next(leaf for leaf in keras.tree.flatten(x) if leaf is not None)
        batch_size = ops.cast(ops.shape(first)[0], task_losses.dtype)
        counts = ops.full(ops.shape(task_losses), batch_size)
    local = ops.stop_gradient(task_losses)
    total, total_counts = sum_over_replicas([counts * local, counts])
    safe_counts = ops.maximum(total_counts, 1.0)
    losses = total / safe_counts
    losses = losses + replicas * (counts / safe_counts) * (task_losses - local)
    return losses, None if label_counts is None else total_counts


class StatefulTrainer:
    """Evaluation step and hooks for backends whose variables hold state."""

    def global_task_losses(self, task_losses, label_counts, x):
        """Returns the task losses and label counts of the global batch.

        Under data parallelism each replica holds a shard of the batch: the
        task losses returned have the value that one device would compute on
        the whole batch, and a gradient through the replica's own losses
        which, once divided by the replica count and summed over the
        replicas, is the whole batch's.

        Args:
            task_losses: The `(T,)` task losses of this replica's samples.
            label_counts: None, or the `(T,)` labelled samples per task.
            x: This replica's inputs.

        Returns:
            `(task_losses, label_counts, replicas)`.
        """
        del x
        return task_losses, label_counts, 1

    def sync_variables(self):
        """Makes the variables hold the training state (they always do here)."""

    def build_optimizer(self):
        """Creates the optimizer's variables for the trainable variables."""
        self.optimizer.build(self.trainable_variables)

    def test_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        y_pred = self(x, training=False)
        task_losses, label_counts, _ = self.global_task_losses(
            self.compute_task_losses(y, y_pred, sample_weight),
            self.count_task_labels(y, sample_weight),
            x,
        )
        objective, weights = self.compute_objective(
            task_losses, training=False, label_counts=label_counts
        )
        self.record_step(
            objective, task_losses, weights, x, label_counts, training=False
        )
        return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    def update_weighting_after_step(
        self, x, y, sample_weight, losses_before, label_counts
    ):
        """Evaluates the batch again and lets the method learn from the change."""
        y_pred = self(x, training=False)
        losses_after, _, _ = self.global_task_losses(
            self.compute_task_losses(y, y_pred, sample_weight),
            self.count_task_labels(y, sample_weight),
            x,
        )
        self.update_weighting(losses_before, losses_after, label_counts)

    def apply_keeping_absent_tasks(self, apply, label_counts):
        """Runs `apply()`, then puts back an absent task's per-task state."""
        if label_counts is None:
            return apply()
        trainable_indices, optimizer_indices = self.absent_task_state()
        kept = [self.trainable_variables[i] for i in trainable_indices]
        kept += [self.optimizer.variables[i] for i in optimizer_indices]
        before = [ops.copy(v.value) for v in kept]
        result = apply()
        after = self.keep_absent_tasks([v.value for v in kept], before, label_counts)
        for variable, value in zip(kept, after):
            variable.assign(value)
        return result
