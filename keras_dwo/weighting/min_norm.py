"""Small quadratic programs on the Gram matrix of the task gradients.

MGDA, UPGrad and CAGrad each pick coefficients `w` of the task gradients by
minimising a function of `w^T G w`, where `G = J J^T` is the `(T, T)` Gram
matrix, under sign constraints on `w`. For the few tasks of multi-task
learning these programs are solved exactly, at a fixed cost, by enumerating
their faces: every candidate set of free coefficients gets its
equality-constrained solution from one batched linear solve, candidates that
break a sign constraint are clipped back to the feasible set, and the feasible
point with the lowest objective wins. The optimum lies on some face, and that
face's candidate is the optimum itself, so the winner is the exact solution
(up to float32 rounding), with no iteration count or tolerance.

The cost is `2^T` small solves, so the enumeration supports at most
`MAX_TASKS` tasks; methods built for more raise a `ValueError`.

Every program is solved for `G / trace(G) + ridge * I`: the scaling makes the
float32 solves independent of the gradients' magnitude, and the ridge keeps
the faces of parallel, identical or zero gradients solvable. It is the
program of a Jacobian with `sqrt(ridge * trace(G))` times the identity
appended to it, so the solution is that of a slightly perturbed problem, not
an approximation of the original one. The default `RIDGE = 1e-6` sits a few
float32 roundings above the entries of the normalised matrix; measured
against exact solutions it raises the minimum of MGDA's objective by at most
about `1e-7 * trace(G)`. Candidates that come out non-finite are discarded;
the single-task faces always give finite ones. A Gram matrix with non-finite
entries is first passed through `gram.finite_gram`, so the solves never see
them.
"""

from keras import ops

from keras_dwo.weighting.gram import finite_gram

MAX_TASKS = 12
RIDGE = 1e-6


def check_num_tasks(num_tasks, method_name):
    """Raises a `ValueError` when the enumeration cannot serve `num_tasks`.

    Args:
        num_tasks: Number of tasks T.
        method_name: Name of the method, for the message.
    """
    if num_tasks > MAX_TASKS:
        raise ValueError(
            f"{method_name} solves its quadratic program exactly by enumerating "
            f"the 2^T subsets of the tasks, which supports at most {MAX_TASKS} "
            f"tasks; received {num_tasks} tasks."
        )


def regularized_gram(gram, ridge=RIDGE):
    """Returns `G / trace(G) + ridge * I`, positive definite for any Gram matrix.

    `G` is the Gram matrix made finite by `gram.finite_gram`. Where its trace
    overflows, `G / trace(G)` is zero and the result `ridge * I`.

    Args:
        gram: `(T, T)` Gram matrix `J J^T`.
        ridge: Multiple of the identity added after the normalisation.
    """
    gram = finite_gram(gram)
    trace = ops.trace(gram)
    scale = ops.where(trace > 0, trace, ops.ones_like(trace))
    return gram / scale + ridge * ops.eye(ops.shape(gram)[0], dtype=gram.dtype)


def subsets(num_tasks, include_empty=False):
    """Returns the `(K, T)` float 0/1 indicators of the subsets of T tasks.

    Args:
        num_tasks: Number of tasks T.
        include_empty: Whether the empty subset is the first row.
    """
    first = 0 if include_empty else 1
    codes = ops.arange(first, 2**num_tasks, dtype="int32")
    bits = ops.convert_to_tensor([2**task for task in range(num_tasks)], "int32")
    indicators = ops.mod(ops.floor_divide(codes[:, None], bits[None, :]), 2)
    return ops.cast(indicators, "float32")


def among(masks, present):
    """Returns which subsets hold only tasks marked present.

    Args:
        masks: `(K, T)` subset indicators.
        present: None (every task is present) or a `(T,)` 0/1 mask.

    Returns:
        A `(K,)` boolean tensor, or None where `present` is None.
    """
    if present is None:
        return None
    return ops.all(masks <= ops.cast(present, masks.dtype)[None, :], axis=1)


