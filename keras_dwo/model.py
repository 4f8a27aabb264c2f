"""DynamicWeightedModel: a multi-task Keras model with dynamic loss weighting."""

import contextlib
import inspect
import warnings

import keras
from keras import ops
from keras.src.models import model as keras_model_module
from keras.src.models.functional import Functional
from keras.src.trainers.data_adapters import get_data_adapter

from keras_dwo import aggregation
from keras_dwo import gradient_plan as plans
from keras_dwo import tasks
from keras_dwo import trainers
from keras_dwo import weighting as weighting_module
from keras_dwo.task_tracker import TaskTracker
from keras_dwo.task_weights import validated_task_weights
from keras_dwo.task_weights import weights_and_values_are_finite
from keras_dwo.trainers import Trainer
from keras_dwo.weighting.base import check_unclaimed


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


def _first_batch(x, y, sample_weight):
    """Returns `(x, y, sample_weight)` of a first batch, or None if unsafe.

    A Python generator cannot be read ahead without losing that batch for
    training, so it yields None.
    """
    if inspect.isgenerator(x):
        return None
    adapter = get_data_adapter(x, y, sample_weight, batch_size=2, shuffle=False)
    batch = next(iter(adapter.get_numpy_iterator()), None)
    if batch is None:
        return ((), None, None)
    return keras.utils.unpack_x_y_sample_weight(batch)


def _is_arrays(x):
    leaves = keras.tree.flatten(x)
    return bool(leaves) and all(hasattr(leaf, "shape") for leaf in leaves)


def _batch_size(x):
    leaves = [leaf for leaf in keras.tree.flatten(x) if leaf is not None]
    return int(leaves[0].shape[0]) if leaves and leaves[0].shape else 0


def _holds_no_samples(x):
    """Whether `x` is known to be empty: arrays of no rows, or no batches.

    Keras runs an epoch of an empty `PyDataset` or `tf.data.Dataset` without
    an error on some backends and fails inside the epoch on others; a
    generator's length cannot be known ahead.
    """
    if _is_arrays(x):
        return _batch_size(x) == 0
    if isinstance(x, keras.utils.PyDataset):
        try:
            return x.num_batches == 0
        except NotImplementedError:
            return False
    module = type(x).__module__
    if module.startswith("tensorflow") and callable(getattr(x, "cardinality", None)):
        return int(x.cardinality()) == 0
    if module.startswith("torch.utils.data") and hasattr(x, "__len__"):
        return len(x) == 0
    return False


