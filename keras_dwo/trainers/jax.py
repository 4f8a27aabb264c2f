"""The JAX training step, stateless and compiled with `jax.jit`."""

from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import keras
from keras.utils import unpack_x_y_sample_weight

from keras_dwo.trainers.scope import nested_mapping


class _Forward(NamedTuple):
    """What a stateless forward pass returns besides the scaled objective."""

    objective: Any
    task_losses: Any
    weights: Any
    y_pred: Any
    non_trainable_variables: Any


# A loop measured slightly faster than `jax.vmap` of the pullback on CPU for
# 2 to 8 tasks, and as fast at 8; but XLA compiles each unrolled pullback, so
# past that the compile time of the loop grows with every task.
UNROLLED_MAX_TASKS = 8


def _with_regularization(row):
    # The model's forward pass returns the task losses and the regularization.
    return (row, jnp.zeros(()))


def _pull_back_each_task(pullback, num_tasks, cotangent=_with_regularization):
    """Pulls each task loss back on its own; returns the results stacked.

    `cotangent(row)` is the cotangent of the function's outputs that selects
    one task loss.
    """
    rows = jnp.eye(num_tasks)
    if num_tasks > UNROLLED_MAX_TASKS:
        return jax.vmap(lambda row: pullback(cotangent(row)))(rows)
    pulled = [pullback(cotangent(row)) for row in rows]
    return jax.tree.map(lambda *per_task: jnp.stack(per_task), *pulled)


def _select(condition, new_values, old_values):
    return [jnp.where(condition, new, old) for new, old in zip(new_values, old_values)]


STATELESS_OPTIMIZERS = True


def runs_under_xla():
    """Whether the ops built now run under XLA: always on JAX.

    Eagerly too, `while_loop` compiles its loop into one computation.
    """
    return True


class _AssignmentsScope(keras.StatelessScope):
    """A `keras.StatelessScope` that lists the variables assigned in it."""

    def __init__(self, state_mapping):
        super().__init__()
        self.state_mapping = state_mapping
        self.assigned = {}

    def add_update(self, update):
        variable, _ = update
        self.assigned[id(variable)] = variable
        super().add_update(update)


def value_and_jacobian(function, variables):
    """`value_and_jacobian` (see `keras_dwo.trainers`) by one pullback per entry.

    The variables are read through a `keras.StatelessScope`, which keeps
    the values of an enclosing one (`TaskBalancer.stateless_apply`'s, under
    `jax.jit`); without one it runs eagerly, as stateful Keras code does on
    JAX. The variables that `function` assigns (a method's state, a batch
    normalization's statistics, a dropout's seed) are assigned their new
    values after it ran, as on the other backends.
    """
    differentiated = {id(variable) for variable in variables}
    assigned = []

    def run(values):
        scope = _AssignmentsScope(nested_mapping(list(zip(variables, values))))
        with scope:
            vector, aux = function()
        assigned.extend(
            v for key, v in scope.assigned.items() if key not in differentiated
        )
        return vector, (aux, [scope.get_current_value(v) for v in assigned])

    vector, pullback, (aux, new_values) = jax.vjp(
        run, [v.value for v in variables], has_aux=True
    )
    (rows,) = _pull_back_each_task(pullback, vector.shape[0], lambda row: row)
    for variable, value in zip(assigned, new_values):
        variable.assign(value)
    return vector, aux, list(rows)


def _times_zero(value):
    """0 if every entry of `value` is finite, NaN otherwise: a scalar.

    Every product with zero is 0 or NaN (for a NaN or an infinity), so no
    sum of them overflows. A matrix is multiplied by a zero vector: XLA on
    CPU runs the product as one vectorised pass over the matrix, where an
    elementwise `isfinite` and an `all` take a pass to write a boolean array
    and more to reduce it. The product takes full precision: an accelerator
    that rounds it to bfloat16 could round the largest finite float32
    values up to infinity.
    """
    if value.ndim < 2:
        return jnp.sum(value * 0)
    matrix = value.reshape(value.shape[0], -1)
    zeros = jnp.zeros((matrix.shape[0],), matrix.dtype)
    return jnp.sum(jnp.matmul(zeros, matrix, precision=jax.lax.Precision.HIGHEST))


