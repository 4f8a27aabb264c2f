"""Fair resource allocation between the tasks, FairGrad (Ban and Ji 2024)."""

import keras
from keras import ops

from keras_dwo.arguments import checked_number
from keras_dwo.weighting.base import GradientWeighting
from keras_dwo.weighting.base import presence
from keras_dwo.weighting.gram import finite_gram

# Relative to each task's own squared gradient norm, as for UPGrad: gradients
# that cancel out have no solution without it.
RIDGE = 1e-4
# Below this fraction of the mean squared norm a gradient counts as zero.
ZERO_GRADIENT = 1e-12


def fair_weights(gram, alpha, iterations):
    """Returns `w > 0` with `(G w)_i = w_i^(-1/alpha)` for every task.

    With `G = D^(1/2) C D^(1/2)` (`D = diag(G)`, `C` of unit diagonal) and
    `w = D^(-1/2) v`, the equations read `(C v)_i = c_i v_i^(-1/alpha)`,
    `c_i = D_ii^((1/alpha - 1) / 2)`: the stationarity conditions of the
    strictly convex `f(v) = v^T C v / 2 - sum_i c_i u(v_i)`, with
    `u(v) = log(v)` for `alpha = 1` and `v^(1 - 1/alpha) / (1 - 1/alpha)`
    otherwise. Newton's method solves them from the solution for orthogonal
    gradients (`v_i = c_i^(alpha / (1 + alpha))`), each step shortened
    until `v` stays positive and the squared residual decreases enough
    (Armijo's rule on the steps `1, 1/2, ..., 1/2^15`, all evaluated at
    once; the Newton step descends the residual). Solving on the
    unit-diagonal `C` keeps the equations well conditioned for gradients
    whose norms differ by orders of magnitude; `G` is first divided by its
    mean diagonal entry `s`, which scales the solution by
    `s^(-alpha / (1 + alpha))`.

    Args:
        gram: `(T, T)` positive definite matrix `G`.
        alpha: The fairness exponent, positive.
        iterations: Number of Newton steps.

    Returns:
        The `(T,)` weights `w`.
    """
    num_tasks = ops.shape(gram)[0]
    scale = ops.trace(gram) / num_tasks
    squared_norms = ops.diagonal(gram) / scale
    norms = ops.sqrt(squared_norms)
    correlations = gram / scale / (norms[:, None] * norms[None, :])
    factors = ops.power(squared_norms, 0.5 * (1.0 / alpha - 1.0))

    def residuals(v):
        """The squared residual at each row of `v`; infinite if not positive."""
        safe = ops.where(v > 0, v, 1.0)
        products = ops.matmul(safe, correlations)
        residual = products - factors * ops.power(safe, -1.0 / alpha)
        value = ops.sum(ops.square(residual), axis=-1)
        return ops.where(ops.all(v > 0, axis=-1), value, float("inf"))

    power = alpha / (1.0 + alpha)
    # The solution for orthogonal gradients, `C = I`.
    start = ops.power(factors, power)
    steps = ops.power(0.5, ops.arange(16, dtype=gram.dtype))

    def newton_step(_, v):
        inverse_powers = factors * ops.power(v, -1.0 / alpha)
        gradient = ops.matmul(correlations, v) - inverse_powers
        hessian = correlations + ops.diag(inverse_powers / (alpha * v))
        delta = ops.solve(hessian, gradient[:, None])[:, 0]
        candidates = v[None, :] - steps[:, None] * delta[None, :]
        accepted = residuals(candidates) <= (1.0 - 1e-4 * steps) * residuals(v)
        # The steps halve: the first accepted one is the largest accepted
        # (indexing with the found position breaks a torch.compile graph).
        step = ops.amax(ops.where(accepted, steps, 0.0))
        return v - step * delta

    v = ops.fori_loop(0, iterations, newton_step, start)
    return v / norms * ops.power(scale, -power)


@keras.saving.register_keras_serializable(package="keras_dwo")
class FairGrad(GradientWeighting):
    """FairGrad: the task gradients weighted for alpha-fair improvements.

    The direction `d = sum_i w_i g_i` gives every task the improvement
    `g_i . d = (G w)_i = w_i^(-1/alpha)`: it maximises the sum of the
    alpha-fair utilities of the improvements, which for `alpha = 1` is the
    Nash bargaining solution (Nash-MTL without its normalisation), as
    `alpha` grows tends to the max-min fair one that favours the task that
    improves least, and near 0 to the largest total improvement. The paper
    and LibMTL solve the equations with SciPy's `least_squares`; here damped
    Newton on an equivalent strictly convex problem (`fair_weights`) runs
    inside the compiled step.

    Measured on random Jacobians of 2 to 8 tasks, with alpha from 0.5 to 5,
    50 steps (the default) bring every equation's relative residual
    `|(G w)_i / w_i^(-1/alpha) - 1|` below `2e-5` where the gradient norms
    lie within three decades, and below `1e-2` within six (float32's limit
    for the tasks with the smallest gradients); there SciPy's
    `least_squares` from the uniform start, as LibMTL calls it, leaves
    residuals of the order of 1 in some cases.

    The Gram matrix gets a ridge of `1e-4` times each task's squared
    gradient norm, so that gradients that cancel out, for which no solution
    exists, still get a finite one. A task whose gradient is zero, or which
    has no label in the batch, is left out of the equations and gets weight
    0. As in the paper's code, the task-specific (head) variables get each
    task's loss gradient times its weight (training minimises
    `sum_i w_i L_i`).

    Args:
        alpha: The fairness exponent, positive (default 1.0, LibMTL's).
        iterations: Number of Newton steps (default 50; see above).
        **kwargs: Passed to `GradientWeighting`.

    References:
        - Ban and Ji, "Fair Resource Allocation in Multi-Task Learning",
          ICML 2024.
    """

    weights_heads = True

    def __init__(self, alpha=1.0, iterations=50, **kwargs):
        super().__init__(**kwargs)
        if int(iterations) < 0:
            raise ValueError(
                f"`iterations` must be non-negative; received {iterations}."
            )
        self.alpha = checked_number("alpha", alpha, low=0, low_open=True)
        self.iterations = int(iterations)

    def gram_weights(self, gram, losses, training=True, present=None):
        gram = finite_gram(gram)
        squared_norms = ops.diagonal(gram)
        mean_squared_norm = ops.mean(squared_norms)
        kept = ops.logical_and(
            presence(present, losses) > 0,
            squared_norms > ZERO_GRADIENT * mean_squared_norm,
        )
        pairs = ops.logical_and(kept[:, None], kept[None, :])
        identity = ops.eye(self.num_tasks, dtype=gram.dtype)
        # A task left out is decoupled from the others, with a squared norm
        # of the order of theirs, so that it does not change their scale.
        count = ops.sum(ops.cast(kept, gram.dtype))
        kept_scale = ops.sum(ops.where(kept, squared_norms, 0.0)) / ops.maximum(
            count, 1.0
        )
        kept_scale = ops.where(kept_scale > 0, kept_scale, 1.0)
        gram = ops.where(pairs, gram + RIDGE * identity * gram, kept_scale * identity)
        weights = fair_weights(gram, self.alpha, self.iterations)
        return ops.where(kept, weights, 0.0)

    def get_config(self):
        return {
            **super().get_config(),
            "alpha": self.alpha,
            "iterations": self.iterations,
        }