@keras.saving.register_keras_serializable(package="keras_dwo")
class DynamicWeightedModel(Trainer, keras.Model):
    """A multi-task Keras model whose task losses are weighted while it trains.

    Each output is a task. Build the model in any of the ways Keras offers:

    - the functional API: `DynamicWeightedModel(inputs, outputs, ...)`, with
      the outputs a dict (its keys are the task names) or a list (the output
      layers' names);
    - subclassing: `class MyModel(DynamicWeightedModel)` with layers in
      `__init__` and a `call` that returns a dict of task outputs (task names
      are its keys) or a list (named by `task_names=`);
    - `DynamicWeightedModel.from_model(model)` for an existing multi-output
      model (functional, Sequential parts, subclassed, a backbone with
      heads), sharing its layers and weights.

    Compile it with one loss per output (or one loss for every output, or
    several loss terms for an output, each then a task of its own) and train
    it with `fit` as usual: at every step the per-task losses are multiplied
    by `task_weights` and combined by the `weighting` method. The logs carry
    `<task>_loss` (the unweighted loss), `<task>_weight` (the weight of that
    task in the last step), `skipped_steps` (the steps of the epoch that were
    not applied) and `loss` (the objective that was minimised).

    With a gradient-level method (MGDA, PCGrad, UPGrad...), every step takes
    the gradient of each weighted task loss `task_weights[i] * L_i` with
    respect to the shared variables and lets the method combine these rows
    into the direction that the optimizer applies to them. The shared
    variables are those of the layers that feed two or more outputs in the
    model's graph (a subclassed model's `call` is traced on symbolic inputs
    to find it), or those named in `shared`. Each task's own variables get
    the gradient of its weighted loss (times the method's coefficient for
    methods whose weights are loss weights, such as GradNorm). When no shared
    variable is trainable (a frozen backbone), the step trains each task's
    variables on its weighted loss and a warning says so; after unfreezing,
    `compile` again and the method combines the backbone's task gradients.

    A step is applied only if the task losses, the objective, every gradient
    and the method's new state are finite and the task weights are finite
    and non-negative. Otherwise nothing changes: the parameters, the
    optimizer state and the weighting state keep their values (a
    `LossScaleOptimizer` lowers its loss scale, as it does for a plain
    model; layers that update statistics in their forward pass, such as
    batch normalization, still do on TensorFlow and torch), the step counts
    in `skipped_steps`, and the logs carry a non-finite loss so that
    `keras.callbacks.TerminateOnNaN` can stop training.

    Args:
        inputs: The model's inputs, for the functional API.
        outputs: The tasks, for the functional API: a dict (its keys are the
            task names) or a list of output tensors (task names are the
            output layers' names). At least two.
        weighting: The weighting method: a string identifier (see
            `keras_dwo.weighting.IDENTIFIERS`), a serialized method dict, or a
            `keras_dwo.weighting` instance not used by another model.
        task_names: For a subclassed model whose `call` returns a list, the
            task names in output order. By default a subclassed model's task
            names are the keys of the dict its `call` returns.
        shared: Optional layers, layer names or variables that the tasks
            share, for gradient-level methods with `wrt="parameters"`; by
            default the layers that feed two or more outputs.
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
        representation: Optional layer (or its name) whose output is the
            shared representation, for methods with
            `wrt="representation"`; by default the tensors that shared
            layers hand to the heads.
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


    class TwoHeads(keras_dwo.DynamicWeightedModel):
        def __init__(self, **kwargs):
            super().__init__(weighting="upgrad", **kwargs)
            self.trunk = keras.layers.Dense(64, activation="relu")
            self.species = keras.layers.Dense(3, activation="softmax")
            self.mass = keras.layers.Dense(1)

        def call(self, x):
            h = self.trunk(x)
            return {"species": self.species(h), "mass": self.mass(h)}
    ```
    """

    def __new__(cls, *args, **kwargs):
        # As `keras.Model` does: the functional API gives a functional class,
        # without rewriting this class's bases (which would break subclasses).
        if cls is DynamicWeightedModel and keras_model_module.functional_init_arguments(
            args, kwargs
        ):
            return super().__new__(FunctionalDynamicWeightedModel)
        return super().__new__(cls)

    def __init__(
        self,
        inputs=None,
        outputs=None,
        weighting="equal",
        task_names=None,
        shared=None,
        missing_label=None,
        representation=None,
        **kwargs,
    ):
        if inputs is not None or outputs is not None:
            if not isinstance(self, Functional):
                raise ValueError(
                    "A subclass of DynamicWeightedModel builds its layers in "
                    "`__init__` and returns the task outputs from `call`; "
                    "pass no `inputs` and `outputs` to its constructor."
                )
            names = tasks.output_names(outputs)
            if task_names is not None and tuple(task_names) != names:
                raise ValueError(
                    f"`task_names` {list(task_names)} differ from the names of "
                    f"the outputs {list(names)}; name the outputs instead."
                )
            keras_model_module.Trainer.__init__(self)
            Functional.__init__(self, inputs, outputs, **kwargs)
            task_names = names
        else:
            keras.Model.__init__(self, **kwargs)
        self.missing_label = None if missing_label is None else float(missing_label)
        self.shared = plans.shared_names(shared)
        if isinstance(representation, keras.layers.Layer):
            representation = representation.name
        self.representation = representation
        if self.shared is not None and isinstance(self, Functional):
            plans.named_variables(self, self.shared)
        method = weighting_module.get(weighting)
        check_unclaimed(method, "model")
        if self.missing_label is not None:
            _check_takes_presence(method)
        self.weighting = method
        self.output_keys = None
        self.task_names = None
        self._task_outputs = None
        self.loss_functions = None
        self._gradient_plan = None
        self._graph = None
        self._returns_dict = task_names is None
        if task_names is not None:
            self._set_outputs(task_names)

    def _set_outputs(self, output_keys):
        """Records the names of the model's outputs, in order.

        Until `compile` says which loss terms each output has, each output is
        one task, and the tasks' state is made for them, so that weights can
        be loaded into the model before it is compiled.
        """
        output_keys = tasks.checked_output_names(output_keys)
        if self.output_keys is not None:
            if output_keys != self.output_keys:
                raise ValueError(
                    f"The model's outputs are {self.output_keys}; received "
                    f"{output_keys}."
                )
            return
        self.output_keys = output_keys
        self.task_names = output_keys
        if len(output_keys) > 1:
            self._build_task_state(output_keys)

    def _set_tasks(self, task_names, task_outputs):
        """Sets the tasks that `compile`'s losses define.

        Args:
            task_names: The tasks, in order.
            task_outputs: For each task, the index of the output it reads.
        """
        task_names = tasks.checked_task_names(task_names)
        if task_names != self.task_names or not self._has_task_state():
            if self._task_outputs is not None:
                raise ValueError(
                    f"The model's tasks are {self.task_names}; received {task_names}."
                )
            if self._has_task_state():
                self._drop_task_state()
            self._build_task_state(task_names)
        self._task_outputs = tuple(task_outputs)

    def _has_task_state(self):
        return getattr(self, "task_tracker", None) is not None

    @contextlib.contextmanager
    def _state_unlocked(self):
        """Lets the task state change after a subclassed model was built.

        Keras locks a subclassed model's state once it is built (called on
        data, `build`, `summary`), but its tasks are known only at `compile`
        or at its first batch.
        """
        locked = self._tracker.locked
        self._tracker.unlock()
        try:
            yield
        finally:
            if locked:
                self._tracker.lock()

    def _drop_task_state(self):
        """Removes the state made for one task per output, before loss terms."""
        with self._state_unlocked():
            self._drop_task_state_unlocked()

    def _drop_task_state_unlocked(self):
        self._tracker.untrack(self.task_tracker)
        del self.task_tracker
        del self.task_weights
        del self.task_loss_history
        # The method's variables have one entry per task: a copy is built.
        self._tracker.untrack(self.weighting)
        method = self.weighting
        self.weighting = weighting_module.get(
            keras.saving.serialize_keras_object(method)
        )
        method.task_names = None

    def _build_task_state(self, task_names):
        """Creates the per-task state: task weights, method state and logs."""
        check_unclaimed(self.weighting, "model")
        self.task_names = task_names
        self.weighting.build(task_names)
        num_tasks = len(task_names)
        with self._state_unlocked():
            self.task_weights = keras.Variable(
                ops.ones((num_tasks,)), trainable=False, name="task_weights"
            )
            self.task_loss_history = keras.Variable(
                ops.zeros((2, num_tasks)), trainable=False, name="task_loss_history"
            )
            self.task_tracker = TaskTracker(task_names)

    @property
    def _dict_outputs(self):
        if isinstance(self, Functional):
            return isinstance(self._outputs_struct, dict)
        return self._returns_dict

    @classmethod
    def from_model(
        cls,
        model,
        weighting="equal",
        shared=None,
        missing_label=None,
        representation=None,
        input_spec=None,
    ):
        """Wraps an existing multi-output model, sharing its layers and weights.

        A functional model is wrapped as it is. Any other model (Sequential
        parts, subclassed, a backbone with heads) has its `call` traced on
        symbolic inputs, which gives a functional model over the same layers.

        Args:
            model: A `keras.Model` with two or more outputs (a dict or a
                list).
            weighting: The weighting method, as for the constructor.
            shared: Optional shared layers, as for the constructor.
            missing_label: Optional missing-label value, as for the
                constructor.
            representation: Optional representation layer, as for the
                constructor.
            input_spec: For a model that was never built on inputs of a known
                shape: a batch of inputs, or `keras.KerasTensor`s with a batch
                dimension, giving their shapes and dtypes.

        Returns:
            A `DynamicWeightedModel` with the same inputs, outputs and name.
        """
        if hasattr(model, "_outputs_struct"):
            inputs, outputs = model._inputs_struct, model._outputs_struct
        else:
            if input_spec is None:
                input_spec = getattr(model, "inputs", None) or _built_input_spec(model)
            if input_spec is None:
                raise ValueError(
                    f"`from_model` traces the `call` of {type(model).__name__} "
                    "on symbolic inputs, but the model has not been built: "
                    "call it on a batch first, or pass `input_spec=` (a batch "
                    "of inputs)."
                )
            inputs, outputs = plans.trace(model, input_spec)
        return DynamicWeightedModel(
            inputs,
            outputs,
            weighting=weighting,
            shared=shared,
            missing_label=missing_label,
            representation=representation,
            name=model.name,
        )

    def compile(self, optimizer="rmsprop", loss=None, loss_weights=None, **kwargs):
        """Configures the model for training.

        Each output is a task, unless its loss is a list of loss terms (an
        L1 and an IoU loss on a box): each term is then a task of its own,
        named `<output>_<term>` after the term's identifier, `name` or
        function name (or `<output>_<key>` for a dict of terms), weighted,
        balanced and logged like any task; `model.task_names` lists them.
        Metrics stay per output.

        Args:
            optimizer: As for `keras.Model.compile`.
            loss: One loss for every output (an identifier, a function or a
                `keras.losses.Loss` instance), or one per output: a dict
                keyed by output name or a list in output order. An output's
                loss may be a list of terms, or a dict of terms keyed by
                term name.
            loss_weights: Optional initial `task_weights`, as a dict keyed by
                task name or a list in task order; finite and non-negative.
            **kwargs: Passed to `keras.Model.compile` (`metrics`,
                `weighted_metrics`, `jit_compile`, `steps_per_execution`...).
        """
        if loss is None:
            raise ValueError("`loss` is required: one loss per output, or one for all.")
        if self.output_keys is None and isinstance(loss, dict):
            self._set_outputs(loss)
        if self.output_keys is not None:
            self._compile_tasks(loss, loss_weights)
        elif loss_weights is not None and not isinstance(loss_weights, dict):
            raise ValueError(
                "The task names are not known before the model is called, so "
                "`loss_weights` must be a dict keyed by task name (or pass "
                "`task_names=` to the constructor)."
            )
        self._pending_compile = (loss, loss_weights)
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
        if self.output_keys is not None and not isinstance(self, Functional):
            # What Keras reads to pair metrics with a subclassed model's list
            # outputs by name, as it does for a functional model's.
            self.output_names = list(self.output_keys)
        super().compile(optimizer=optimizer, loss=None, **kwargs)
        self._compile_config.config.update(loss=loss, loss_weights=loss_weights)

    def _compile_tasks(self, loss, loss_weights):
        task_names, task_outputs, loss_functions = tasks.loss_tasks(
            loss, self.output_keys
        )
        self._set_tasks(task_names, task_outputs)
        self.loss_functions = loss_functions
        if loss_weights is not None:
            weights = tasks.by_name(
                loss_weights, self.task_names, "loss weight", kind="task"
            )
            self.task_weights.assign(validated_task_weights(weights, self.task_names))

    def compile_from_config(self, config):
        config = keras.saving.deserialize_keras_object(config)
        self.compile(**config)
        if self.optimizer is not None and self.built:
            self.optimizer.build(self.trainable_variables)

    def get_build_config(self):
        config = super().get_build_config()
        if config is not None and not isinstance(self, Functional):
            config["output_names"] = list(self.output_keys or ())
        return config

    def build_from_config(self, config):
        config = dict(config)
        # Files written by keras-dwo 0.1 name the outputs "task_names".
        output_keys = config.pop("output_names", None) or config.pop("task_names", None)
        shapes = config.get("shapes_dict")
        if isinstance(shapes, dict) and "output_names" in shapes:
            # keras-dwo 0.1 re-saved a loaded subclassed model with its
            # output names among the input shapes (Keras keeps the whole
            # build config it was built from).
            output_keys = output_keys or shapes["output_names"]
            config = {"input_shape": shapes["input_shape"]}
        if output_keys:
            self._set_outputs(output_keys)
        # Only the input shapes: Keras keeps this config, and saves it again.
        super().build_from_config(config)

    def _prepare(self, x, y, sample_weight, training):
        """Checks the data and plans the step before Keras starts an epoch.

        The JAX trainer releases the variables' buffers for the epoch, and an
        error raised from inside the step would leave the model without them,
        so every check that can run here does.
        """
        if not self.compiled:
            raise ValueError("You must call `compile()` before using the model.")
        if _holds_no_samples(x):
            raise ValueError("The data holds no samples.")
        batch = None
        needs_plan = training and self.weighting.needs_task_gradients
        if self.output_keys is None or (
            needs_plan and self._graph is None and not isinstance(self, Functional)
        ):
            batch = _first_batch(x, y, sample_weight)
            if batch is None:
                raise ValueError(
                    "A subclassed DynamicWeightedModel reads its task names and "
                    "shared layers from a first batch, but the data is a Python "
                    "generator, which cannot be read ahead. Call the model on "
                    "a batch first, or wrap the generator in a "
                    "keras.utils.PyDataset."
                )
            if _batch_size(batch[0]) == 0:
                raise ValueError("The data holds no samples.")
            self._discover_tasks(batch[0])
        if self.loss_functions is None:
            self._compile_tasks(*self._pending_compile)
        validated_task_weights(ops.convert_to_numpy(self.task_weights), self.task_names)
        self._check_targets(y, sample_weight)
        if training and self.missing_label is not None and not self.optimizer.built:
            # The step keeps an absent task's optimizer slots, so they must
            # exist when it is traced.
            self.build_optimizer()
        if needs_plan:
            plan = self.gradient_plan()
            if self.weighting.column_state:
                self.weighting.build_columns(
                    plans.layer_sizes(
                        [self.trainable_variables[i] for i in plan.shared_indices]
                    )
                )

    def _discover_tasks(self, x):
        """Reads the task structure of a subclassed model from its `call`."""
        try:
            self._graph = plans.trace(self, x)
            outputs = self._graph[1]
        except Exception as error:  # noqa: BLE001 - any op may refuse symbols
            self._graph = None
            warnings.warn(
                f"The `call` of {type(self).__name__} could not be traced on "
                f"symbolic inputs ({type(error).__name__}: {error}); the task "
                "structure is read from an eager call instead, and "
                "gradient-level methods need `shared=`.",
                stacklevel=3,
            )
            outputs = self(x, training=False)
        self._returns_dict = isinstance(outputs, dict)
        if self._returns_dict:
            names = list(outputs)
        elif self.output_keys is not None:
            names = self.output_keys
        else:
            raise ValueError(
                f"The `call` of {type(self).__name__} returns a "
                f"{type(outputs).__name__}; name its tasks with `task_names=` "
                "or return a dict keyed by task name."
            )
        self._set_outputs(names)
        if self._graph is not None:
            traced = self._graph[1]
            if isinstance(traced, dict):
                traced = [traced[name] for name in names]
            self._graph = (self._graph[0], list(traced))

    def fit(self, x=None, y=None, *args, **kwargs):
        self._prepare(x, y, kwargs.get("sample_weight"), training=True)
        validation_data = kwargs.get("validation_data")
        if isinstance(validation_data, (list, tuple)) and len(validation_data) > 1:
            self._check_targets(*validation_data[1:3])
        return super().fit(x, y, *args, **kwargs)

    def evaluate(self, x=None, y=None, *args, **kwargs):
        self._prepare(x, y, kwargs.get("sample_weight"), training=False)
        return super().evaluate(x, y, *args, **kwargs)

    def train_on_batch(self, x, y=None, sample_weight=None, *args, **kwargs):
        self._prepare(x, y, sample_weight, training=True)
        return super().train_on_batch(x, y, sample_weight, *args, **kwargs)

    def test_on_batch(self, x, y=None, sample_weight=None, *args, **kwargs):
        self._prepare(x, y, sample_weight, training=False)
        return super().test_on_batch(x, y, sample_weight, *args, **kwargs)

    def _flatten_metrics_in_order(self, logs):
        """The list that `evaluate` and `*_on_batch` return without `return_dict`.

        Keras's order for a multi-output model (`loss`, the per-task losses,
        then the compiled metrics sorted by name), then this model's own
        entries: `<task>_weight` and `skipped_steps`.
        """
        names = self.task_names or ()
        first = ["loss"] + [f"{name}_loss" for name in names]
        last = [f"{name}_weight" for name in names] + ["skipped_steps"]
        first += [
            metric.name
            for metric in self.metrics
            if metric.name in logs and metric.name not in first + last
        ]
        rest = sorted(key for key in logs if key not in first and key not in last)
        results = [logs[key] for key in first + rest + last if key in logs]
        return results[0] if len(results) == 1 else results

    @property
    def metrics_names(self):
        """Keras's names: `loss`, `compile_metrics`, then the task losses."""
        names = []
        for metric in self.metrics:
            if metric is getattr(self, "task_tracker", None):
                names += [f"{name}_loss" for name in self.task_names]
            else:
                names.append(metric.name)
        return names

    def _check_targets(self, y, sample_weight=None):
        if y is not None:
            tasks.by_name(y, self.output_keys, "target", self._dict_outputs)
        if isinstance(sample_weight, (dict, list, tuple)):
            tasks.output_sample_weights(
                sample_weight, self.output_keys, self._dict_outputs
            )

    def _by_output(self, structure, what):
        return tasks.by_name(structure, self.output_keys, what)

    def _for_each_task(self, per_output):
        """Returns a per-output list as a per-task one (terms share an output)."""
        return [per_output[index] for index in self._task_outputs]

    def count_task_labels(self, y, sample_weight=None):
        """Returns each task's number of labelled samples in the batch.

        A float32 `(T,)` tensor with `missing_label`; None without it, where
        every sample has every label.
        """
        if self.missing_label is None:
            return None
        labelled = tasks.labelled(
            self._by_output(y, "target"),
            tasks.output_sample_weights(sample_weight, self.output_keys),
            self.missing_label,
        )
        return ops.stack(self._for_each_task([count for _, _, count in labelled]))

    def compute_task_losses(self, y, y_pred, sample_weight=None):
        """Returns the unweighted task losses as a float32 `(T,)` tensor."""
        return ops.stack(self.compute_each_task_loss(y, y_pred, sample_weight))

    def compute_each_task_loss(self, y, y_pred, sample_weight=None):
        """Returns the unweighted task losses as a list of T float32 scalars.

        For a step that differentiates each task loss on its own: on torch
        and TensorFlow, a backward pass from one entry of the stacked vector
        also runs through every other task's loss and head (with zeros).
        """
        return tasks.each_task_loss(
            self.loss_functions,
            self._for_each_task(self._by_output(y, "target")),
            self._for_each_task(self._by_output(y_pred, "output")),
            self._for_each_task(
                tasks.output_sample_weights(sample_weight, self.output_keys)
            ),
            self.missing_label,
        )

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        if self.missing_label is None or y is None:
            return super().compute_metrics(x, y, y_pred, sample_weight=sample_weight)
        labelled = tasks.labelled(
            self._by_output(y, "target"),
            tasks.output_sample_weights(sample_weight, self.output_keys),
            self.missing_label,
        )
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
            **tasks.presence_argument(label_counts),
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

        Found when first needed after `compile` (at the start of `fit`), so a
        model recompiled after layers were frozen or unfrozen plans anew.
        """
        if self._gradient_plan is not None:
            return self._gradient_plan
        plan = self._plan(self.weighting.wrt)
        if not plan.shared_indices:
            warnings.warn(
                f"The tasks share no trainable variable (is the backbone "
                f"frozen?), so {type(self.weighting).__name__} has no task "
                "gradients to combine: each task's variables train on its "
                "weighted loss. After making shared layers trainable, compile "
                "the model again.",
                # Points at the user's `fit` (through `_prepare`).
                stacklevel=4,
            )
        self._gradient_plan = plan
        return plan

    def _plan(self, wrt):
        graph = self._graph
        if isinstance(self, Functional):
            graph = (
                self._inputs_struct,
                self._by_output(self._outputs_struct, "output"),
            )
        return plans.make_plan(self, graph, wrt, self.shared, self.representation)

    def shared_variables(self):
        """Returns the trainable variables that two or more tasks share.

        Those of the layers that feed two or more outputs in the model's
        graph, or of the layers named in `shared`.
        """
        plan = self._plan("parameters")
        return [self.trainable_variables[i] for i in plan.shared_indices]

    def task_gradients(self, x, y, sample_weight=None):
        """Returns the gradients of each weighted task loss on a batch.

        The gradients of `task_weights[i] * L_i` with respect to the shared
        variables, computed as the training step computes them (by the
        backend's code in `keras_dwo.trainers`), with the layers in
        inference mode.

        Args:
            x: A batch of inputs.
            y: Its targets, as for `fit`.
            sample_weight: Optional sample weights, as for `fit`.

        Returns:
            `(task_losses, gradients)`: the `(T,)` unweighted task losses and
            one `(T, ...)` tensor per shared variable.
        """
        self._prepare(x, y, sample_weight, training=False)
        if self._graph is None and not isinstance(self, Functional):
            # A subclassed model's shared layers are read from its traced call.
            self._discover_tasks(x)
        self.sync_variables()
        task_weights = ops.convert_to_tensor(self.task_weights)

        def weighted_losses():
            y_pred = self(x, training=False)
            losses = self.compute_task_losses(y, y_pred, sample_weight)
            return task_weights * losses, losses

        _, losses, gradients = trainers.value_and_jacobian(
            weighted_losses, self.shared_variables()
        )
        return ops.stop_gradient(losses), gradients

    def uses_task_gradients(self):
        """Whether the step combines per-task gradients of shared variables."""
        return self.weighting.needs_task_gradients and bool(
            self.gradient_plan().shared_indices
        )

    def outputs_like_model(self, values):
        """Returns a list with one value per output in the model's output structure."""
        if self._dict_outputs:
            return dict(zip(self.output_keys, values))
        return list(values)

    def combine_task_gradients(
        self,
        task_gradients,
        task_losses,
        label_counts=None,
        aggregate=None,
    ):
        """Combines per-task gradients with the gradient-level method.

        Args:
            task_gradients: One `(T, ...)` tensor per shared variable (or
                representation tensor): the gradients of the T scaled,
                weighted task losses with respect to it.
            task_losses: The `(T,)` unweighted task losses.
            label_counts: None, or the `(T,)` labelled samples per task.
            aggregate: None (`aggregation.aggregate_blocks`), or a
                trainer's function with its arguments, for task gradients
                that are still each replica's own.

        Returns:
            `(gradients, weights, head_weights)`: one combined gradient per
            entry of `task_gradients`, scaled like them; the logged weights
            (each task's coefficient times its task weight); and the factors
            of the task-specific gradients.
        """
        # The method sees unscaled gradients; the optimizer unscales the
        # direction it returns.
        loss_scale = None
        if isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
            loss_scale = self.optimizer.scale_loss(ops.ones((), "float32"))
        gradients, coefficients = aggregation.combine(
            self.weighting,
            task_gradients,
            task_losses,
            loss_scale,
            aggregate,
            **tasks.presence_argument(label_counts),
        )
        weights = ops.convert_to_tensor(self.task_weights) * coefficients
        head_weights = (
            coefficients
            if self.weighting.weights_heads
            else ops.ones_like(coefficients)
        )
        return gradients, weights, head_weights

    def absent_task_state(self):
        """Where an absent task's entries must not move in an optimizer step.

        The method's trainable variables with one entry per task (learned
        log-variances) and their optimizer slots (Adam's moments), which
        would move on momentum alone in a batch without the task's labels.

        Returns:
            `(trainable_indices, optimizer_indices)`: positions in
            `trainable_variables` and in `optimizer.variables`.
        """
        num_tasks = len(self.task_names)
        per_task = [
            v for v in self.weighting.trainable_variables if v.shape[:1] == (num_tasks,)
        ]
        ids = {id(v) for v in per_task}
        trainable_indices = [
            i for i, v in enumerate(self.trainable_variables) if id(v) in ids
        ]
        # Keras names a slot after the path of the variable it serves.
        prefixes = tuple(v.path.replace("/", "_") + "_" for v in per_task)
        optimizer_indices = [
            i
            for i, v in enumerate(self.optimizer.variables)
            if prefixes and v.name.startswith(prefixes) and v.shape[:1] == (num_tasks,)
        ]
        return trainable_indices, optimizer_indices

    @staticmethod
    def keep_absent_tasks(new_values, old_values, label_counts):
        """Returns `new_values` with the absent tasks' entries of `old_values`."""
        present = label_counts > 0
        return [
            ops.where(
                ops.reshape(present, (-1,) + (1,) * (len(new.shape) - 1)), new, old
            )
            for new, old in zip(new_values, old_values)
        ]

    def update_weighting(self, losses_before, losses_after, label_counts=None):
        """Lets the method learn from the task losses before and after a step.

        The method sees the weighted losses, as in `compute_objective`, so
        that a task it left out there (a weight of 0) is left out here too.
        """
        task_weights = ops.convert_to_tensor(self.task_weights)
        self.weighting.update(
            task_weights * losses_before,
            task_weights * losses_after,
            **tasks.presence_argument(label_counts),
        )

    def step_is_finite(self, task_losses, objective, gradients, state):
        """Whether a training step may be applied: a scalar boolean tensor.

        Args:
            task_losses: The `(T,)` task losses.
            objective: The scalar objective.
            gradients: The gradients the optimizer would apply.
            state: The weighting method's new state values.
        """
        return weights_and_values_are_finite(
            self.task_weights, [task_losses, objective, *gradients, *state]
        )

    # Whether every float tensor in a list is finite: a boolean tensor.
    values_are_finite = staticmethod(trainers.values_are_finite)

    def record_step(
        self,
        objective,
        task_losses,
        weights,
        x,
        label_counts=None,
        applied=True,
        training=True,
    ):
        """Updates the logs: `loss`, `<task>_loss`, `<task>_weight`, `skipped_steps`.

        Each task's loss is averaged over its labelled samples
        (`label_counts`), or over the batch where every sample has a label.
        A non-finite task loss makes the logged `loss` non-finite too, even
        where the method left that task out, so that `TerminateOnNaN` sees it.
        """
        objective = objective + 0.0 * ops.sum(task_losses)
        if weights is not None and not training and self.weighting.needs_task_gradients:
            # Evaluation has no task gradients: the last step's weights stay.
            weights = None
        first_input = next(i for i in keras.tree.flatten(x) if i is not None)
        batch_size = ops.shape(first_input)[0]
        if not isinstance(batch_size, int):
            # Unknown while a TensorFlow graph is traced.
            batch_size = ops.cast(batch_size, "float32")
        # What `update_state(objective, sample_weight=batch_size)` adds to
        # Keras's `Mean`, without the reduction of its inputs that the call
        # does (about 60 microseconds a step on eager torch).
        tracker = self._loss_tracker
        trainers.add_to_variables(
            [tracker.total, tracker.count], [objective * batch_size, batch_size]
        )
        if label_counts is None:
            label_counts = ops.full(ops.shape(task_losses), batch_size)
        self.task_tracker.update_state(task_losses, weights, label_counts, applied)

    def get_config(self):
        if not isinstance(self, Functional):
            return super().get_config()
        # The graph config of a functional model with the same inputs, outputs
        # and layers: Keras writes it only for models with its own signature.
        graph = keras.Model(self._inputs_struct, self._outputs_struct, name=self.name)
        config = {**graph.get_config(), "trainable": self.trainable}
        config["weighting"] = keras.saving.serialize_keras_object(self.weighting)
        config["shared"] = None if self.shared is None else list(self.shared)
        config["missing_label"] = self.missing_label
        config["representation"] = self.representation
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        if "layers" not in config:
            return super().from_config(config, custom_objects=custom_objects)
        config = dict(config)
        weighting = config.pop("weighting", "equal")
        shared = config.pop("shared", None)
        missing_label = config.pop("missing_label", None)
        representation = config.pop("representation", None)
        functional = keras.Model.from_config(config, custom_objects=custom_objects)
        return DynamicWeightedModel.from_model(
            functional,
            weighting=weighting,
            shared=shared,
            missing_label=missing_label,
            representation=representation,
        )


@keras.saving.register_keras_serializable(package="keras_dwo")
class FunctionalDynamicWeightedModel(DynamicWeightedModel, Functional):
    """The class of a `DynamicWeightedModel` built with the functional API.

    `DynamicWeightedModel(inputs, outputs)` returns one, as
    `keras.Model(inputs, outputs)` returns a `Functional`; users never name
    it.
    """


def _built_input_spec(model):
    """The input shape a built subclassed model recorded, as a KerasTensor."""
    shapes = getattr(model, "_build_shapes_dict", None)
    if not shapes or len(shapes) != 1:
        return None
    (shape,) = shapes.values()
    return keras.KerasTensor(tuple(shape))
