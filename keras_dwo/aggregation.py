"""The method's combination of the task gradients, safe on non-finite ones."""

from keras import ops


def finite_jacobian(jacobian):
    """Returns the Jacobian with its non-finite entries replaced by 0."""
    return ops.where(ops.isfinite(jacobian), jacobian, 0.0)


def aggregate_blocks(method, blocks, losses, sum_over_replicas=None, **presence):
    """Returns the method's direction, in blocks, and weights for any Jacobian.

    The Jacobian comes as blocks of columns (one per variable, or one slice
    of all of them per replica). A method that combines the task gradients
    by their inner products (`weights_from_gram`) never needs them side by
    side: the Gram matrix is the sum of the blocks' own, and the direction
    is found block by block. Another method gets the blocks concatenated.

    A non-finite step is dropped by the model's guard; the method must not
    fail on it first (TensorFlow's solvers raise on NaN). A method that
    takes the Jacobian sees it with non-finite entries zeroed; one that
    takes the Gram matrix sanitises it itself. Either way the direction is
    non-finite where the Jacobian was, so that the guard sees it.

    Args:
        method: The `GradientWeighting`.
        blocks: Float32 `(T, P_k)` blocks of the task gradients' columns,
            summed over the replicas.
        losses: The `(T,)` finite task losses.
        sum_over_replicas: None where the blocks hold every column, or a
            function that sums a list of tensors over the replicas, each of
            which holds its own columns (only for `weights_from_gram`).
        **presence: `present`, the `(T,)` mask of the tasks with labels, or
            nothing.

    Returns:
        `(directions, weights)`: the `(P_k,)` blocks of the direction and the
        `(T,)` coefficients of the task gradients.
    """
    if not method.weights_from_gram:
        jacobian = ops.concatenate(blocks, axis=1)
        direction, weights = method.aggregate(
            finite_jacobian(jacobian), losses, training=True, **presence
        )
        direction = direction + 0.0 * ops.sum(jacobian)
        directions, start = [], 0
        for block in blocks:
            size = ops.shape(block)[1]
            directions.append(direction[start : start + size])
            start += size
        return directions, weights
    # No finite copy of the blocks: a non-finite entry makes its task's
    # diagonal entry of the Gram matrix non-finite, which the methods that
    # solve it sanitise (`gram.finite_gram`) and which drops the step below.
    gram = sum(ops.matmul(block, ops.transpose(block)) for block in blocks)
    if sum_over_replicas is not None:
        (gram,) = sum_over_replicas([gram])
    weights = method.gram_weights(gram, losses, training=True, **presence)
    # The weights found for a non-finite Gram matrix treat those tasks as
    # zero gradients and could put a large coefficient on a huge one: such a
    # step must not be applied.
    weights = ops.where(ops.all(ops.isfinite(gram)), weights, float("nan"))
    return [ops.matmul(weights, block) for block in blocks], weights


def combine(
    method, task_gradients, losses, loss_scale=None, aggregate=None, **presence
):
    """Combines per-task gradients, of any shapes, into one gradient each.

    Args:
        method: The `GradientWeighting`.
        task_gradients: One `(T, ...)` tensor per variable: the gradients of
            the T weighted task losses with respect to it.
        losses: The `(T,)` task losses (non-finite ones are passed as 0; the
            guard drops such a step).
        loss_scale: None, or the factor by which the gradients are scaled
            (mixed precision): the method sees unscaled gradients, and the
            direction is scaled back.
        aggregate: `aggregate_blocks` (default), or a trainer's function
            with its arguments, for gradients that are each replica's own.
        **presence: `present`, or nothing.

    Returns:
        `(gradients, weights)`: one combined gradient per entry of
        `task_gradients`, shaped and typed like one of its rows, and the
        `(T,)` coefficients of the task gradients.
    """
    aggregate = aggregate or aggregate_blocks
    num_tasks = ops.shape(losses)[0]
    blocks = [
        ops.reshape(ops.cast(g, "float32"), (num_tasks, -1)) for g in task_gradients
    ]
    if loss_scale is not None:
        blocks = [block / loss_scale for block in blocks]
    finite_losses = ops.where(ops.isfinite(losses), losses, 0.0)
    directions, weights = aggregate(method, blocks, finite_losses, **presence)
    gradients = []
    for gradient, direction in zip(task_gradients, directions):
        if loss_scale is not None:
            direction = direction * loss_scale
        direction = ops.reshape(direction, ops.shape(gradient)[1:])
        gradients.append(ops.cast(direction, gradient.dtype))
    return gradients, ops.stop_gradient(weights)
