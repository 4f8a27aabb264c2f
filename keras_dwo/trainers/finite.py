"""The finite check of a step, in `keras.ops` (compiled backends)."""

import keras
from keras import ops


def values_are_finite(values):
    """Whether every float tensor in `values` is finite: a boolean tensor.

    Each tensor times zero is zero where it is finite and NaN elsewhere, so
    one sum of those products is finite exactly when every entry is (no
    overflow: every term is 0 or NaN). A multiply and a sum per tensor cost
    TensorFlow's executor less than an `isfinite` and an `all` (measured in
    a `tf.function` over the eleven tensors of a step: about 40 against 120
    microseconds); XLA fuses either.
    """
    sums = [
        ops.sum(ops.cast(value, "float32") * 0.0)
        for value in values
        if keras.backend.is_float_dtype(keras.backend.standardize_dtype(value.dtype))
    ]
    if not sums:
        return ops.convert_to_tensor(True)
    return ops.isfinite(sum(sums[1:], sums[0]))