def values_are_finite(values):
    """Whether every float tensor in `values` is finite: a boolean array."""
    floats = [
        value
        for value in map(jnp.asarray, values)
        if jnp.issubdtype(value.dtype, jnp.floating) and value.size
    ]
    if not floats:
        return jnp.asarray(True)
    return jnp.isfinite(sum(_times_zero(v).astype("float32") for v in floats))


def run_if(condition, function):
    """Runs `function()` if the scalar boolean `condition` is true (eagerly)."""
    if bool(condition):
        function()


class JAXTrainer:
    """`train_step` and `test_step` for the JAX backend.

    Like Keras' own JAX trainer, the steps take the model's state as arrays
    and return the new state; every variable the step reads (task weights,
    the weighting method's state) is a model-tracked variable, so a callback
    that assigns one between steps changes the next compiled step. Under
    `keras.distribution.DataParallel` the step computes on the global batch,
    so the task losses are those of one device.
    """

    def build_optimizer(self):
        """Creates the optimizer's variables for the trainable variables."""
        self.optimizer.build(self.trainable_variables)

    def sync_variables(self):
        """Makes the variables hold the training state.

        Within an epoch, Keras keeps the state of the last step apart from
        the variables; a callback that reads them mid-epoch syncs it.
        """
        self.jax_state_sync()

    def _state_variables(self):
        variables = [*self.trainable_variables, *self.non_trainable_variables]
        if getattr(self, "optimizer", None) is not None:
            variables += self.optimizer.variables
        return variables + list(self.metrics_variables)

    def _purge_model_variables(self, *args, **kwargs):
        # Keras releases the variables' values while an epoch runs and puts
        # the last step's state back at its end; an error raised before any
        # step returned would leave them released. Keeping what it releases
        # costs no memory (the first step donates these arrays). Keyed by id:
        # a list of variables would be tracked as the model's own.
        self._released_values = {id(v): v._value for v in self._state_variables()}
        super()._purge_model_variables(*args, **kwargs)

    def _restoring_state(self, method, *args, **kwargs):
        """Runs `fit`, `evaluate` or `predict`; after an error, the model's
        variables hold the last state that a step returned, or else the
        state before the call."""
        try:
            return method(*args, **kwargs)
        except BaseException:
            self.jax_state_sync()
            self._jax_state = None
            released = getattr(self, "_released_values", None) or {}
            for variable in self._state_variables():
                value = released.get(id(variable))
                if variable._value is None and value is not None:
                    variable.assign(value)
            raise
        finally:
            self._released_values = {}

    def fit(self, *args, **kwargs):
        return self._restoring_state(super().fit, *args, **kwargs)

    def evaluate(self, *args, **kwargs):
        return self._restoring_state(super().evaluate, *args, **kwargs)

    def predict(self, *args, **kwargs):
        return self._restoring_state(super().predict, *args, **kwargs)

    def _training_argument(self, training):
        # `stateless_call` calls `call` directly, as Keras's own step does,
        # so `training` is passed only where `call` takes it.
        return {"training": training} if self._call_has_training_arg else {}

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
            **self._training_argument(training),
        )
        mapping = list(zip(self.trainable_variables, trainable_variables))
        mapping += zip(self.non_trainable_variables, non_trainable_variables)
        if training:
            mapping += zip(self.optimizer.variables, optimizer_variables)
        with keras.StatelessScope(state_mapping=mapping) as scope:
            self._losses_override = regularization_losses
            try:
                task_losses = self.compute_task_losses(y, y_pred, sample_weight)
                objective, weights = self.compute_objective(
                    task_losses,
                    training,
                    label_counts=self.count_task_labels(y, sample_weight),
                )
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

    def _state_mapping(self, trainable, non_trainable, optimizer_variables):
        mapping = list(zip(self.trainable_variables, trainable))
        mapping += zip(self.non_trainable_variables, non_trainable)
        mapping += zip(self.optimizer.variables, optimizer_variables)
        return mapping

    def _stateless_scaled_losses(
        self,
        trainable,
        non_trainable,
        optimizer_variables,
        data,
        representation=None,
    ):
        """The scaled weighted task losses and regularization of a forward pass.

        With `representation`, only the task heads run, on that
        representation. Returns `((scaled_losses, scaled_regularization),
        (forward, has_regularization))`.
        """
        x, y, sample_weight = data
        mapping = self._state_mapping(trainable, non_trainable, optimizer_variables)
        with keras.StatelessScope(state_mapping=mapping, collect_losses=True) as scope:
            if representation is None:
                y_pred = self(x, training=True)
            else:
                heads = self.gradient_plan().heads
                y_pred = self.outputs_like_model(heads(representation, training=True))
            task_losses = self.compute_task_losses(y, y_pred, sample_weight)
            task_weights = jnp.asarray(self.task_weights.value)
            scaled_losses = self.optimizer.scale_loss(task_weights * task_losses)
            regularization = self.regularization_loss()
            has_regularization = regularization is not None
            if has_regularization:
                scaled_regularization = self.optimizer.scale_loss(regularization)
            else:
                scaled_regularization = jnp.zeros((), "float32")
        non_trainable = [
            scope.get_current_value(v) for v in self.non_trainable_variables
        ]
        forward = _Forward(None, task_losses, None, y_pred, non_trainable)
        return (scaled_losses, scaled_regularization), (forward, has_regularization)

    def _stateless_representation(
        self, trainable, non_trainable, optimizer_variables, x
    ):
        """The shared representation, and the regularization losses it adds."""
        mapping = self._state_mapping(trainable, non_trainable, optimizer_variables)
        with keras.StatelessScope(state_mapping=mapping, collect_losses=True) as scope:
            representation = keras.tree.flatten(
                self.gradient_plan().trunk(x, training=True)
            )
            losses = [jnp.sum(loss).astype("float32") for loss in scope.losses]
            scaled_regularization = self.optimizer.scale_loss(
                sum(losses, jnp.zeros((), "float32"))
            )
        non_trainable = [
            scope.get_current_value(v) for v in self.non_trainable_variables
        ]
        return (representation, scaled_regularization), non_trainable

    def _combined_gradients(self, trainable, non_trainable, optimizer_variables, data):
        """Per-task gradients of the shared variables, combined by the method.

        The task losses are pulled back once per task from one linearisation
        of the forward pass.
        """
        plan = self.gradient_plan()
        num_tasks = len(self.task_names)
        regularization_cotangent = (jnp.zeros((num_tasks,)), jnp.ones(()))
        if plan.trunk is None:
            _, pullback, (forward, has_regularization) = jax.vjp(
                lambda t: self._stateless_scaled_losses(
                    t, non_trainable, optimizer_variables, data
                ),
                trainable,
                has_aux=True,
            )
            (per_task,) = _pull_back_each_task(pullback, num_tasks)
            task_gradients = [per_task[i] for i in plan.shared_indices]
        else:
            (representation, _), trunk_pullback, trunk_non_trainable = jax.vjp(
                lambda t: self._stateless_representation(
                    t, non_trainable, optimizer_variables, data[0]
                ),
                trainable,
                has_aux=True,
            )
            _, heads_pullback, (forward, has_regularization) = jax.vjp(
                lambda t, r: self._stateless_scaled_losses(
                    t, trunk_non_trainable, optimizer_variables, data, r
                ),
                trainable,
                representation,
                has_aux=True,
            )
            _, task_gradients = _pull_back_each_task(heads_pullback, num_tasks)
        mapping = self._state_mapping(
            trainable, forward.non_trainable_variables, optimizer_variables
        )
        label_counts = self.count_task_labels(data[1], data[2])
        with keras.StatelessScope(state_mapping=mapping) as scope:
            objective, _ = self.compute_objective(
                forward.task_losses, label_counts=label_counts
            )
            combined, weights, head_weights = self.combine_task_gradients(
                task_gradients, forward.task_losses, label_counts
            )
        new_non_trainable = [
            scope.get_current_value(v) for v in self.non_trainable_variables
        ]
        # The task-specific gradients by a pullback of their own, not from
        # the per-task gradients: under data parallelism XLA would sum those
        # over the devices for every task, zero rows of the other heads
        # included.
        head_cotangent = (head_weights.astype("float32"), jnp.zeros(()))
        if plan.trunk is None:
            (gradients,) = pullback(head_cotangent)
        else:
            gradients, _ = heads_pullback(head_cotangent)
        gradients = list(gradients)
        if plan.trunk is None:
            for index, gradient in zip(plan.shared_indices, combined):
                gradients[index] = gradient
            if has_regularization:
                (regularization,) = pullback(regularization_cotangent)
                gradients = [g + r for g, r in zip(gradients, regularization)]
        else:
            trunk_cotangent = combined
            if has_regularization:
                regularization, representation_regularization = heads_pullback(
                    regularization_cotangent
                )
                gradients = [g + r for g, r in zip(gradients, regularization)]
                trunk_cotangent = [
                    c + r for c, r in zip(combined, representation_regularization)
                ]
            (trunk_gradients,) = trunk_pullback((trunk_cotangent, jnp.ones(())))
            gradients = [g + t for g, t in zip(gradients, trunk_gradients)]
        forward = forward._replace(
            objective=objective,
            weights=weights,
            non_trainable_variables=new_non_trainable,
        )
        return gradients, forward

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
            trainable_variables,
            non_trainable_variables,
            x,
            **self._training_argument(False),
        )
        mapping = zip(self.non_trainable_variables, non_trainable_variables)
        with keras.StatelessScope(state_mapping=mapping) as scope:
            losses_after = self.compute_task_losses(y, y_pred, sample_weight)
            self.update_weighting(
                losses_before,
                losses_after,
                self.count_task_labels(y, sample_weight),
            )
        return [scope.get_current_value(v) for v in self.non_trainable_variables]

    def _stateless_record(
        self,
        metrics_variables,
        forward,
        x,
        y,
        sample_weight,
        applied=True,
        training=True,
    ):
        mapping = zip(self.metrics_variables, metrics_variables)
        with keras.StatelessScope(state_mapping=mapping) as scope:
            self.record_step(
                forward.objective,
                forward.task_losses,
                forward.weights,
                x,
                self.count_task_labels(y, sample_weight),
                applied,
                training,
            )
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
        if self.uses_task_gradients():
            gradients, forward = self._combined_gradients(
                trainable_variables,
                non_trainable_variables,
                optimizer_variables,
                (x, y, sample_weight),
            )
        else:
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
        mapping = zip(self.non_trainable_variables, non_trainable_variables)
        with keras.StatelessScope(state_mapping=mapping):
            finite = self.step_is_finite(
                forward.task_losses, forward.objective, gradients, new_non_trainable
            )
        scaled = isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer)
        if scaled:
            # The LossScaleOptimizer skips a non-finite step itself and
            # lowers its loss scale, as it does for a plain model.
            gradients = [jnp.where(finite, g, jnp.nan) for g in gradients]
        new_trainable, new_optimizer = self.optimizer.stateless_apply(
            optimizer_variables, gradients, trainable_variables
        )
        label_counts = self.count_task_labels(y, sample_weight)
        if label_counts is not None:
            new_trainable, new_optimizer = list(new_trainable), list(new_optimizer)
            for new, old, indices in zip(
                (new_trainable, new_optimizer),
                (trainable_variables, optimizer_variables),
                self.absent_task_state(),
            ):
                kept = self.keep_absent_tasks(
                    [new[i] for i in indices], [old[i] for i in indices], label_counts
                )
                for index, value in zip(indices, kept):
                    new[index] = value
        keep_state = finite
        if self.weighting.updates_after_step:
            new_non_trainable = self._stateless_weighting_update(
                new_trainable,
                new_non_trainable,
                x,
                y,
                sample_weight,
                forward.task_losses,
            )
            keep_state = finite & self.values_are_finite(new_non_trainable)
        logs, metrics_variables = self._stateless_record(
            metrics_variables, forward, x, y, sample_weight, finite
        )
        state = (
            _select(finite, new_trainable, trainable_variables),
            _select(keep_state, new_non_trainable, non_trainable_variables),
            new_optimizer
            if scaled
            else _select(finite, new_optimizer, optimizer_variables),
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
            metrics_variables, forward, x, y, sample_weight, training=False
        )
        return logs, (trainable_variables, non_trainable_variables, metrics_variables)
