"""Projecting conflicting gradients, PCGrad (Yu et al. 2020)."""

import keras
from keras import ops

from keras_dwo.weighting.base import GradientWeighting
from keras_dwo.weighting.base import presence
from keras_dwo.weighting.random_state import RandomState


@keras.saving.register_keras_serializable(package="keras_dwo")
class PCGrad(RandomState, GradientWeighting):
    """PCGrad: removes the part of each task gradient that conflicts with another.

    For each task i, the other tasks j are visited in a random order; when the
    current (already projected) gradient of task i has a negative inner
    product with the original gradient `g_j`, it is projected onto the normal
    plane of `g_j`: `g_i <- g_i - (<g_i, g_j> / ||g_j||^2) g_j`. The direction
    is the sum of the projected gradients, as in the paper's Algorithm 1.

    Each projected gradient is a linear combination of the original ones, so
    the method works on the `(T, T)` Gram matrix of the Jacobian and keeps
    the coefficients: `weights` is their sum over the projected gradients,
    and `direction == weights @ jacobian` exactly (1 for every task when no
    pair conflicts). A task with a small gradient can get a large weight:
    removing the component along a short vector takes a large multiple of
    it. The random orders come from a `keras.random.SeedGenerator` saved
    with the model.

    Args:
        seed: Optional integer seed of the random orders.
        **kwargs: Passed to `GradientWeighting`.

    Example:

    ```python
    method = PCGrad(seed=0)
    direction = method.combine([[1.0, 0.0], [-1.0, 1.0]], [1.0, 1.0])
    # Each gradient loses its component along the other: [0.5, 1.5].
    ```

    References:
        - Yu, Kumar, Gupta, Levine, Hausman and Finn, "Gradient Surgery for
          Multi-Task Learning", NeurIPS 2020.
    """

    def __init__(self, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.seed = seed

    def gram_weights(self, gram, losses, training=True, present=None):
        # An absent task's zero row conflicts with none, so nothing is
        # projected on it; its coefficient is reported as 0.
        num_tasks = self.num_tasks
        squared_norms = ops.diagonal(gram)
        orders = self.other_tasks_in_random_order(training)
        identity = ops.eye(num_tasks)
        projected = []
        for i in range(num_tasks):
            coefficients = identity[i]
            for k in range(num_tasks - 1):
                other = orders[i, k]
                inner = ops.sum(coefficients * ops.matmul(gram, other))
                # A negative inner product implies a nonzero `g_j`; the floor
                # only keeps the untaken branch of `where` finite.
                scale = inner / ops.maximum(ops.sum(other * squared_norms), 1e-30)
                coefficients = coefficients - ops.where(inner < 0, scale, 0.0) * other
            projected.append(coefficients)
        weights = ops.sum(ops.stack(projected), axis=0)
        return presence(present, losses) * weights

    def get_config(self):
        return {**super().get_config(), "seed": self.seed}
