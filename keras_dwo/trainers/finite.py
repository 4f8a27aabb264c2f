"""The finite check of a step, in `keras.ops` (compiled backends)."""

import keras
from keras import ops


def values_are_finite(values):
    """Whether every float tensor in `values` is finite: a boolean tensor."""
    checks = [
        ops.all(ops.isfinite(value))
        for value in values
        if keras.backend.is_float_dtype(keras.backend.standardize_dtype(value.dtype))
    ]
    return ops.all(ops.stack(checks)) if checks else ops.convert_to_tensor(True)
