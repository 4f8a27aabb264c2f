"""Conflict-averse gradient descent, CAGrad (Liu et al. 2021)."""

import keras
from keras import ops

from keras_dwo.arguments import checked_number
from keras_dwo.weighting import min_norm
from keras_dwo.weighting.base import GradientWeighting
from keras_dwo.weighting.base import presence

RESCALES = (0, 1, 2)


def face_stationary_points(gram, masks, mean_products, radius):
    """Returns the stationary point of CAGrad's dual on the affine hull of each face.

    On the face S the stationary point lies on the line `p + beta q`, where
    `p` is the minimum-norm point of the face's affine hull and `q` the tilt
    that `a` adds; `beta = ||g_w|| / r` then has the closed form
    `sqrt(p^T G p / (r^2 - q^T G q))`. A face without such a point
    (`r^2 <= q^T G q`) has its minimum on a smaller face and offers `p`.

    Args:
        gram: `(T, T)` positive definite Gram matrix.
        masks: `(K, T)` face indicators.
        mean_products: `(T,)` inner products `a_i = g_i . g_0`.
        radius: Non-negative scalar `r`.

    Returns:
        The `(K, T)` points, zero off their face, and the `(K,)` booleans
        telling which faces have a stationary point.
    """
    rhs = ops.stack([masks, masks * mean_products[None, :]], axis=-1)
    solutions = min_norm.face_solve(gram, masks, rhs)
    inverse_ones, inverse_products = solutions[:, :, 0], solutions[:, :, 1]
    ones_inverse_ones = ops.sum(inverse_ones, axis=1, keepdims=True)
    affine_min_norm = inverse_ones / ones_inverse_ones
    tilt = (
        affine_min_norm * ops.sum(inverse_products, axis=1, keepdims=True)
        - inverse_products
    )
    gap = ops.square(radius) - min_norm.quadratic_forms(gram, tilt)
    has_stationary_point = gap > 0
    affine_norm_squared = 1.0 / ones_inverse_ones[:, 0]
    beta = ops.where(
        has_stationary_point,
        ops.sqrt(
            affine_norm_squared
            / ops.where(has_stationary_point, gap, ops.ones_like(gap))
        ),
        ops.zeros_like(gap),
    )
    return affine_min_norm + beta[:, None] * tilt, has_stationary_point


def dual_objective(weights, gram, mean_products, radius):
    """Returns `w . a + r sqrt(w^T G w)` for every row `w` of `weights`."""
    norms = ops.sqrt(ops.maximum(min_norm.quadratic_forms(gram, weights), 0.0))
    return ops.matmul(weights, mean_products) + radius * norms


def worst_case_weights(gram, mean_weights, radius, present=None):
    """Returns `argmin_{w in simplex} w . a + r sqrt(w^T G w)`, CAGrad's dual.

    Here `a = G m` holds the inner products of the task gradients with the
    mean gradient `g_0 = m^T J`. Up to `min_norm.enumeration_max_tasks()`
    tasks, each face's stationary point (`face_stationary_points`) is
    clipped to the simplex and the lowest objective wins, which is exact;
    past that, `bracketed_worst_case_weights` finds it.

    Args:
        gram: `(T, T)` positive definite Gram matrix.
        mean_weights: `(T,)` coefficients `m` of the mean gradient.
        radius: Non-negative scalar `r`.
        present: Optional `(T,)` 0/1 mask: the simplex of the tasks marked 1.

    Returns:
        The `(T,)` simplex weights `w`.
    """
    mean_products = ops.matmul(gram, mean_weights)
    num_tasks = ops.shape(gram)[0]
    if num_tasks > min_norm.enumeration_max_tasks():
        return bracketed_worst_case_weights(gram, mean_weights, radius, present)
    masks = min_norm.subsets(num_tasks)
    points, _ = face_stationary_points(gram, masks, mean_products, radius)
    clipped = ops.maximum(points, 0.0)
    candidates = clipped / ops.sum(clipped, axis=1, keepdims=True)
    objective = dual_objective(candidates, gram, mean_products, radius)
    return min_norm.lowest(candidates, objective, min_norm.among(masks, present))


