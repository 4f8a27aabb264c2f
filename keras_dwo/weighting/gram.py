"""The Gram matrix of the task gradients, made safe for solvers.

A NaN or an infinity in a task gradient, or a gradient whose squared norm
overflows float32, makes its row and column of the Gram matrix `J J^T`
non-finite. TensorFlow's and PyTorch's linear solves and eigen-decompositions
raise on such a matrix (eagerly and under `tf.function` without XLA), which
would end training from inside the step. The methods that solve or decompose
the Gram matrix therefore pass it through `finite_gram` first, and return
their result through `combination`, which makes it non-finite again so that
the model's guard drops the step instead of applying it.
"""

from keras import ops


def finite_gram(gram):
    """Returns the Gram matrix with the rows and columns of non-finite tasks zeroed.

    A task whose row holds a non-finite entry is treated like a task with a
    zero gradient. What remains is the Gram matrix of the other tasks, a
    principal submatrix of a positive semi-definite matrix, so it stays
    symmetric positive semi-definite and each method's ridge keeps its systems
    nonsingular. A finite matrix is returned unchanged.

    Args:
        gram: `(T, T)` Gram matrix, or any symmetric matrix built from it.

    Returns:
        The `(T, T)` matrix, with every entry finite.
    """
    finite_rows = ops.all(ops.isfinite(gram), axis=1)
    kept = ops.logical_and(finite_rows[:, None], finite_rows[None, :])
    return ops.where(kept, gram, ops.zeros_like(gram))


def combination(weights, jacobian, gram):
    """Returns `(weights @ jacobian, weights)`, both NaN where `gram` is not finite.

    The weights found on `finite_gram(gram)` treat a task whose gradient is
    not finite, or overflowed, as one with a zero gradient, and could put a
    large coefficient on that huge gradient; such a step must not be
    applied, so it is returned as non-finite for the guard that drops it.

    Args:
        weights: `(T,)` coefficients of the task gradients.
        jacobian: `(T, P)` task gradients.
        gram: The `(T, T)` Gram matrix `J J^T`, as computed (not sanitised).
    """
    weights = ops.where(ops.all(ops.isfinite(gram)), weights, float("nan"))
    return ops.matmul(weights, jacobian), weights


def cosine_matrix(gram, norms):
    """Returns the matrix of cosines between the task gradients.

    Symmetric to the last bit, exactly 1 on the diagonal for a nonzero
    gradient and 0 in the row and column of a zero one, so that a zero
    gradient's task lies in the null space.

    Args:
        gram: `(T, T)` finite Gram matrix `J J^T`.
        norms: `(T,)` gradient norms, the square roots of its diagonal.
    """
    nonzero = norms > 0
    safe_norms = ops.where(nonzero, norms, 1.0)
    pairs = ops.logical_and(nonzero[:, None], nonzero[None, :])
    # Divided in two steps, as `n_i n_j` alone could overflow or underflow.
    cosines = ops.where(pairs, gram / safe_norms[:, None] / safe_norms[None, :], 0.0)
    cosines = 0.5 * (cosines + ops.transpose(cosines))
    identity = ops.eye(ops.shape(gram)[0], dtype=gram.dtype)
    return cosines * (1.0 - identity) + identity * ops.cast(nonzero, gram.dtype)
