"""The TensorFlow training step."""

import contextlib

import keras
import tensorflow as tf
from keras.utils import unpack_x_y_sample_weight

# TensorFlow's only test of an XLA context; it has no public one.
from tensorflow.python.ops import control_flow_util

from keras_dwo.trainers.stateful import StatefulTrainer
from keras_dwo.trainers.stateful import replicas_task_losses


def _zeros_for_none(gradients, sources):
    # `unconnected_gradients=ZERO` fails on Keras variables.
    return [tf.zeros_like(s) if g is None else g for g, s in zip(gradients, sources)]


def _as_list(grads_and_vars):
    return list(grads_and_vars)


@contextlib.contextmanager
def _gradients_already_summed(optimizer):
    """Keeps Keras's optimizer from summing the replicas' gradients again.

    Within the context, `optimizer.apply` takes the gradients as the sums
    over the replicas that they already are.
    """
    optimizers = [optimizer]
    if getattr(optimizer, "inner_optimizer", None) is not None:
        optimizers.append(optimizer.inner_optimizer)
    for each in optimizers:
        # Set past the optimizer's attribute tracking, and removed after.
        object.__setattr__(each, "_all_reduce_sum_gradients", _as_list)
    try:
        yield
    finally:
        for each in optimizers:
            object.__delattr__(each, "_all_reduce_sum_gradients")


def _gather_samples(context, task_gradients):
    """Concatenates `(T, samples, ...)` tensors over the replicas, in order.

    Returns:
        `(gathered, start, size)`: the gathered tensors, and where this
        replica's samples lie in them.
    """
    size = tf.shape(task_gradients[0])[1]
    sizes = context.all_gather(tf.reshape(size, (1,)), axis=0)
    start = tf.reduce_sum(sizes[: context.replica_id_in_sync_group])
    gathered = [context.all_gather(g, axis=1) for g in task_gradients]
    return gathered, start, size


# Keras's TensorFlow optimizers update tf.Variables; they raise in a
# stateless scope (their own `stateless_apply` raises).
STATELESS_OPTIMIZERS = False


def runs_under_xla():
    """Whether the ops built now run in one XLA computation.

    True within a `tf.function(jit_compile=True)` (a model compiled with
    `jit_compile=True`, the default where TensorFlow sees a GPU), false in
    other graphs and eagerly.
    """
    return control_flow_util.GraphOrParentsInXlaContext(
        tf.compat.v1.get_default_graph()
    )


def value_and_jacobian(function, variables):
    """`value_and_jacobian` (see `keras_dwo.trainers`) under a persistent tape."""
    with tf.GradientTape(persistent=True) as tape:
        vector, aux = function()
        # Sliced under the tape, so that each slice has a recorded path.
        entries = tf.unstack(vector)
    rows = _jacobian(tape, entries, variables)
    del tape
    return vector, aux, rows


def _jacobian(tape, entries, sources, scales=None):
    """One `(T, ...)` tensor per source: the gradients of each of T scalars.

    `scales`, if given, is a `(T,)` tensor: row `i` is the gradient of
    `scales[i] * entries[i]`. Scalars that were stacked into a vector are
    cheaper entries than the vector's slices, whose gradients run through
    every stacked scalar's graph.
    """
    rows = [
        _zeros_for_none(
            tape.gradient(entry, sources, None if scales is None else scales[index]),
            sources,
        )
        for index, entry in enumerate(entries)
    ]
    return [tf.stack(per_entry) for per_entry in zip(*rows)]


def values_are_finite(values):
    """Whether every float tensor in `values` is finite: a boolean tensor.

    Each tensor times zero is zero where it is finite and NaN elsewhere, so
    one sum of those products is finite exactly when every entry is (no
    overflow: every term is 0 or NaN). TensorFlow's executor, which runs
    each op of a CPU step on its own, runs a multiply and a sum per tensor
    faster than an `isfinite` and an `all` (measured on the step of
    benchmarks/overhead.py); XLA on JAX is faster with the latter.
    """
    values = [tf.convert_to_tensor(value) for value in values]
    sums = [
        tf.reduce_sum(tf.cast(value, tf.float32) * 0.0)
        for value in values
        if value.dtype.is_floating
    ]
    if not sums:
        return tf.constant(True)
    return tf.math.is_finite(tf.add_n(sums))


