"""What the TensorFlow and PyTorch steps share: stateful variables."""

import keras


class StatefulTrainer:
    """Evaluation step and hooks for backends whose variables hold state."""

    def global_task_losses(self, task_losses):
        """Returns the task losses over all replicas and the replica count."""
        return task_losses, 1

    def test_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        y_pred = self(x, training=False)
        task_losses, _ = self.global_task_losses(
            self.compute_task_losses(y, y_pred, sample_weight)
        )
        objective, weights = self.compute_objective(task_losses, training=False)
        self.record_step(objective, task_losses, weights, x)
        return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    def update_weighting_after_step(self, x, y, sample_weight, losses_before):
        """Evaluates the batch again and lets the method learn from the change."""
        y_pred = self(x, training=False)
        losses_after, _ = self.global_task_losses(
            self.compute_task_losses(y, y_pred, sample_weight)
        )
        self.weighting.update(losses_before, losses_after)
