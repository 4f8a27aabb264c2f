"""The task structure of a multi-task model: names, losses, targets and labels.

Everything here is plain bookkeeping on Python structures and `keras.ops`
tensors; the model and the trainers call it, nothing here holds state.
"""

import math

import keras
from keras import ops
from keras.src.backend import get_keras_mask
from keras.src.losses.loss import scale_loss_for_distribution


def output_names(outputs):
    """Returns the names of a functional model's outputs.

    Args:
        outputs: A dict of output tensors (its keys are the names) or a list
            of output tensors (the names of the layers that produce them).

    Raises:
        ValueError: If an output is nested or two outputs share a name.
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
            "Each output must be a single tensor; received nested outputs."
        )
    return checked_output_names(names)


def checked_output_names(names):
    """Returns `names` as a tuple of unique strings."""
    names = tuple(str(name) for name in names)
    if not names:
        raise ValueError("The model has no outputs.")
    if len(set(names)) != len(names):
        raise ValueError(f"Output names must be unique; received {list(names)}.")
    return names


def checked_task_names(names):
    """Returns `names` as a tuple of strings, checked to name two or more tasks."""
    names = tuple(str(name) for name in names)
    if len(names) < 2:
        raise ValueError(
            "DynamicWeightedModel needs at least two tasks (outputs, or loss "
            f"terms of one output); received {len(names)}: {list(names)}. Give "
            "an output several loss terms (a list of losses, as in "
            "`loss={'box': ['mse', 'mae']}`), or use a plain keras.Model for a "
            "single task."
        )
    if len(set(names)) != len(names):
        raise ValueError(f"Task names must be unique; received {list(names)}.")
    return names


def by_name(structure, names, what, dict_outputs=False, kind="output"):
    """Returns `structure` (a dict by name or a sequence) in the order of `names`.

    Args:
        structure: A dict keyed by name, or a list or tuple in order; with
            one name, also the value alone.
        names: The output (or task) names, in order.
        what: What the structure holds, for error messages ("loss", "target").
        dict_outputs: Whether the model's outputs are a dict. Keras pairs a
            list of targets with dict outputs in another order for losses
            and for metrics, so a list is refused there.
        kind: What the names name, for error messages ("output", "task").

    Raises:
        ValueError: Naming the unknown or missing names, or the count.
    """
    if isinstance(structure, dict):
        unknown = sorted(set(structure) - set(names))
        missing = [name for name in names if name not in structure]
        if unknown:
            raise ValueError(
                f"{what} given for unknown {kind}(s) {unknown}; the {kind}s are "
                f"{names}."
            )
        if missing:
            raise ValueError(
                f"No {what} for {kind}(s) {missing}; the {kind}s are {names}."
            )
        return [structure[name] for name in names]
    if not isinstance(structure, (list, tuple)) and len(names) == 1:
        # One output: its value alone is unambiguous (Keras hands a
        # single-output model's prediction over bare, as users give targets).
        return [structure]
    if isinstance(structure, (list, tuple)) and len(structure) == len(names):
        if dict_outputs:
            raise ValueError(
                f"The model's outputs are a dict, so each {what} must be given "
                f"in a dict keyed by {kind} name {names}; received a "
                f"{type(structure).__name__}, whose pairing with the outputs "
                "would be ambiguous."
            )
        return list(structure)
    count = len(structure) if isinstance(structure, (list, tuple)) else 1
    raise ValueError(
        f"Expected one {what} per {kind} {names}, as a dict keyed by {kind} "
        f"name or a list in {kind} order; received {count}."
    )


class FunctionLoss(keras.losses.Loss):
    """A loss function as a `keras.losses.Loss`, so that it takes `sample_weight`."""

    def __init__(self, function):
        super().__init__(name=getattr(function, "__name__", None))
        self.function = function

    def call(self, y_true, y_pred):
        return self.function(y_true, y_pred)


def _resolve_loss(identifier, task):
    try:
        loss = keras.losses.get(identifier)
    except ValueError as error:
        raise ValueError(f"The loss of task {task!r}: {error}") from None
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


def _term_name(identifier, output):
    if isinstance(identifier, str):
        return identifier
    if isinstance(identifier, keras.losses.Loss):
        return identifier.name
    name = getattr(identifier, "__name__", None)
    if name is None or name == "<lambda>":
        raise ValueError(
            f"The loss terms of output {output!r} must be named: give them "
            f"as a dict keyed by term name; received {identifier!r}."
        )
    return name


def _output_terms(output, identifier):
    """Returns `[(task_name, identifier)]` for one output's loss or terms."""
    if isinstance(identifier, dict):
        return [(f"{output}_{term}", each) for term, each in identifier.items()]
    if isinstance(identifier, (list, tuple)):
        return [(f"{output}_{_term_name(each, output)}", each) for each in identifier]
    return [(output, identifier)]


