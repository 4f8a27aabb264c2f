"""DynamicWeightedModel: a functional multi-task model with dynamic weighting."""

import dataclasses
import inspect
import math

import keras
from keras import ops

from keras_dwo import task_graph
from keras_dwo import weighting as weighting_module
from keras_dwo.task_tracker import TaskTracker
from keras_dwo.trainers import Trainer


def _output_task_names(outputs):
    if isinstance(outputs, dict):
        names = [str(name) for name in outputs]
        leaves = list(outputs.values())
    elif isinstance(outputs, (list, tuple)):
        leaves = list(outputs)
        names = [output._keras_history.operation.name for output in leaves]
    else:
        leaves, names = [outputs], []
    if any(isinstance(leaf, (dict, list, tuple)) for leaf in leaves):
        raise ValueError(
            "Each task must be a single output tensor; received nested outputs."
        )
    if len(leaves) < 2:
        raise ValueError(
            "DynamicWeightedModel needs at least two tasks (outputs); received "
            f"{len(leaves)}. Use a plain keras.Model for a single task."
        )
    if len(set(names)) != len(names):
        raise ValueError(f"Task names must be unique; received {names}.")
    return tuple(names)


class _FunctionLoss(keras.losses.Loss):
    """A loss function as a `keras.losses.Loss`, so it takes `sample_weight`."""

    def __init__(self, function):
        super().__init__(name=getattr(function, "__name__", None))
        self.function = function

    def call(self, y_true, y_pred):
        return self.function(y_true, y_pred)


def _resolve_loss(identifier, task):
    loss = keras.losses.get(identifier)
    if loss is None:
        raise ValueError(f"Task {task!r} has no loss; received {identifier!r}.")
    if isinstance(loss, keras.losses.Loss):
        return loss
    if callable(loss):
        return _FunctionLoss(loss)
    raise ValueError(f"Could not interpret the loss of task {task!r}: {loss!r}.")


@dataclasses.dataclass
class GradientPlan:
    """Where a gradient-level step takes its per-task gradients.

    Attributes:
        shared_indices: Positions in `model.trainable_variables` of the
            shared variables.
        other_indices: Positions of the other (task-specific) variables.
        trunk: With `wrt="representation"`, a model from the inputs to the
            shared representation, sharing the layers; else None.
        heads: With `wrt="representation"`, a model from the shared
            representation to the outputs (a list in task order); else None.
    """

    shared_indices: list
    other_indices: list
    trunk: keras.Model | None = None
    heads: keras.Model | None = None


def _presence(label_counts):
    """Returns `{"present": (T,) 0/1 mask of the tasks with labels}` or `{}`.

    Without partial labels nothing is passed, so methods written before the
    `present` argument keep working.
    """
    if label_counts is None:
        return {}
    return {"present": ops.cast(label_counts > 0, "float32")}


def _check_takes_presence(method):
    rules = ["call", "update"]
    if method.needs_task_gradients:
        rules.append("aggregate")
    for rule in rules:
        if "present" not in inspect.signature(getattr(method, rule)).parameters:
            raise ValueError(
                f"With `missing_label`, the weighting method must learn which "
                f"tasks have labels in a batch, but {type(method).__name__}."
                f"{rule} takes no `present` argument."
            )


