"""The PyTorch training step."""

import torch
from keras.utils import unpack_x_y_sample_weight

from keras_dwo.trainers.stateful import StatefulTrainer


class TorchTrainer(StatefulTrainer):
    """`train_step` for the PyTorch backend (eager, one backward pass)."""

    def train_step(self, data):
        x, y, sample_weight = unpack_x_y_sample_weight(data)
        y_pred = self(x, training=True)
        self.zero_grad()
        task_losses = self.compute_task_losses(y, y_pred, sample_weight)
        objective, weights = self.compute_objective(task_losses, training=True)
        task_losses = task_losses.detach()
        if bool(torch.isfinite(task_losses).all()):
            self.optimizer.scale_loss(objective).backward()
            variables = self.trainable_variables
            with torch.no_grad():
                self.optimizer.apply([v.value.grad for v in variables], variables)
                if self.weighting.updates_after_step:
                    self.update_weighting_after_step(x, y, sample_weight, task_losses)
        self.record_step(objective.detach(), task_losses, weights, x)
        return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