def bracketed_worst_case_weights(gram, mean_weights, radius, present=None):
    """CAGrad's dual for many tasks, by a safeguarded search over `beta`.

    The optimum `w*` is also the minimum-norm point of the simplex hull of
    the shifted gradients `g_i + beta g_0` for `beta = ||g_w*|| / r` (the
    two problems share their KKT conditions), found exactly by
    `min_norm.nonnegative_min`. `f(beta) = ||g_w(beta)|| - r beta` is
    positive at 0 and not positive at `max_i ||g_i|| / r`, and has a single
    root. Each iteration solves at the current `beta`, narrows the bracket
    with the sign of `f`, and computes the closed-form stationary point of
    the face that the solution lies on (`face_stationary_points`): the
    search stops when that point is on the simplex and meets the KKT
    conditions of the dual (exact, as in the enumeration), and otherwise
    moves to its `beta` when that lies inside the bracket (a Newton-like
    step, which finds the optimal face in a few iterations) or to the
    bracket's midpoint. Iteration bound: 40, which halves the bracket past
    float32 resolution; the best point found (lowest objective) is returned.

    Args:
        gram: `(T, T)` positive definite Gram matrix.
        mean_weights: `(T,)` coefficients `m` of the mean gradient.
        radius: Non-negative scalar `r`.
        present: Optional `(T,)` 0/1 mask: the simplex of the tasks marked 1.

    Returns:
        The `(T,)` simplex weights `w`.
    """
    num_tasks = ops.shape(gram)[0]
    dtype = gram.dtype
    allowed = ops.ones((num_tasks,), dtype) if present is None else present
    allowed = ops.cast(allowed, dtype)
    mean_products = ops.matmul(gram, mean_weights)
    mean_norm_squared = ops.sum(mean_weights * mean_products)
    radius = ops.maximum(radius, 1e-30)
    minus_ones = -ops.ones((1, num_tasks), dtype)

    def weights_at(beta):
        # The Gram matrix of g_i + beta g_0. For a small radius the bracket
        # reaches large beta, where the shifted gradients are nearly
        # parallel: normalised and ridged like every Gram matrix the solvers
        # see, it stays finite and solvable (the simplex's minimum-norm point
        # does not change with the scale).
        shifted = min_norm.regularized_gram(
            gram
            + beta * (mean_products[:, None] + mean_products[None, :])
            + ops.square(beta) * mean_norm_squared
        )
        scaled = min_norm.nonnegative_min(shifted, minus_ones, allowed)[0]
        return scaled / ops.maximum(ops.sum(scaled), 1e-30)

    def condition(low, high, beta, best, best_objective, done):
        return ops.logical_not(done)

    def step(low, high, beta, best, best_objective, done):
        weights = weights_at(beta)
        norm = ops.sqrt(ops.maximum(min_norm.quadratic_forms(gram, weights), 0.0))
        above = norm > radius * beta
        low = ops.where(above, beta, low)
        high = ops.where(above, high, beta)

        face = ops.cast(weights > 0, dtype)[None, :]
        points, has_point = face_stationary_points(gram, face, mean_products, radius)
        point = points[0]
        on_simplex = ops.logical_and(has_point[0], ops.all(point >= 0))
        point_norm = ops.sqrt(ops.maximum(min_norm.quadratic_forms(gram, point), 1e-30))
        derivative = mean_products + radius * ops.matmul(gram, point) / point_norm
        level = ops.sum(point * derivative)
        rounding = 1e-5 * (
            ops.abs(mean_products) + radius * ops.sqrt(ops.diagonal(gram))
        )
        outside = ops.logical_and(face[0] == 0, allowed > 0)
        optimal = ops.logical_and(
            on_simplex,
            ops.all(
                ops.logical_or(ops.logical_not(outside), derivative >= level - rounding)
            ),
        )

        candidates = ops.stack([weights, ops.where(on_simplex, point, weights)])
        objective = dual_objective(candidates, gram, mean_products, radius)
        better = objective < best_objective
        best = ops.where(
            better[1], candidates[1], ops.where(better[0], candidates[0], best)
        )
        best_objective = ops.minimum(best_objective, ops.amin(objective))

        point_beta = point_norm / radius
        inside = ops.logical_and(
            ops.logical_and(has_point[0], point_beta > low), point_beta < high
        )
        beta = ops.where(inside, point_beta, (low + high) / 2)
        return low, high, beta, best, best_objective, optimal

    zero = ops.zeros((), dtype)
    high = ops.sqrt(ops.amax(ops.diagonal(gram))) / radius
    _, _, _, best, _, _ = ops.while_loop(
        condition,
        step,
        (
            zero,
            high,
            zero,
            allowed / ops.maximum(ops.sum(allowed), 1.0),
            ops.convert_to_tensor(float("inf"), dtype),
            ops.convert_to_tensor(False),
        ),
        maximum_iterations=40,
    )
    return best