def face_solve(gram, masks, rhs):
    """Solves `G_SS x_S = rhs_S` for every subset S, with `x = 0` off S.

    Args:
        gram: `(T, T)` positive definite matrix.
        masks: `(K, T)` subset indicators.
        rhs: `(K, T, R)` right-hand sides; their entries off S are ignored.

    Returns:
        The `(K, T, R)` solutions.
    """
    num_tasks = ops.shape(gram)[0]
    inside = masks[:, :, None] * masks[:, None, :]
    # The coordinates off S get an identity block, so every system is
    # nonsingular and their solution is the zero right-hand side there.
    outside = (1.0 - masks)[:, :, None] * ops.eye(num_tasks, dtype=gram.dtype)
    return ops.solve(inside * gram + outside, rhs * masks[:, :, None])


def lowest(candidates, objective, allowed=None):
    """Returns the candidate with the lowest objective along the first axis.

    Args:
        candidates: `(K, ..., T)` candidates.
        objective: `(K, ...)` their objective values.
        allowed: Optional `(K,)` boolean: the candidates that may win.

    Returns:
        The `(..., T)` winners, among the candidates that are finite.
    """
    # A float32 solve of a nearly singular face can overflow; such a
    # candidate must neither win nor leak NaN into the weighted sum.
    usable = ops.logical_and(
        ops.all(ops.isfinite(candidates), axis=-1), ops.isfinite(objective)
    )
    if allowed is not None:
        allowed = ops.reshape(allowed, (-1,) + (1,) * (len(usable.shape) - 1))
        usable = ops.logical_and(usable, allowed)
    objective = ops.where(usable, objective, float("inf"))
    candidates = ops.where(usable[..., None], candidates, 0.0)
    choice = ops.one_hot(ops.argmin(objective, axis=0), ops.shape(objective)[0], axis=0)
    return ops.sum(choice[..., None] * candidates, axis=0)


def quadratic_forms(gram, vectors):
    """Returns `v^T G v` for every `v` along the last axis of `vectors`."""
    return ops.sum(ops.matmul(vectors, gram) * vectors, axis=-1)


def simplex_min_norm(gram, ridge=RIDGE, present=None):
    """Returns the minimiser of `w^T G w` over the probability simplex.

    The minimum-norm point of the convex hull of the task gradients (MGDA),
    for the regularised Gram matrix (see the module docstring).

    Args:
        gram: `(T, T)` Gram matrix `J J^T`.
        ridge: See `regularized_gram`.
        present: Optional `(T,)` 0/1 mask: the simplex of the tasks marked 1.

    Returns:
        The `(T,)` non-negative weights, summing to 1.
    """
    gram = regularized_gram(gram, ridge)
    masks = subsets(ops.shape(gram)[0])
    # On the face S the optimum is proportional to G_SS^{-1} 1_S.
    directions = face_solve(gram, masks, masks[:, :, None])[:, :, 0]
    clipped = ops.maximum(directions, 0.0)
    # 1^T G_SS^{-1} 1 > 0, so some entry survives the clipping; a face where
    # float32 rounding breaks this yields NaN, which `lowest` discards.
    candidates = clipped / ops.sum(clipped, axis=1, keepdims=True)
    return lowest(candidates, quadratic_forms(gram, candidates), among(masks, present))


def lower_bounded_min_norm(gram, lower, ridge=RIDGE):
    """Returns the minimiser of `v^T G v` subject to `v >= u`, for each `u`.

    With `u = e_i` this is the dual of the projection of gradient i onto the
    dual cone of all the gradients (UPGrad): the projection is `v^T J`.

    Args:
        gram: `(T, T)` Gram matrix `J J^T`.
        lower: `(N, T)` lower bounds `u`, one problem per row.
        ridge: See `regularized_gram`.

    Returns:
        The `(N, T)` minimisers.
    """
    gram = regularized_gram(gram, ridge)
    # Each subset is the set of coordinates left free; the others sit at
    # their bound, and the free ones solve G_SS v_S = -G_S,fixed u_fixed.
    masks = subsets(ops.shape(gram)[0], include_empty=True)
    fixed = (1.0 - masks)[:, None, :] * lower[None, :, :]
    pull = -ops.matmul(fixed, gram)
    free = face_solve(gram, masks, ops.transpose(pull, (0, 2, 1)))
    candidates = ops.maximum(ops.transpose(free, (0, 2, 1)) + fixed, lower[None])
    return lowest(candidates, quadratic_forms(gram, candidates))