def run_if(condition, function):
    """Runs `function()` if the scalar boolean tensor `condition` is true."""

    def run():
        function()
        return tf.constant(True)

    tf.cond(condition, run, lambda: tf.constant(False))


class TensorFlowTrainer(StatefulTrainer):
    """`train_step` for the TensorFlow backend, under `tf.function` and XLA.

    Under a `tf.distribute` strategy with R replicas, the step combines the
    replicas' task losses, weighted by their (labelled) samples, so that
    every replica computes the weighting on the global task losses, as one
    device would, while the gradient still flows through the replica's own
    losses; it then divides the objective by R, because the strategy sums the
    replicas' gradients. Gradient-level methods are not linear in the
    gradients, so their per-task gradients are summed over the replicas
    before they are combined (the gradients of a representation, whose rows
    are samples, are gathered instead); the combined direction is then the
    same on every replica, so the head gradients are summed with it and the
    optimizer applies them without summing again. The learned weighting
    state and the optimizer update therefore match one device's for every
    method.
    """

    def fit(self, *args, **kwargs):
        try:
            return super().fit(*args, **kwargs)
        except BaseException:
            # A first trace that failed may have created the optimizer's
            # variables; the next `fit` must trace anew.
            self.train_function = None
            raise

    def build_optimizer(self):
        # Outside the strategy's scope (in `fit`), the optimizer's variables
        # could not be mirrored.
        with self.distribute_strategy.scope():
            super().build_optimizer()

    def _replica_context(self):
        context = tf.distribute.get_replica_context()
        replicas = 1 if context is None else context.num_replicas_in_sync
        return context, replicas

    def global_task_losses(self, task_losses, label_counts, x):
        context, replicas = self._replica_context()
        if replicas == 1:
            return task_losses, label_counts, 1
        # Keras divides each replica's losses by R: times R, they are the
        # means over the replica's own samples.
        losses, label_counts = replicas_task_losses(
            task_losses * replicas,
            label_counts,
            x,
            replicas,
            lambda values: context.all_reduce(tf.distribute.ReduceOp.SUM, values),
        )
        return losses, label_counts, replicas

    def _apply_if_finite(self, finite, gradients, variables, summed):
        # The optimizer synchronises replicas with `merge_call`, which a
        # `tf.cond` in replica context cannot contain; the condition is taken
        # in cross-replica context instead, as LossScaleOptimizer does.
        # A LossScaleOptimizer is handed non-finite gradients instead of a
        # skipped step, so that it lowers its loss scale as it does for a
        # plain model. `summed`: the gradients are already sums over the
        # replicas.
        summing = _gradients_already_summed if summed else contextlib.nullcontext
        if isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
            nan = tf.constant(float("nan"))
            gradients = [tf.where(finite, g, tf.cast(nan, g.dtype)) for g in gradients]
            with summing(self.optimizer):
                self.optimizer.apply(gradients, variables)
            return

        def cross_replica(distribution, finite, gradients):
            def apply():
                with summing(self.optimizer):
                    distribution.extended.call_for_each_replica(
                        self.optimizer.apply, args=(gradients, variables)
                    )
                return tf.constant(True)

            finite = distribution.experimental_local_results(finite)[0]
            tf.cond(finite, apply, lambda: tf.constant(False))

        tf.distribute.get_replica_context().merge_call(
            cross_replica, args=(finite, gradients)
        )

    def _objective_gradients(self, x, y, sample_weight):
        """One backward pass through the objective of a loss-level method."""
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            task_losses, label_counts, replicas = self.global_task_losses(
                self.compute_task_losses(y, y_pred, sample_weight),
                self.count_task_labels(y, sample_weight),
                x,
            )
            objective, weights = self.compute_objective(
                task_losses, training=True, label_counts=label_counts
            )
            scaled_objective = self.optimizer.scale_loss(objective / replicas)
        variables = self.trainable_variables
        gradients = _zeros_for_none(
            tape.gradient(scaled_objective, variables), variables
        )
        return y_pred, task_losses, label_counts, objective, weights, gradients

    def _combined_gradients(self, x, y, sample_weight):
        """Per-task gradients of the shared variables, combined by the method."""
        plan = self.gradient_plan()
        context, replicas = self._replica_context()
        variables = self.trainable_variables
        shared = [variables[i] for i in plan.shared_indices]
        others = [variables[i] for i in plan.other_indices]
        with tf.GradientTape(persistent=True) as tape:
            if plan.trunk is None:
                y_pred = self(x, training=True)
            else:
                representation = tf.nest.flatten(plan.trunk(x, training=True))
                y_pred = self.outputs_like_model(
                    plan.heads(representation, training=True)
                )
            each_loss = self.compute_each_task_loss(y, y_pred, sample_weight)
            own_losses = tf.stack(each_loss)
            task_losses, label_counts, replicas = self.global_task_losses(
                own_losses, self.count_task_labels(y, sample_weight), x
            )
            scaled_losses = self.optimizer.scale_loss(
                self.task_weights * task_losses / replicas
            )
            # The same on every replica, whose gradients are not summed.
            regularization = self.regularization_loss()
            if regularization is not None:
                regularization = self.optimizer.scale_loss(regularization)
        # Each task differentiated from its own loss, scaled as in
        # `scaled_losses`: every map from the stacked losses to those is
        # elementwise.
        scales = tape.gradient(scaled_losses, own_losses)
        sources = shared if plan.trunk is None else representation
        task_gradients = _jacobian(tape, each_loss, sources, scales)
        if replicas > 1 and plan.trunk is None:
            task_gradients = context.all_reduce(
                tf.distribute.ReduceOp.SUM, task_gradients
            )
        elif replicas > 1:
            # The representation's rows are samples: the replicas' rows
            # together are the whole batch's.
            task_gradients, start, size = _gather_samples(context, task_gradients)
        task_losses = tf.stop_gradient(task_losses)
        objective, _ = self.compute_objective(task_losses, label_counts=label_counts)
        combined, weights, head_weights = self.combine_task_gradients(
            task_gradients, task_losses, label_counts
        )
        if plan.trunk is None:
            shared_gradients = combined
        else:
            if replicas > 1:
                combined = [c[start : start + size] for c in combined]
            shared_gradients = _zeros_for_none(
                tape.gradient(representation, shared, output_gradients=combined),
                shared,
            )
        other_gradients = _zeros_for_none(
            tape.gradient(scaled_losses, others, output_gradients=head_weights),
            others,
        )
        if replicas > 1 and plan.trunk is None and other_gradients:
            other_gradients = context.all_reduce(
                tf.distribute.ReduceOp.SUM, other_gradients
            )
        elif replicas > 1:
            summed = context.all_reduce(
                tf.distribute.ReduceOp.SUM, other_gradients + shared_gradients
            )
            other_gradients = summed[: len(others)]
            shared_gradients = summed[len(others) :]
        gradients = [None] * len(variables)
        for index, gradient in zip(plan.shared_indices, shared_gradients):
            gradients[index] = gradient
        for index, gradient in zip(plan.other_indices, other_gradients):
            gradients[index] = gradient
        if regularization is not None:
            gradients = [
                g + r
                for g, r in zip(
                    gradients,
                    _zeros_for_none(
                        tape.gradient(regularization, variables), variables
                    ),
                )
            ]
        del tape
        return y_pred, task_losses, label_counts, objective, weights, gradients

    def train_step(self, data):
        x, y, sample_weight = unpack_x_y_sample_weight(data)
        # Methods may update their state during the step; a step that is not
        # applied restores it.
        state = self.weighting.non_trainable_variables
        previous = [tf.identity(v.value) for v in state]
        # A gradient-level step's gradients are sums over the replicas.
        summed = self.uses_task_gradients()
        if summed:
            step = self._combined_gradients(x, y, sample_weight)
        else:
            step = self._objective_gradients(x, y, sample_weight)
        y_pred, task_losses, label_counts, objective, weights, gradients = step
        task_losses = tf.stop_gradient(task_losses)
        objective = tf.stop_gradient(objective)
        finite = self.step_is_finite(
            task_losses, objective, gradients, [v.value for v in state]
        )
        self.apply_keeping_absent_tasks(
            lambda: self._apply_if_finite(
                finite, gradients, self.trainable_variables, summed
            ),
            label_counts,
        )
        keep_state = finite
        if self.weighting.updates_after_step:
            self.update_weighting_after_step(
                x, y, sample_weight, task_losses, label_counts
            )
            keep_state = tf.logical_and(
                finite, self.values_are_finite([v.value for v in state])
            )
        for variable, value in zip(state, previous):
            variable.assign(tf.where(keep_state, variable.value, value))
        self.record_step(objective, task_losses, weights, x, label_counts, finite)
        return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