@keras.saving.register_keras_serializable(package="keras_dwo")
class CAGrad(GradientWeighting):
    """CAGrad: the best worst-case direction near the mean gradient.

    The direction maximises the smallest improvement over the tasks,
    `min_i g_i . d`, within the ball `||d - g_0|| <= c ||g_0||` around the
    mean gradient `g_0`. By duality `d = g_0 + (c ||g_0|| / ||g_w||) g_w`,
    where `g_w = sum_i w_i g_i` and `w` minimises
    `g_w . g_0 + c ||g_0|| ||g_w||` over the probability simplex. The official
    code solves that with SciPy's SLSQP; here `worst_case_weights` solves
    it exactly, for any number of tasks, on the trace-normalised Gram matrix
    with the ridge of `min_norm`. The direction is then divided by `1 + c^2`
    (`rescale=1`), by `1 + c` (`rescale=2`) or left as is (`rescale=0`).
    For a single task the direction is `(1 + c) g` over the rescaling
    (`1.2 g` with the defaults). With `c = 0` the direction is the mean
    gradient; as `c` grows it turns towards the MGDA direction. The weights
    are `(1/T + (c ||g_0|| / ||g_w||) w_i)` over the same rescaling.

    Args:
        c: Radius of the ball, relative to `||g_0||` (default 0.5, the
            official code's and LibMTL's).
        rescale: 0, 1 (default, as in the official code and LibMTL) or 2:
            the rescaling of the direction described above.
        **kwargs: Passed to `GradientWeighting`.

    References:
        - Liu, Liu, Jin, Stone and Liu, "Conflict-Averse Gradient Descent for
          Multi-task Learning", NeurIPS 2021.
    """

    def __init__(self, c=0.5, rescale=1, **kwargs):
        super().__init__(**kwargs)
        if rescale not in RESCALES:
            raise ValueError(
                f"`rescale` must be one of {RESCALES}; received {rescale!r}."
            )
        self.c = checked_number("c", c, low=0)
        self.rescale = int(rescale)

    def gram_weights(self, gram, losses, training=True, present=None):
        gram = min_norm.regularized_gram(gram)
        present = presence(present, losses)
        mean_weights = present / ops.sum(present)
        radius = self.c * ops.sqrt(
            ops.sum(mean_weights * ops.matmul(gram, mean_weights))
        )
        conflict_weights = worst_case_weights(gram, mean_weights, radius, present)
        # The ridge makes ||g_w||^2 >= RIDGE ||w||^2 > 0 in exact arithmetic;
        # the bound is restored where float32 cancellation breaks it.
        conflict_norm = ops.sqrt(
            ops.maximum(
                min_norm.quadratic_forms(gram, conflict_weights),
                min_norm.RIDGE * ops.sum(ops.square(conflict_weights)),
            )
        )
        weights = mean_weights + (radius / conflict_norm) * conflict_weights
        weights = weights / {0: 1.0, 1: 1.0 + self.c**2, 2: 1.0 + self.c}[self.rescale]
        return weights

    def get_config(self):
        return {**super().get_config(), "c": self.c, "rescale": self.rescale}