def loss_tasks(loss, output_names):
    """Returns the tasks that `loss` defines on the model's outputs.

    Each output is one task, except where its loss is a list of loss terms
    (each term is a task named `<output>_<term>`, the term named after the
    loss: its identifier, its `name` or its function's `__name__`) or a dict
    of them (`<output>_<key>`).

    Args:
        loss: One loss for every output (an identifier, a function or a
            `keras.losses.Loss`, as Keras applies it to every output), or one
            per output as a dict keyed by output name or a list in output
            order, where an output's loss may be a list or dict of terms.
            With one output, a list of several losses is its terms.
        output_names: The names of the model's outputs, in order.

    Returns:
        `(task_names, task_outputs, losses)`: the tasks in order, the index
        of the output each task reads, and each task's `keras.losses.Loss`.

    Raises:
        ValueError: Naming the output without a loss, the unknown output, the
            loss that cannot be interpreted or the task name given twice.
    """
    if loss is None:
        raise ValueError(f"`loss` is required: one loss per output {output_names}.")
    if is_single_loss(loss):
        per_output = [loss] * len(output_names)
    elif isinstance(loss, (list, tuple)) and len(output_names) == 1 and len(loss) > 1:
        # Several losses for the only output can only be its terms.
        per_output = [loss]
    else:
        per_output = by_name(loss, output_names, "loss")
    names, outputs, losses = [], [], []
    for index, (output, identifier) in enumerate(zip(output_names, per_output)):
        terms = _output_terms(output, identifier)
        if not terms:
            raise ValueError(f"Output {output!r} has an empty list of loss terms.")
        for name, each in terms:
            names.append(name)
            outputs.append(index)
            # A `Loss` instance keeps no state, so the tasks may share it.
            losses.append(_resolve_loss(each, name))
    return checked_task_names(names), tuple(outputs), losses


def output_sample_weights(sample_weight, output_names, dict_outputs=False):
    """Returns one sample weight (or None) per output."""
    if sample_weight is None or not isinstance(sample_weight, (dict, list, tuple)):
        return [sample_weight] * len(output_names)
    return by_name(sample_weight, output_names, "sample weight", dict_outputs)


def labelled(targets, sample_weights, missing_label):
    """Returns per output `(target, presence, count)` for partial labels.

    Args:
        targets: One target tensor per output.
        sample_weights: One sample weight (or None) per output.
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


def _is_plain_mean(loss, prediction, sample_weight):
    """Whether `loss` on `prediction` is the mean of its per-sample values.

    True for a loss that reduces by `sum_over_batch_size` with Keras's own
    `__call__`, without sample weights or a mask, on a prediction whose
    shape is known.
    """
    predictions = keras.tree.flatten(prediction)
    return (
        sample_weight is None
        and loss.reduction == "sum_over_batch_size"
        and type(loss).__call__ is keras.losses.Loss.__call__
        and all(get_keras_mask(p) is None for p in predictions)
        and all(None not in tuple(p.shape) for p in predictions)
    )


def reduced_loss(loss, target, prediction, sample_weight=None):
    """`loss(target, prediction, sample_weight)`: a Keras loss's value.

    The same value as the call, by a shorter way where the loss is a plain
    mean (`_is_plain_mean`): the sum of the per-sample values over their
    number, scaled for `tf.distribute` as Keras scales it. Keras's call
    builds the divisor as a tensor (the shape, its product, a cast) and
    divides by `divide_no_nan`: on eager torch about 50 microseconds per
    task and step before the backward pass through them; in a compiled
    step it makes no difference.
    """
    if not _is_plain_mean(loss, prediction, sample_weight):
        return loss(target, prediction, sample_weight)

    def as_loss_dtype(value):
        return ops.convert_to_tensor(value, dtype=loss.dtype)

    values = loss.call(
        keras.tree.map_structure(as_loss_dtype, target),
        keras.tree.map_structure(as_loss_dtype, prediction),
    )
    if get_keras_mask(values) is not None:
        return loss(target, prediction)
    values = as_loss_dtype(values)
    if not values.shape:
        # Keras leaves a loss that is already a scalar as it is.
        return values
    count = math.prod(values.shape)
    if count == 0:
        return loss(target, prediction)
    return scale_loss_for_distribution(ops.sum(values) / count)


def each_task_loss(loss_functions, targets, predictions, sample_weights, missing_label):
    """Returns the unweighted task losses: a list of T float32 scalars.

    With `missing_label`, each task loss is the mean over the samples that
    have its label.
    """
    if missing_label is None:
        return [
            ops.cast(reduced_loss(loss, target, prediction, weight), "float32")
            for loss, target, prediction, weight in zip(
                loss_functions, targets, predictions, sample_weights
            )
        ]
    values = []
    for loss, prediction, (target, weight, count) in zip(
        loss_functions, predictions, labelled(targets, sample_weights, missing_label)
    ):
        value = ops.cast(reduced_loss(loss, target, prediction, weight), "float32")
        if loss.reduction in ("sum_over_batch_size", "mean"):
            # From the mean over the batch to the mean over the samples that
            # have this task's label.
            batch_size = ops.cast(ops.shape(weight)[0], "float32")
            value = value * ops.divide_no_nan(batch_size, count)
        values.append(value)
    return values


def presence_argument(label_counts):
    """Returns `{"present": (T,) 0/1 mask of the tasks with labels}` or `{}`.

    Without partial labels nothing is passed, so methods written before the
    `present` argument keep working.
    """
    if label_counts is None:
        return {}
    return {"present": ops.cast(label_counts > 0, "float32")}