@keras.saving.register_keras_serializable(package="keras_dwo")
class DynamicWeightedModel(Trainer, keras.Model):
    """A multi-output functional model whose task losses are weighted while it trains.

    Build it like a functional `keras.Model`; each output is a task. Compile
    it with one loss per task and train it with `fit` as usual: at every step
    the per-task losses are multiplied by `task_weights` and combined by the
    `weighting` method. The logs carry `<task>_loss` (the unweighted loss),
    `<task>_weight` (the derivative of the objective with respect to that task
    loss in the last step) and `loss` (the objective that was minimised).

    With a gradient-level method (MGDA, PCGrad, UPGrad...), every step takes
    the gradient of each weighted task loss `task_weights[i] * L_i` with
    respect to the shared variables (those of the layers that feed two or
    more outputs, or the layers named in `shared`) and lets the method
    combine these rows into the direction that the optimizer applies to
    them. Each task's own variables get the gradient of its weighted loss
    (times the method's coefficient for methods whose weights are loss
    weights, such as GradNorm). There `<task>_weight` is the coefficient of
    the task's loss gradient in the direction taken, and `loss` is the
    weighted sum of the task losses plus regularization.

    A step in which any task loss is NaN or infinite changes nothing: the
    parameters, the optimizer state and the weighting state keep their values
    (layers that update statistics in their forward pass, such as batch
    normalization, still do), while the logs carry the non-finite loss so that
    `keras.callbacks.TerminateOnNaN` can stop training.

    Args:
        inputs: The model's inputs, as for a functional `keras.Model`.
        outputs: The tasks: a dict (its keys are the task names) or a list of
            output tensors (task names are the output layers' names). At least
            two.
        weighting: The weighting method: a string identifier (see
            `keras_dwo.weighting.IDENTIFIERS`), a serialized method dict, or a
            `keras_dwo.weighting` instance not used by another model.
        shared: Optional names of the layers whose variables the tasks share,
            for gradient-level methods with `wrt="parameters"`; by default
            the layers that feed two or more outputs.
        missing_label: Optional target value that marks a missing label
            (such as `float("nan")` or `-1`), for data where a sample may lack
            the target of some tasks. A sample lacks a task's label where any
            entry of its target equals this value, or where its per-task
            sample weight is 0. Such a sample adds nothing to that task's loss,
            gradient or metrics, and each task loss is the mean over the
            samples that have its label. Metrics given to `compile` are then
            weighted by the presence of labels (and by the sample weights),
            and `<task>_loss` in the logs is the mean over the labelled
            samples of the epoch. In a batch without any label of a task,
            the weighting method treats the step as one of the other tasks
            alone and leaves its state for that task unchanged.
        **kwargs: Passed to `keras.Model` (`name`, `trainable`).

    Example:

    ```python
    inputs = keras.Input(shape=(6,))
    h = keras.layers.Dense(64, activation="relu")(inputs)
    species = keras.layers.Dense(3, activation="softmax", name="species")(h)
    mass = keras.layers.Dense(1, name="mass")(h)
    model = keras_dwo.DynamicWeightedModel(
        inputs, {"species": species, "mass": mass}, weighting="uncertainty")
    model.compile(
        optimizer="adam",
        loss={"species": "sparse_categorical_crossentropy", "mass": "mse"})
    history = model.fit(x, {"species": y_cls, "mass": y_reg}, epochs=50)
    history.history["mass_weight"]
    ```
    """

    def __init__(
        self,
        inputs,
        outputs,
        weighting="equal",
        shared=None,
        missing_label=None,
        **kwargs,
    ):
        task_names = _output_task_names(outputs)
        super().__init__(inputs, outputs, **kwargs)
        self.task_names = task_names
        self.missing_label = None if missing_label is None else float(missing_label)
        if shared is not None:
            shared = [
                layer.name if isinstance(layer, keras.layers.Layer) else str(layer)
                for layer in shared
            ]
            task_graph.shared_layers(self, [], shared)
        self.shared = shared
        self._gradient_plan = None
        method = weighting_module.get(weighting)
        if method.task_names is not None:
            raise ValueError(
                f"The weighting {method.name!r} already serves the tasks "
                f"{method.task_names}; give each model its own instance."
            )
        if self.missing_label is not None:
            _check_takes_presence(method)
        method.build(task_names)
        self.weighting = method
        num_tasks = len(task_names)
        self.task_weights = keras.Variable(
            ops.ones((num_tasks,)), trainable=False, name="task_weights"
        )
        self.task_loss_history = keras.Variable(
            ops.zeros((2, num_tasks)), trainable=False, name="task_loss_history"
        )
        self.task_tracker = TaskTracker(task_names)
        self.loss_functions = None

    @classmethod
    def from_model(cls, model, weighting="equal", shared=None, missing_label=None):
        """Wraps a functional multi-output model, sharing its layers and weights.

        Args:
            model: A functional `keras.Model` with two or more outputs.
            weighting: The weighting method, as for the constructor.
            shared: Optional shared layer names, as for the constructor.
            missing_label: Optional missing-label value, as for the
                constructor.

        Returns:
            A `DynamicWeightedModel` with the same inputs, outputs and name.
        """
        if not hasattr(model, "_outputs_struct"):
            raise ValueError(
                "`from_model` needs a functional keras.Model; received "
                f"{type(model).__name__}."
            )
        return cls(
            model._inputs_struct,
            model._outputs_struct,
            weighting=weighting,
            shared=shared,
            missing_label=missing_label,
            name=model.name,
        )

    def _by_task(self, structure, what):
        """Returns `structure` (a dict by task name or a sequence) in task order."""
        if isinstance(structure, dict):
            unknown = sorted(set(structure) - set(self.task_names))
            missing = [name for name in self.task_names if name not in structure]
            if unknown:
                raise ValueError(
                    f"{what} given for unknown task(s) {unknown}; the tasks "
                    f"are {self.task_names}."
                )
            if missing:
                raise ValueError(
                    f"No {what} for task(s) {missing}; the tasks are {self.task_names}."
                )
            return [structure[name] for name in self.task_names]
        if isinstance(structure, (list, tuple)) and len(structure) == len(
            self.task_names
        ):
            return list(structure)
        count = len(structure) if isinstance(structure, (list, tuple)) else 1
        raise ValueError(
            f"Expected one {what} per task {self.task_names}, as a dict keyed "
            f"by task name or a list in task order; received {count}."
        )

    def compile(self, optimizer="rmsprop", loss=None, loss_weights=None, **kwargs):
        """Configures the model for training; one loss per task.

        Args:
            optimizer: As for `keras.Model.compile`.
            loss: One loss per task: a dict keyed by task name or a list in
                task order, of loss identifiers, functions or
                `keras.losses.Loss` instances.
            loss_weights: Optional initial `task_weights`, as a dict keyed by
                task name or a list in task order.
            **kwargs: Passed to `keras.Model.compile` (`metrics`,
                `weighted_metrics`, `jit_compile`, `steps_per_execution`...).
        """
        if loss is None:
            raise ValueError(
                f"`loss` is required: one loss per task {self.task_names}."
            )
        self.loss_functions = [
            _resolve_loss(identifier, task)
            for task, identifier in zip(self.task_names, self._by_task(loss, "loss"))
        ]
        if loss_weights is not None:
            initial = [float(w) for w in self._by_task(loss_weights, "loss weight")]
            self.task_weights.assign(initial)
        self._gradient_plan = None
        if self.missing_label is not None and kwargs.get("metrics") is not None:
            # Unweighted metrics would count the samples without a label.
            if kwargs.get("weighted_metrics") is not None:
                raise ValueError(
                    "With `missing_label`, metrics are weighted by the presence "
                    "of labels: pass them as `metrics` or as `weighted_metrics`, "
                    "not both."
                )
            kwargs["weighted_metrics"] = kwargs.pop("metrics")
        super().compile(optimizer=optimizer, loss=None, **kwargs)
        self._compile_config.config.update(loss=loss, loss_weights=loss_weights)

    def compile_from_config(self, config):
        config = keras.saving.deserialize_keras_object(config)
        self.compile(**config)
        if self.optimizer is not None and self.built:
            self.optimizer.build(self.trainable_variables)

    def _check_targets(self, y, sample_weight=None):
        # Checked before Keras starts an epoch: the JAX trainer releases the
        # variables' buffers for the epoch, and an error raised from inside
        # the step would leave the model without them.
        if y is not None:
            self._by_task(y, "target")
        if isinstance(sample_weight, (dict, list, tuple)):
            self._by_task(sample_weight, "sample weight")

    def fit(self, x=None, y=None, *args, **kwargs):
        self._check_targets(y, kwargs.get("sample_weight"))
        validation_data = kwargs.get("validation_data")
        if isinstance(validation_data, (list, tuple)) and len(validation_data) > 1:
            self._check_targets(*validation_data[1:3])
        return super().fit(x, y, *args, **kwargs)

    def evaluate(self, x=None, y=None, *args, **kwargs):
        self._check_targets(y, kwargs.get("sample_weight"))
        return super().evaluate(x, y, *args, **kwargs)

    def train_on_batch(self, x, y=None, sample_weight=None, *args, **kwargs):
        self._check_targets(y, sample_weight)
        return super().train_on_batch(x, y, sample_weight, *args, **kwargs)

    def test_on_batch(self, x, y=None, sample_weight=None, *args, **kwargs):
        self._check_targets(y, sample_weight)
        return super().test_on_batch(x, y, sample_weight, *args, **kwargs)

    def _task_sample_weights(self, sample_weight):
        if sample_weight is None or not isinstance(sample_weight, (dict, list, tuple)):
            return [sample_weight] * len(self.task_names)
        return self._by_task(sample_weight, "sample weight")

    def _labelled(self, y, sample_weight):
        """Returns per task `(target, sample_weight, count)` for partial labels.

        Missing targets are replaced by 0, so that the loss of a sample
        without a label stays finite before its weight of 0 removes it;
        `count` is the number of samples with a label.
        """
        labelled = []
        for target, weight in zip(
            self._by_task(y, "target"), self._task_sample_weights(sample_weight)
        ):
            target = ops.convert_to_tensor(target)
            if math.isnan(self.missing_label):
                missing = (
                    ops.isnan(target)
                    if keras.backend.is_float_dtype(target.dtype)
                    else ops.zeros_like(target, dtype="bool")
                )
            else:
                missing = ops.equal(target, ops.cast(self.missing_label, target.dtype))
            target = ops.where(missing, ops.zeros_like(target), target)
            if len(missing.shape) > 1:
                missing = ops.any(
                    ops.reshape(missing, (ops.shape(missing)[0], -1)), axis=1
                )
            present = 1.0 - ops.cast(missing, "float32")
            if weight is not None:
                present = present * ops.cast(
                    ops.reshape(weight, ops.shape(present)), "float32"
                )
            count = ops.sum(ops.cast(present != 0, "float32"))
            labelled.append((target, present, count))
        return labelled

    def count_task_labels(self, y, sample_weight=None):
        """Returns each task's number of labelled samples in the batch.

        A float32 `(T,)` tensor with `missing_label`; None without it, where
        every sample has every label.
        """
        if self.missing_label is None:
            return None
        return ops.stack([count for _, _, count in self._labelled(y, sample_weight)])

    def compute_task_losses(self, y, y_pred, sample_weight=None):
        """Returns the unweighted task losses as a float32 `(T,)` tensor."""
        predictions = self._by_task(y_pred, "output")
        if self.missing_label is None:
            return ops.stack(
                [
                    ops.cast(loss(target, prediction, weight), "float32")
                    for loss, target, prediction, weight in zip(
                        self.loss_functions,
                        self._by_task(y, "target"),
                        predictions,
                        self._task_sample_weights(sample_weight),
                    )
                ]
            )
        task_losses = []
        for loss, prediction, (target, weight, count) in zip(
            self.loss_functions, predictions, self._labelled(y, sample_weight)
        ):
            value = ops.cast(loss(target, prediction, weight), "float32")
            if loss.reduction in ("sum_over_batch_size", "mean"):
                # From the mean over the batch to the mean over the samples
                # that have this task's label.
                batch_size = ops.cast(ops.shape(weight)[0], "float32")
                value = value * ops.divide_no_nan(batch_size, count)
            task_losses.append(value)
        return ops.stack(task_losses)

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        if self.missing_label is None or y is None:
            return super().compute_metrics(x, y, y_pred, sample_weight=sample_weight)
        labelled = self._labelled(y, sample_weight)
        return super().compute_metrics(
            x,
            self.outputs_like_model([target for target, _, _ in labelled]),
            y_pred,
            sample_weight=self.outputs_like_model(
                [weight for _, weight, _ in labelled]
            ),
        )

    def compute_objective(self, task_losses, training=False, label_counts=None):
        """Returns `(objective, weights)` for a vector of task losses.

        The objective is the weighting method applied to
        `task_weights * task_losses`, plus the regularization losses
        (`model.losses`); `weights` is its derivative with respect to each
        unweighted task loss. `label_counts` (from `count_task_labels`) tells
        the method which tasks have labels in the batch.
        """
        task_weights = ops.convert_to_tensor(self.task_weights)
        # The method was built with the model and takes float32 losses, so the
        # bookkeeping of `Layer.__call__` is skipped on this per-step path.
        objective, method_weights = self.weighting.call(
            task_weights * task_losses,
            training=training,
            **_presence(label_counts),
        )
        regularization = self.regularization_loss()
        if regularization is not None:
            objective = objective + regularization
        return objective, task_weights * method_weights

    def regularization_loss(self):
        """Returns the float32 sum of `model.losses`, or None if there are none."""
        losses = [ops.cast(ops.sum(loss), "float32") for loss in self.losses]
        return sum(losses[1:], losses[0]) if losses else None

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        """Returns the objective: the weighted task losses plus regularization."""
        del x
        task_losses = self.compute_task_losses(y, y_pred, sample_weight)
        return self.compute_objective(task_losses, training=training)[0]

    def gradient_plan(self):
        """Returns the `GradientPlan` of a gradient-level method.

        Found from the graph when first needed after `compile`, so a model
        recompiled after layers were frozen or unfrozen plans anew.
        """
        if self._gradient_plan is not None:
            return self._gradient_plan
        outputs = self._by_task(self._outputs_struct, "output")
        trunk = heads = None
        if self.weighting.wrt == "representation":
            representation = task_graph.shared_representation(outputs)
            trunk = keras.Model(self._inputs_struct, representation)
            heads = keras.Model(representation, outputs)
            shared_layers = [trunk]
        else:
            shared_layers = task_graph.shared_layers(self, outputs, self.shared)
        shared_ids = {
            id(variable) for layer in shared_layers for variable in layer.weights
        }
        shared_indices, other_indices = [], []
        for index, variable in enumerate(self.trainable_variables):
            is_shared = id(variable) in shared_ids
            (shared_indices if is_shared else other_indices).append(index)
        if not shared_indices:
            raise ValueError(
                f"The weighting {self.weighting.name!r} combines the gradients "
                "of shared variables, but the tasks share no trainable "
                "variable: no trainable layer feeds two or more outputs. Name "
                "the shared layers with `shared=`, or use a loss-level method."
            )
        self._gradient_plan = GradientPlan(shared_indices, other_indices, trunk, heads)
        return self._gradient_plan

    def outputs_like_model(self, task_outputs):
        """Returns a list of task outputs in the structure of the model's outputs."""
        if isinstance(self._outputs_struct, dict):
            return dict(zip(self.task_names, task_outputs))
        return list(task_outputs)

    def combine_task_gradients(self, task_gradients, task_losses, label_counts=None):
        """Combines per-task gradients with the gradient-level method.

        Args:
            task_gradients: One `(T, ...)` tensor per shared variable (or
                representation tensor): the gradients of the T scaled,
                weighted task losses with respect to it.
            task_losses: The `(T,)` unweighted task losses.
            label_counts: None, or the `(T,)` labelled samples per task.

        Returns:
            `(gradients, weights, head_weights)`: one combined gradient per
            entry of `task_gradients`, scaled like them; the logged weights
            (each task's coefficient times its task weight); and the factors
            of the task-specific gradients.
        """
        num_tasks = len(self.task_names)
        rows = [
            ops.reshape(ops.cast(g, "float32"), (num_tasks, -1)) for g in task_gradients
        ]
        jacobian = ops.concatenate(rows, axis=1)
        # The method sees unscaled gradients; the optimizer unscales the
        # direction it returns.
        scaled = isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer)
        if scaled:
            loss_scale = self.optimizer.scale_loss(ops.ones((), "float32"))
            jacobian = jacobian / loss_scale
        direction, coefficients = self.weighting.aggregate(
            jacobian, task_losses, training=True, **_presence(label_counts)
        )
        if scaled:
            direction = direction * loss_scale
        gradients, start = [], 0
        for gradient in task_gradients:
            shape = ops.shape(gradient)[1:]
            size = math.prod(shape)
            piece = ops.reshape(direction[start : start + size], shape)
            gradients.append(ops.cast(piece, gradient.dtype))
            start = start + size
        coefficients = ops.stop_gradient(coefficients)
        weights = ops.convert_to_tensor(self.task_weights) * coefficients
        head_weights = (
            coefficients
            if self.weighting.weights_heads
            else ops.ones_like(coefficients)
        )
        return gradients, weights, head_weights

    def update_weighting(self, losses_before, losses_after, label_counts=None):
        """Lets the method learn from the task losses before and after a step."""
        self.weighting.update(losses_before, losses_after, **_presence(label_counts))

    def record_step(self, objective, task_losses, weights, x, label_counts=None):
        """Updates the `loss`, `<task>_loss` and `<task>_weight` logs.

        Each task's loss is averaged over its labelled samples
        (`label_counts`), or over the batch where every sample has a label.
        """
        first_input = next(i for i in keras.tree.flatten(x) if i is not None)
        batch_size = ops.cast(ops.shape(first_input)[0], "float32")
        self._loss_tracker.update_state(objective, sample_weight=batch_size)
        if label_counts is None:
            label_counts = ops.full(ops.shape(task_losses), batch_size)
        self.task_tracker.update_state(task_losses, weights, label_counts)

    def get_config(self):
        # The graph config of a functional model with the same inputs, outputs
        # and layers: Keras writes it only for models with its own signature.
        graph = keras.Model(self._inputs_struct, self._outputs_struct, name=self.name)
        config = {**graph.get_config(), "trainable": self.trainable}
        config["weighting"] = keras.saving.serialize_keras_object(self.weighting)
        config["shared"] = None if self.shared is None else list(self.shared)
        config["missing_label"] = self.missing_label
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        weighting = config.pop("weighting", "equal")
        shared = config.pop("shared", None)
        missing_label = config.pop("missing_label", None)
        functional = keras.Model.from_config(config, custom_objects=custom_objects)
        return cls.from_model(
            functional, weighting=weighting, shared=shared, missing_label=missing_label
        )
