"""Weights on the probability simplex: projection and state, in `keras.ops`."""

import keras
from keras import ops

# Below every value that reaches the projection: absent tasks sort last.
ABSENT = -1e30


def project_to_simplex(values, present):
    """Returns the point of the present tasks' simplex nearest to `values`.

    The sort-based algorithm (Held, Wolfe and Crowder; Duchi et al. 2008):
    with `u` the values sorted in decreasing order, the support is the
    largest `k` with `u_k > (sum_{j<=k} u_j - 1) / k`, and the projection is
    `max(v - theta, 0)` with `theta` that threshold at `k`.

    The values are first shifted so that the largest present one is 0,
    which leaves the projection unchanged: with large values (in the
    millions, in float32) the threshold would lose the simplex's 1 to
    rounding, and the result would leave the simplex.

    Args:
        values: `(T,)` float tensor.
        present: `(T,)` 0/1 mask; the absent tasks get 0 and take no part.

    Returns:
        The `(T,)` projection: non-negative, summing to 1 over the present
        tasks (all zeros where none is present).
    """
    values = values - ops.amax(ops.where(present > 0, values, ABSENT))
    masked = ops.where(present > 0, values, ABSENT)
    ordered = ops.flip(ops.sort(masked))
    cumulative = ops.cumsum(ordered)
    ranks = ops.arange(1, ops.shape(values)[0] + 1, dtype=values.dtype)
    support = ops.cast(ordered * ranks > cumulative - 1.0, values.dtype) * ops.cast(
        ordered > ABSENT, values.dtype
    )
    size = ops.maximum(ops.sum(support), 1.0)
    threshold = (ops.sum(ordered * support) - 1.0) / size
    return ops.maximum(values - threshold, 0.0) * present


def present_share(weights, present):
    """Returns the present tasks' weights rescaled to sum to 1, the others 0.

    For weights kept on the simplex as state: an absent task keeps its
    stored weight, and the present ones are renormalised among themselves
    (with every task present, they sum to 1 already).
    """
    return ops.divide_no_nan(weights * present, ops.sum(weights * present))


def uniform_simplex_weight(method, name):
    """Adds a non-trainable `(T,)` variable of weights on the simplex, all `1 / T`."""
    return method.add_weight(
        shape=(method.num_tasks,),
        initializer=keras.initializers.Constant(1.0 / method.num_tasks),
        trainable=False,
        name=name,
    )
