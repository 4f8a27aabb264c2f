"""Conflict-averse gradient descent, CAGrad (Liu et al. 2021)."""

import keras
from keras import ops

from keras_dwo.weighting import min_norm
from keras_dwo.weighting.base import GradientWeighting
from keras_dwo.weighting.base import presence
from keras_dwo.weighting.gram import combination

RESCALES = (0, 1, 2)


def worst_case_weights(gram, mean_products, radius, present=None):
    """Returns `argmin_{w in simplex} w . a + r sqrt(w^T G w)`, CAGrad's dual.

    On a face S of the simplex the stationary point lies on the line
    `p + mu q`, where `p` is the minimum-norm point of the face's affine hull
    and `q` the tilt that `a` adds; `mu = ||g_w|| / r` then has the closed
    form `sqrt(p^T G p / (r^2 - q^T G q))`. A face without such a point
    (`r^2 <= q^T G q`) has its minimum on a smaller face and offers `p`
    instead. As in `min_norm`, each face's candidate is clipped to the
    simplex and the lowest objective wins, which is exact.

    Args:
        gram: `(T, T)` positive definite Gram matrix.
        mean_products: `(T,)` inner products `a_i = g_i . g_0` with the mean
            gradient.
        radius: Non-negative scalar `r`.
        present: Optional `(T,)` 0/1 mask: the simplex of the tasks marked 1.

    Returns:
        The `(T,)` simplex weights `w`.
    """
    masks = min_norm.subsets(ops.shape(gram)[0])
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
    mu = ops.where(
        has_stationary_point,
        ops.sqrt(
            affine_norm_squared
            / ops.where(has_stationary_point, gap, ops.ones_like(gap))
        ),
        ops.zeros_like(gap),
    )
    clipped = ops.maximum(affine_min_norm + mu[:, None] * tilt, 0.0)
    candidates = clipped / ops.sum(clipped, axis=1, keepdims=True)
    norms = ops.sqrt(ops.maximum(min_norm.quadratic_forms(gram, candidates), 0.0))
    objective = ops.matmul(candidates, mean_products) + radius * norms
    return min_norm.lowest(candidates, objective, min_norm.among(masks, present))


@keras.saving.register_keras_serializable(package="keras_dwo")
class CAGrad(GradientWeighting):
    """CAGrad: the best worst-case direction near the mean gradient.

    The direction maximises the smallest improvement over the tasks,
    `min_i g_i . d`, within the ball `||d - g_0|| <= c ||g_0||` around the
    mean gradient `g_0`. By duality `d = g_0 + (c ||g_0|| / ||g_w||) g_w`,
    where `g_w = sum_i w_i g_i` and `w` minimises
    `g_w . g_0 + c ||g_0|| ||g_w||` over the probability simplex. The official
    code solves that with SciPy's SLSQP; here it is solved exactly by
    enumerating the simplex faces (`worst_case_weights`, at most
    `min_norm.MAX_TASKS` tasks), on the trace-normalised Gram matrix with the
    ridge of `min_norm`. The direction is then divided by `1 + c^2`
    (`rescale=1`), by `1 + c` (`rescale=2`) or left as is (`rescale=0`).
    With `c = 0` the direction is the mean gradient; as `c` grows it turns
    towards the MGDA direction. The weights are `(1/T + (c ||g_0|| / ||g_w||) w_i)`
    over the same rescaling.

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
        if c < 0:
            raise ValueError(f"`c` must be non-negative; received {c}.")
        if rescale not in RESCALES:
            raise ValueError(
                f"`rescale` must be one of {RESCALES}; received {rescale!r}."
            )
        self.c = float(c)
        self.rescale = int(rescale)

    def build(self, task_names):
        min_norm.check_num_tasks(len(task_names), type(self).__name__)
        super().build(task_names)

    def aggregate(self, jacobian, losses, training=True, present=None):
        raw_gram = ops.matmul(jacobian, ops.transpose(jacobian))
        gram = min_norm.regularized_gram(raw_gram)
        present = presence(present, losses)
        mean_weights = present / ops.sum(present)
        mean_products = ops.matmul(gram, mean_weights)
        radius = self.c * ops.sqrt(ops.sum(mean_weights * mean_products))
        conflict_weights = worst_case_weights(gram, mean_products, radius, present)
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
        return combination(weights, jacobian, raw_gram)

    def get_config(self):
        return {**super().get_config(), "c": self.c, "rescale": self.rescale}
