"""The TensorFlow training step."""

import tensorflow as tf
from keras.utils import unpack_x_y_sample_weight

from keras_dwo.trainers.stateful import StatefulTrainer


class TensorFlowTrainer(StatefulTrainer):
    """`train_step` for the TensorFlow backend, under `tf.function` and XLA.

    Under a `tf.distribute` strategy with R replicas, Keras divides each
    replica's task losses by R. The step sums them over the replicas, so that
    every replica computes the weighting on the global task losses, as one
    device would, while the gradient still flows through the replica's own
    losses; it then divides the objective by R, because the strategy sums the
    replicas' gradients. The learned weighting state and the optimizer update
    therefore match one device's for every method, linear or not.
    """

    def global_task_losses(self, task_losses):
        context = tf.distribute.get_replica_context()
        replicas = 1 if context is None else context.num_replicas_in_sync
        if replicas == 1:
            return task_losses, 1
        local = tf.stop_gradient(task_losses)
        total = context.all_reduce(tf.distribute.ReduceOp.SUM, local)
        return total + replicas * (task_losses - local), replicas

    def train_step(self, data):
        x, y, sample_weight = unpack_x_y_sample_weight(data)
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            task_losses, replicas = self.global_task_losses(
                self.compute_task_losses(y, y_pred, sample_weight)
            )
            objective, weights = self.compute_objective(task_losses, training=True)
            scaled_objective = self.optimizer.scale_loss(objective / replicas)
        variables = self.trainable_variables
        gradients = tape.gradient(scaled_objective, variables)
        gradients = [
            tf.zeros_like(v) if g is None else g for g, v in zip(gradients, variables)
        ]
        task_losses = tf.stop_gradient(task_losses)
        finite = tf.reduce_all(tf.math.is_finite(task_losses))

        def apply():
            self.optimizer.apply(gradients, variables)
            if self.weighting.updates_after_step:
                self.update_weighting_after_step(x, y, sample_weight, task_losses)
            return tf.constant(True)

        tf.cond(finite, apply, lambda: tf.constant(False))
        self.record_step(tf.stop_gradient(objective), task_losses, weights, x)
        return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
