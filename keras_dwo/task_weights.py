"""Validation of the per-task loss weights that users and callbacks set."""

import math

import numpy as np
from keras import ops

from keras_dwo import trainers


def validated_task_weights(weights, task_names):
    """Returns the task weights as Python floats, after checking every one.

    A weight multiplies its task's loss before any method sees it, so a NaN,
    infinite or negative weight would poison every step (or, for the methods
    defined on positive losses, turn a loss negative) without an error
    pointing at its cause. Zero is valid: it switches a task off.

    Args:
        weights: Sequence or array of T numbers, in task order.
        task_names: Sequence of the T task names.

    Returns:
        A list of T Python floats.

    Raises:
        ValueError: When the number of weights differs from the number of
            tasks, or a weight is not a number, NaN, infinite or negative; the
            message names the offending tasks and values.
    """
    task_names = tuple(task_names)
    values = np.asarray(weights, dtype=object).reshape(-1).tolist()
    if len(values) != len(task_names):
        raise ValueError(
            f"Got {len(values)} task weight(s) for {len(task_names)} task(s) "
            f"{task_names}: {values}."
        )
    floats, invalid = [], []
    for name, value in zip(task_names, values):
        try:
            number = float(value)
        except (TypeError, ValueError):
            invalid.append(f"{name}={value!r}")
            continue
        if not math.isfinite(number) or number < 0:
            invalid.append(f"{name}={number}")
        floats.append(number)
    if invalid:
        raise ValueError(
            "Task weights must be finite and non-negative; invalid weight(s): "
            f"{', '.join(invalid)}."
        )
    return floats


def weights_and_values_are_finite(task_weights, values):
    """Whether a step may be applied: a scalar boolean tensor.

    True when the task weights are finite and non-negative and every float
    tensor in `values` (the task losses, the objective, the gradients, the
    method's new state) is finite.
    """
    # The square root of a negative weight is NaN: one finite check covers
    # the weights' sign too.
    return trainers.values_are_finite([ops.sqrt(task_weights), *values])
