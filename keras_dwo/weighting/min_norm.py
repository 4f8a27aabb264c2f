"""Small quadratic programs on the Gram matrix of the task gradients.

MGDA, UPGrad and CAGrad each pick coefficients `w` of the task gradients by
minimising a function of `w^T G w`, where `G = J J^T` is the `(T, T)` Gram
matrix, under sign constraints on `w`. Two exact solvers serve them, for any
number of tasks:

- Face enumeration, for at most `enumeration_max_tasks()` tasks: every
  candidate set of free coefficients gets its equality-constrained solution
  from one batched linear solve, candidates that break a sign constraint are
  clipped back to the feasible set, and the feasible point with the lowest
  objective wins. The optimum lies on some face, and that face's candidate is
  the optimum itself, so the winner is exact (up to float32 rounding), with
  no iteration. It costs `2^T` small solves in one call, the fastest for few
  tasks.
- An active-set method (`nonnegative_min`), past that: Lawson and Hanson's
  primal active-set algorithm for non-negative least squares, in its Gram
  form, which moves from face to face with one linear solve each and stops
  at the optimum after finitely many steps. It costs a few times `T` solves of
  at most `T` unknowns.

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

from keras_dwo import trainers
from keras_dwo.weighting.gram import finite_gram

# benchmarks/solvers.py, Part D. Op by op (torch, TensorFlow graphs without
# XLA) the 2^T batched solves of the enumeration beat the active set's loop
# of single solves up to 9 or 10 tasks; under XLA the loop costs little and
# the active set is as fast or faster from 5 tasks (from 4 to 5 on
# TensorFlow, 5 to 6 on JAX).
ENUMERATION_MAX_TASKS = 10
XLA_ENUMERATION_MAX_TASKS = 4
RIDGE = 1e-6


def enumeration_max_tasks():
    """The most tasks that the solvers solve by face enumeration.

    `XLA_ENUMERATION_MAX_TASKS` where the solve is built for XLA (JAX,
    TensorFlow with `jit_compile=True`), `ENUMERATION_MAX_TASKS` elsewhere;
    past it they use the active set. Both paths give the exact optimum.
    """
    if trainers.runs_under_xla():
        return XLA_ENUMERATION_MAX_TASKS
    return ENUMERATION_MAX_TASKS


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
    num_tasks = ops.shape(gram)[0]
    if num_tasks > enumeration_max_tasks():
        # With x = w / (w^T G w) the simplex problem is the non-negative one
        # of `G x = 1` (the same KKT conditions), and w = x / sum(x).
        allowed = None if present is None else ops.cast(present, gram.dtype)
        scaled = nonnegative_min(gram, -ops.ones((1, num_tasks), gram.dtype), allowed)[
            0
        ]
        total = ops.sum(scaled)
        return scaled / ops.where(total > 0, total, ops.ones_like(total))
    masks = subsets(num_tasks)
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
    num_tasks = ops.shape(gram)[0]
    if num_tasks > enumeration_max_tasks():
        # v = u + x with x >= 0: x^T G x / 2 + (G u)^T x, plus a constant.
        return lower + nonnegative_min(gram, ops.matmul(lower, gram))
    # Each subset is the set of coordinates left free; the others sit at
    # their bound, and the free ones solve G_SS v_S = -G_S,fixed u_fixed.
    masks = subsets(num_tasks, include_empty=True)
    fixed = (1.0 - masks)[:, None, :] * lower[None, :, :]
    pull = -ops.matmul(fixed, gram)
    free = face_solve(gram, masks, ops.transpose(pull, (0, 2, 1)))
    candidates = ops.maximum(ops.transpose(free, (0, 2, 1)) + fixed, lower[None])
    return lowest(candidates, quadratic_forms(gram, candidates))


def nonnegative_min(hessian, linear, allowed=None):
    """Returns `argmin_{x >= 0} x^T H x / 2 + q^T x` for each row `q` of `linear`.

    Lawson and Hanson's active-set algorithm for non-negative least squares,
    written for a positive definite `H` (the Gram form of their problem, with
    `H = A^T A` and `q = -A^T b`), for all the problems at once. Each
    iteration takes one linear solve on the current set of free coordinates:

    - if the solution is positive there, the iterate moves to it; the iterate
      is then optimal when no fixed coordinate has a negative derivative
      (the KKT conditions), and otherwise the coordinate with the most
      negative derivative becomes free;
    - if not, the iterate moves towards it until a coordinate reaches 0,
      and the coordinates at 0 become fixed.

    The objective falls strictly with every move to a face optimum, so no
    face is visited twice and the method stops after finitely many
    iterations at the exact optimum. Stopping rule: the derivatives of the
    fixed coordinates are all above `-1e-6 (|H| |x| + |q|)` (float32
    rounding of the products), or a coordinate that just became free comes
    out non-positive from its solve, which in exact arithmetic cannot happen
    and means that its derivative was rounding. Iteration bound: the loop
    runs at most `5 T + 5` iterations; the optimum typically needs `T` to
    `2 T` (at most `1.3 T` in the tests, on random, rank-deficient,
    duplicated-row, zero-row and badly scaled Jacobians up to 64 tasks). A
    problem that reached the bound would return its last iterate, feasible
    and with a lower objective than every iterate before it.

    Args:
        hessian: `(T, T)` symmetric positive definite matrix `H`.
        linear: `(N, T)` linear terms `q`, one problem per row.
        allowed: Optional `(T,)` 0/1 mask: the coordinates marked 0 stay 0.

    Returns:
        The `(N, T)` minimisers.

    References:
        - Lawson and Hanson, "Solving Least Squares Problems", chapter 23,
          Prentice-Hall, 1974.
    """
    num_problems, num_tasks = ops.shape(linear)
    dtype = linear.dtype
    if allowed is None:
        allowed = ops.ones((num_tasks,), dtype)
    can_enter = ops.cast(allowed, dtype)[None, :] > 0
    magnitudes = ops.abs(hessian)
    no_index = ops.full((num_problems,), -1, "int32")

    def condition(x, free, last_entered, done):
        return ops.logical_not(ops.all(done))

    def step(x, free, last_entered, done):
        solution = face_solve(hessian, free, -linear[:, :, None])[:, :, 0]
        is_free = free > 0
        reached = ops.all(ops.logical_or(ops.logical_not(is_free), solution > 0), 1)
        entered = ops.one_hot(ops.maximum(last_entered, 0), num_tasks, dtype=dtype)
        stalled = ops.logical_and(
            last_entered >= 0, ops.sum(entered * solution, axis=1) <= 0
        )

        # At a face optimum: check the derivatives of the fixed coordinates.
        derivative = ops.matmul(solution, hessian) + linear
        rounding = 1e-6 * (ops.matmul(ops.abs(solution), magnitudes) + ops.abs(linear))
        violation = ops.where(
            ops.logical_and(ops.logical_not(is_free), can_enter),
            -derivative - rounding,
            -float("inf"),
        )
        entering = ops.argmax(violation, axis=1)
        optimal = ops.amax(violation, axis=1) <= 0
        moved_free = free + ops.where(
            optimal[:, None], 0.0, ops.one_hot(entering, num_tasks, dtype=dtype)
        )

        # Short of it: step towards it until the first free coordinate hits 0.
        blocking = ops.logical_and(is_free, solution <= 0)
        ratios = ops.where(
            blocking, x / ops.where(blocking, x - solution, 1.0), float("inf")
        )
        alpha = ops.amin(ratios, axis=1, keepdims=True)
        partial = x + alpha * (solution - x)
        kept = ops.logical_and(ops.logical_and(is_free, partial > 0), ratios > alpha)
        partial = ops.where(kept, partial, 0.0)

        keep = ops.logical_or(done, stalled)
        new_x = ops.where(
            keep[:, None], x, ops.where(reached[:, None], solution, partial)
        )
        new_free = ops.where(
            keep[:, None],
            free,
            ops.where(reached[:, None], moved_free, ops.cast(kept, dtype)),
        )
        new_last = ops.where(
            ops.logical_and(reached, ops.logical_not(optimal)),
            ops.cast(entering, "int32"),
            no_index,
        )
        new_done = ops.logical_or(keep, ops.logical_and(reached, optimal))
        return new_x, new_free, ops.where(keep, last_entered, new_last), new_done

    x, _, _, _ = ops.while_loop(
        condition,
        step,
        (
            ops.zeros_like(linear),
            ops.zeros_like(linear),
            no_index,
            ops.zeros((num_problems,), "bool"),
        ),
        maximum_iterations=5 * num_tasks + 5,
    )
    return x
