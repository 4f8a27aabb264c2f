"""TaskBalancer: dynamic loss weighting inside a custom training step or loop."""

import keras
from keras import ops

from keras_dwo import aggregation
from keras_dwo import tasks
from keras_dwo import trainers
from keras_dwo import weighting as weighting_module
from keras_dwo.gradient_plan import layer_sizes
from keras_dwo.model import DynamicWeightedModel
from keras_dwo.task_weights import validated_task_weights
from keras_dwo.task_weights import weights_and_values_are_finite
from keras_dwo.trainers.scope import get_stateless_scope
from keras_dwo.weighting.base import check_unclaimed


@keras.saving.register_keras_serializable(package="keras_dwo")
class TaskBalancer(keras.layers.Layer):
    """Balances task losses computed in your own training step.

    `DynamicWeightedModel` balances the losses of its outputs inside `fit`.
    Where the losses live in a step you write yourself (a GAN's generator
    balancing its adversarial term against a reconstruction term, a
    detector's custom step), a `TaskBalancer` takes a function that returns
    the task losses and trains the variables you give it on their balanced
    combination, with any method:

    - a loss-level method (uncertainty, RLW, FAMO...) weights the losses,
      and one backward pass gives the gradients of the variables and of the
      method's own learned weights;
    - a gradient-level method (UPGrad, MGDA, PCGrad...) combines the
      per-task gradients of every variable given into one direction, with
      the same combination code as `DynamicWeightedModel`.

    As in `fit`, a step is applied only if the task losses, the gradients
    and the method's new state are finite; otherwise the variables, the
    optimizer and the method keep their values and `applied` is false in
    the returned logs. The balancer is a layer: set it as an attribute of
    your model and its state (task weights, the method's variables) is
    saved and loaded with the model.

    Per-task gradients come from `keras_dwo.trainers.value_and_jacobian`,
    one implementation per backend. `apply` assigns variables: it runs
    inside `tf.function` on TensorFlow, eagerly on torch, and eagerly on
    JAX, where compiled code cannot assign. `stateless_apply` takes and
    returns the values instead, for Keras's JAX `train_step` (compiled with
    `jax.jit`) or any stateless step.

    Args:
        weighting: The method: an identifier, a serialized method or an
            instance, as for `DynamicWeightedModel`.
        task_names: The names of the tasks, in the order of the losses.
        loss_weights: Optional initial `task_weights`: a dict keyed by task
            name or a list in task order.
        **kwargs: Passed to `keras.layers.Layer`.

    Example:

    ```python
    balancer = keras_dwo.TaskBalancer("upgrad", ["adversarial", "l1"])

    def generator_losses():
        fake = generator(noise)
        return {
            "adversarial": bce(ones, discriminator(fake)),
            "l1": mae(real, fake),
        }

    logs = balancer.apply(g_optimizer, generator_losses,
                          generator.trainable_variables)
    logs["adversarial_weight"], logs["applied"]
    ```
    """

    def __init__(self, weighting, task_names, loss_weights=None, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if isinstance(task_names, str) or len(task_names) < 2:
            raise ValueError(
                "A TaskBalancer balances two or more tasks; received "
                f"task_names={task_names!r}. A single loss needs no balancer."
            )
        self.task_names = tasks.checked_task_names(task_names)
        method = weighting_module.get(weighting)
        check_unclaimed(method, "balancer")
        method.build(self.task_names)
        self.method = method
        initial = [1.0] * len(self.task_names)
        if loss_weights is not None:
            initial = validated_task_weights(
                tasks.by_name(
                    loss_weights, self.task_names, "loss weight", kind="task"
                ),
                self.task_names,
            )
        self.loss_weights = None if loss_weights is None else list(initial)
        self.task_weights = self.add_weight(
            shape=(len(self.task_names),),
            initializer=keras.initializers.Constant(initial),
            trainable=False,
            name="task_weights",
        )
        self.built = True

    def task_losses(self, losses):
        """Returns a dict, sequence or vector of task losses as a `(T,)` vector."""
        if isinstance(losses, (dict, list, tuple)):
            values = tasks.by_name(losses, self.task_names, "loss", kind="task")
            values = [ops.convert_to_tensor(value) for value in values]
            for name, value in zip(self.task_names, values):
                shape = tuple(ops.shape(value))
                if any(size != 1 for size in shape):
                    raise ValueError(
                        f"The loss of task {name!r} is not a scalar: its shape "
                        f"is {shape}. Reduce it (a mean over the batch) first."
                    )
            return ops.stack(
                [ops.cast(ops.reshape(value, ()), "float32") for value in values]
            )
        losses = ops.cast(losses, "float32")
        if tuple(losses.shape) != (len(self.task_names),):
            raise ValueError(
                f"Expected one loss per task {self.task_names}; received a "
                f"tensor of shape {tuple(losses.shape)}."
            )
        return losses

    def objective(self, task_losses, training=True, present=None):
        """Returns `(objective, weights)` of a loss-level method's weighting.

        Args:
            task_losses: The task losses, as for `task_losses`.
            training: Whether the method may update its state.
            present: None, or the `(T,)` 0/1 mask of the tasks with labels.

        Returns:
            The scalar objective and its derivative with respect to each
            unweighted task loss (the effective weights).

        Raises:
            ValueError: For a gradient-level method, which weighs gradients
                rather than losses, or a method that updates its weights
                from the losses after the step (FAMO): use `apply`.
        """
        method = self.method
        if method.needs_task_gradients or method.updates_after_step:
            what = (
                "combines per-task gradients"
                if method.needs_task_gradients
                else "updates its weights from the losses after each step"
            )
            raise ValueError(
                "`objective` gives a loss-level method's objective, but "
                f"{type(method).__name__} {what}: take the step with `apply` "
                "(or `stateless_apply`)."
            )
        return self._objective(task_losses, training, present)

    def _objective(self, task_losses, training=True, present=None):
        task_weights = ops.convert_to_tensor(self.task_weights)
        presence = {} if present is None else {"present": present}
        objective, weights = self.method.call(
            task_weights * self.task_losses(task_losses), training=training, **presence
        )
        return objective, task_weights * weights

    def apply(self, optimizer, loss_fn, variables):
        """Takes one balanced step of `variables` on the losses of `loss_fn`.

        Args:
            optimizer: The `keras.optimizers.Optimizer` of these variables
                (with a loss-level method that learns weights, it also
                trains the method's variables: give the balancer its own
                optimizer or one that only this call uses).
            loss_fn: Takes nothing and returns the task losses, computed
                from the current variables: a dict keyed by task name, a
                list in task order or a `(T,)` tensor.
            variables: The trainable variables to train.

        Returns:
            A dict of scalars: `loss` (the objective), `<task>_loss`,
            `<task>_weight` and `applied` (whether the step was finite and
            applied).
        """
        return self._step(optimizer, loss_fn, list(variables), trainers.run_if)

    def stateless_apply(self, optimizer, loss_fn, variables, state_mapping):
        """`apply` on values given and returned, for a stateless step.

        Keras's JAX `train_step` takes the model's state as arrays and
        returns the new state; it cannot assign variables. There, the step
        runs in a `keras.StatelessScope` over `state_mapping`, inside the
        compiled step: `loss_fn` reads the variables as in `apply` (call
        your layers as usual) and sees the mapped values. JAX and torch
        only: Keras's TensorFlow optimizers have no stateless update (their
        own `stateless_apply` raises too); there `apply` compiles.

        Args:
            optimizer: As for `apply`; it must be built, for `variables`
                (and the method's trainable variables, if it learns
                weights).
            loss_fn: As for `apply`.
            variables: As for `apply`.
            state_mapping: `(variable, value)` pairs, as for
                `keras.StatelessScope`: every variable `loss_fn` reads, the
                optimizer's variables and the balancer's own.

        Returns:
            `(logs, values)`: the logs of `apply` and the new value of each
            variable of `state_mapping`, in its order. Where `applied` is
            false, the trained variables, the optimizer's and the
            balancer's keep the values given.

        Example:

        ```python
        def train_step(self, state, data):
            trainable, non_trainable, optimizer_values, metrics = state
            x, y = data
            mapping = [
                *zip(self.trainable_variables, trainable),
                *zip(self.non_trainable_variables, non_trainable),
                *zip(self.optimizer.variables, optimizer_values),
            ]

            def losses():
                return keras.ops.mean((self(x, training=True) - y) ** 2, axis=0)

            logs, values = self.balancer.stateless_apply(
                self.optimizer, losses, self.network.trainable_variables, mapping
            )
            trainable_count = len(trainable)
            count = trainable_count + len(non_trainable)
            state = (
                values[:trainable_count],
                values[trainable_count:count],
                values[count:],
                metrics,
            )
            return logs, state
        ```
        """
        if not trainers.STATELESS_OPTIMIZERS:
            raise ValueError(
                "`stateless_apply` is not available on the TensorFlow backend: "
                "Keras's TensorFlow optimizers have no stateless update. Call "
                "`apply` in your `train_step`; it is compiled with it."
            )
        variables = list(variables)
        state_mapping = list(state_mapping)
        if not optimizer.built:
            raise ValueError(
                "`stateless_apply` needs a built optimizer: call "
                "`optimizer.build(variables)` first."
            )
        # The state a method keeps per parameter is made here, so that the
        # mapping is checked for it too.
        self.build_columns(variables)
        trained = self._trained_variables(variables)
        mapped = {id(variable) for variable, _ in state_mapping}
        missing = [
            variable.path
            for variable in [*trained, *optimizer.variables, *self.variables]
            if id(variable) not in mapped
        ]
        if missing:
            per_parameter = ""
            if self.method.column_state:
                per_parameter = (
                    f" {type(self.method).__name__} keeps state per parameter: "
                    "call `balancer.build_columns(variables)` before making "
                    "the mapping."
                )
            raise ValueError(
                f"`state_mapping` has no value for the variable(s) {missing}; "
                "map the trained variables, the optimizer's and the "
                f"balancer's.{per_parameter}"
            )
        guarded = {id(variable) for variable in [*trained, *optimizer.variables]}
        # Keras's torch optimizers update values in place, even in a
        # stateless scope: the step updates copies of the values given.
        scoped = [
            (variable, ops.copy(value) if id(variable) in guarded else value)
            for variable, value in state_mapping
        ]
        with keras.StatelessScope(state_mapping=scoped) as scope:
            logs = self._step(optimizer, loss_fn, variables, _always)
        applied = logs["applied"]
        values = []
        for variable, value in state_mapping:
            new_value = scope.get_current_value(variable)
            if id(variable) in guarded:
                new_value = ops.where(applied, new_value, value)
            values.append(new_value)
        return logs, values

    def _trained_variables(self, variables):
        """The variables an optimizer step changes: these and the method's."""
        if self.method.needs_task_gradients:
            return variables
        given = {id(variable) for variable in variables}
        learned = [v for v in self.method.trainable_variables if id(v) not in given]
        return variables + learned

    def build_columns(self, variables):
        """Makes the state of a method kept per parameter, for `variables`.

        DB-MTL, MoCo, ExcessMTL, MoDo, SDMGrad and GradVac per layer
        (`column_state`) keep state per parameter or layer. Each step calls
        this (the state is made once); call it yourself before a first step
        that is compiled (`stateless_apply` under `jax.jit`, a
        `tf.function`), where no variable can be made.
        """
        if self.method.column_state:
            self.method.build_columns(layer_sizes(list(variables)))

    def _step(self, optimizer, loss_fn, variables, run_if):
        """The step of `apply`; `run_if(condition, function)` guards its updates."""
        if not variables:
            raise ValueError(
                "`variables` is empty: there is nothing to train. A model "
                "that builds its layers at its first call has no variables "
                "before it: call it on a batch first."
            )
        method = self.method
        self.build_columns(variables)
        task_weights = ops.convert_to_tensor(self.task_weights)
        state = list(method.non_trainable_variables)
        previous = [ops.copy(v.value) for v in state]
        trained = self._trained_variables(variables)
        if method.needs_task_gradients:

            def weighted_losses():
                losses = self.task_losses(loss_fn())
                return optimizer.scale_loss(task_weights * losses), losses

            _, losses, rows = trainers.value_and_jacobian(weighted_losses, trained)
            losses = ops.stop_gradient(losses)
            gradients, coefficients = aggregation.combine(method, rows, losses)
            objective = ops.sum(task_weights * losses)
            weights = task_weights * coefficients
        else:

            def weighted_objective():
                losses = self.task_losses(loss_fn())
                objective, weights = self._objective(losses)
                scaled = optimizer.scale_loss(objective)
                return ops.reshape(scaled, (1,)), (objective, losses, weights)

            _, (objective, losses, weights), rows = trainers.value_and_jacobian(
                weighted_objective, trained
            )
            objective = ops.stop_gradient(objective)
            losses = ops.stop_gradient(losses)
            gradients = [row[0] for row in rows]
        finite = weights_and_values_are_finite(
            task_weights, [losses, objective, *gradients, *[v.value for v in state]]
        )
        if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
            # As in `fit`: the optimizer gets the non-finite gradients, skips
            # the update itself and lowers its loss scale.
            nan = float("nan")
            gradients = [ops.where(finite, g, nan) for g in gradients]
            _apply_loss_scale_optimizer(optimizer, gradients, trained)
        else:
            run_if(finite, lambda: optimizer.apply(gradients, trained))
        keep_state = finite
        if method.updates_after_step:

            def update():
                after = ops.stop_gradient(self.task_losses(loss_fn()))
                method.update(task_weights * losses, task_weights * after)

            run_if(finite, update)
            keep_state = ops.logical_and(
                finite, DynamicWeightedModel.values_are_finite([v.value for v in state])
            )
        for variable, value in zip(state, previous):
            variable.assign(ops.where(keep_state, variable.value, value))
        logs = {"loss": objective}
        for index, name in enumerate(self.task_names):
            logs[f"{name}_loss"] = losses[index]
            logs[f"{name}_weight"] = ops.stop_gradient(weights[index])
        logs["applied"] = finite
        return logs

    def get_config(self):
        return {
            **super().get_config(),
            "weighting": keras.saving.serialize_keras_object(self.method),
            "task_names": list(self.task_names),
            "loss_weights": self.loss_weights,
        }


def _apply_loss_scale_optimizer(optimizer, gradients, variables):
    """`optimizer.apply` of a `LossScaleOptimizer`; on JAX, its stateless update.

    Keras's `LossScaleOptimizer` updates JAX variables only through
    `stateless_apply` (its `apply` leaks tracers from a conditional), so on
    JAX it updates the values of the enclosing `keras.StatelessScope`.
    """
    if keras.backend.backend() != "jax":
        optimizer.apply(gradients, variables)
        return
    scope = get_stateless_scope()
    if scope is None:
        raise ValueError(
            "On JAX, Keras's LossScaleOptimizer (mixed precision) has no "
            "stateful update: use `stateless_apply`, as Keras's own JAX "
            "`train_step` does."
        )
    new_variables, new_optimizer_variables = optimizer.stateless_apply(
        [scope.get_current_value(v) for v in optimizer.variables],
        gradients,
        [scope.get_current_value(v) for v in variables],
    )
    for variable, value in zip(
        [*variables, *optimizer.variables],
        [*new_variables, *new_optimizer_variables],
    ):
        variable.assign(value)


def _always(condition, function):
    """`run_if` of a stateless step: it runs, and the result is selected after."""
    del condition
    function()
