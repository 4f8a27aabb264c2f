"""The task structure of a multi-task model: names, losses, targets and labels.

Everything here is plain bookkeeping on Python structures and `keras.ops`
tensors; the model and the trainers call it, nothing here holds state.
"""

import math

import keras
from keras import ops


def output_task_names(outputs):
    """Returns the task names of a functional model's outputs.

    Args:
        outputs: A dict of output tensors (its keys are the names) or a list
            of output tensors (the names of the layers that produce them).

    Raises:
        ValueError: If a task is nested, there are fewer than two tasks or
            two tasks share a name.
    """
    if isinstance(outputs, dict):
        names = [str(name) for name in outputs]
        leaves = list(outputs.values())
    elif isinstance(outputs, (list, tuple)):
        leaves = list(outputs)
        names = [output._keras_history.operation.name for output in leaves]
    else:
        leaves, names = [outputs], ["output"]
    if any(isinstance(leaf, (dict, list, tuple)) for leaf in leaves):
        raise ValueError(
            "Each task must be a single output tensor; received nested outputs."
        )
    return checked_task_names(names)


def checked_task_names(names):
    """Returns `names` as a tuple of strings, checked to name two or more tasks."""
    names = tuple(str(name) for name in names)
    if len(names) < 2:
        raise ValueError(
            "DynamicWeightedModel needs at least two tasks (outputs); received "
            f"{len(names)}. Use a plain keras.Model for a single task."
        )
    if len(set(names)) != len(names):
        raise ValueError(f"Task names must be unique; received {list(names)}.")
    return names


def by_task(structure, task_names, what, dict_outputs=False):
    """Returns `structure` (a dict by task name or a sequence) in task order.

    Args:
        structure: A dict keyed by task name, or a list or tuple in task
            order.
        task_names: The task names, in task order.
        what: What the structure holds, for error messages ("loss", "target").
        dict_outputs: Whether the model's outputs are a dict. Keras pairs a
            list of targets with dict outputs in another order for losses
            and for metrics, so a list is refused there.

    Raises:
        ValueError: Naming the unknown or missing tasks, or the count.
    """
    if isinstance(structure, dict):
        unknown = sorted(set(structure) - set(task_names))
        missing = [name for name in task_names if name not in structure]
        if unknown:
            raise ValueError(
                f"{what} given for unknown task(s) {unknown}; the tasks are "
                f"{task_names}."
            )
        if missing:
            raise ValueError(
                f"No {what} for task(s) {missing}; the tasks are {task_names}."
            )
        return [structure[name] for name in task_names]
    if isinstance(structure, (list, tuple)) and len(structure) == len(task_names):
        if dict_outputs:
            raise ValueError(
                f"The model's outputs are a dict, so each {what} must be given "
                f"in a dict keyed by task name {task_names}; received a "
                f"{type(structure).__name__}, whose pairing with the outputs "
                "would be ambiguous."
            )
        return list(structure)
    count = len(structure) if isinstance(structure, (list, tuple)) else 1
    raise ValueError(
        f"Expected one {what} per task {task_names}, as a dict keyed by task "
        f"name or a list in task order; received {count}."
    )


class FunctionLoss(keras.losses.Loss):
    """A loss function as a `keras.losses.Loss`, so that it takes `sample_weight`."""

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
        return FunctionLoss(loss)
    raise ValueError(f"Could not interpret the loss of task {task!r}: {loss!r}.")


def is_single_loss(loss):
    """Whether `loss` is one loss for every task, as Keras accepts it."""
    return isinstance(loss, (str, keras.losses.Loss)) or (
        callable(loss) and not isinstance(loss, (dict, list, tuple))
    )


def resolve_losses(loss, task_names):
    """Returns one `keras.losses.Loss` per task, in task order.

    Args:
        loss: One loss for every task (an identifier, a function or a
            `keras.losses.Loss`, as Keras applies it to every output), or one
            per task as a dict keyed by task name or a list in task order.
        task_names: The task names.
    """
    if loss is None:
        raise ValueError(f"`loss` is required: one loss per task {task_names}.")
    if is_single_loss(loss):
        # A `Loss` instance keeps no state, so the tasks may share it.
        return [_resolve_loss(loss, task) for task in task_names]
    return [
        _resolve_loss(identifier, task)
        for task, identifier in zip(task_names, by_task(loss, task_names, "loss"))
    ]


def task_sample_weights(sample_weight, task_names, dict_outputs=False):
    """Returns one sample weight (or None) per task."""
    if sample_weight is None or not isinstance(sample_weight, (dict, list, tuple)):
        return [sample_weight] * len(task_names)
    return by_task(sample_weight, task_names, "sample weight", dict_outputs)


def labelled(targets, sample_weights, missing_label):
    """Returns per task `(target, presence, count)` for partial labels.

    Args:
        targets: One target tensor per task.
        sample_weights: One sample weight (or None) per task.
        missing_label: The value that marks a missing label (may be NaN).

    Returns:
        Per task: the target with missing entries replaced by 0 (so that the
        loss of a sample without a label stays finite before its weight of 0
        removes it), the float32 `(batch,)` weight of each sample (0 without
        a label) and the number of labelled samples.
    """
    result = []
    for target, weight in zip(targets, sample_weights):
        target = ops.convert_to_tensor(target)
        if math.isnan(missing_label):
            missing = (
                ops.isnan(target)
                if keras.backend.is_float_dtype(target.dtype)
                else ops.zeros_like(target, dtype="bool")
            )
        else:
            missing = ops.equal(target, ops.cast(missing_label, target.dtype))
        target = ops.where(missing, ops.zeros_like(target), target)
        if len(missing.shape) > 1:
            missing = ops.any(ops.reshape(missing, (ops.shape(missing)[0], -1)), axis=1)
        presence = 1.0 - ops.cast(missing, "float32")
        if weight is not None:
            presence = presence * ops.cast(
                ops.reshape(weight, ops.shape(presence)), "float32"
            )
        count = ops.sum(ops.cast(presence != 0, "float32"))
        result.append((target, presence, count))
    return result


def task_losses(loss_functions, targets, predictions, sample_weights, missing_label):
    """Returns the unweighted task losses as a float32 `(T,)` tensor.

    With `missing_label`, each task loss is the mean over the samples that
    have its label.
    """
    if missing_label is None:
        return ops.stack(
            [
                ops.cast(loss(target, prediction, weight), "float32")
                for loss, target, prediction, weight in zip(
                    loss_functions, targets, predictions, sample_weights
                )
            ]
        )
    values = []
    for loss, prediction, (target, weight, count) in zip(
        loss_functions, predictions, labelled(targets, sample_weights, missing_label)
    ):
        value = ops.cast(loss(target, prediction, weight), "float32")
        if loss.reduction in ("sum_over_batch_size", "mean"):
            # From the mean over the batch to the mean over the samples that
            # have this task's label.
            batch_size = ops.cast(ops.shape(weight)[0], "float32")
            value = value * ops.divide_no_nan(batch_size, count)
        values.append(value)
    return ops.stack(values)


def presence_argument(label_counts):
    """Returns `{"present": (T,) 0/1 mask of the tasks with labels}` or `{}`.

    Without partial labels nothing is passed, so methods written before the
    `present` argument keep working.
    """
    if label_counts is None:
        return {}
    return {"present": ops.cast(label_counts > 0, "float32")}
