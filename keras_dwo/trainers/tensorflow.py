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

    def _apply_if_finite(self, finite, gradients, variables):
        # The optimizer synchronises replicas with `merge_call`, which a
        # `tf.cond` in replica context cannot contain; the condition is taken
        # in cross-replica context instead, as LossScaleOptimizer does.
        # `finite` is the same on every replica: it is computed from the
        # global task losses.
        def cross_replica(distribution, finite, gradients):
            def apply():
                distribution.extended.call_for_each_replica(
                    self.optimizer.apply, args=(gradients, variables)
                )
                return tf.constant(True)

            finite = distribution.experimental_local_results(finite)[0]
            tf.cond(finite, apply, lambda: tf.constant(False))

        tf.distribute.get_replica_context().merge_call(
            cross_replica, args=(finite, gradients)
        )

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
        self._apply_if_finite(finite, gradients, variables)
        if self.weighting.updates_after_step:
            state = self.weighting.non_trainable_variables
            previous = [tf.identity(v.value) for v in state]
            self.update_weighting_after_step(x, y, sample_weight, task_losses)
            for variable, value in zip(state, previous):
                variable.assign(tf.where(finite, variable.value, value))
        self.record_step(tf.stop_gradient(objective), task_losses, weights, x)
        return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
