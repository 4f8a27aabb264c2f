"""Gradient Vaccine, GradVac (Wang et al. 2021)."""

import keras
from keras import ops

from keras_dwo.arguments import checked_number
from keras_dwo.weighting.base import GradientWeighting
from keras_dwo.weighting.base import presence
from keras_dwo.weighting.gram import combination
from keras_dwo.weighting.random_state import RandomState

# The correction divides by sqrt(1 - target^2); bounding the target keeps the
# added multiple of g_j finite when the gradients have always been parallel.
MAX_TARGET_COSINE = 0.9999


@keras.saving.register_keras_serializable(package="keras_dwo")
class GradVac(RandomState, GradientWeighting):
    """GradVac: pulls the similarity of each task pair up to an adaptive target.

    For each task i, the other tasks j are visited in a random order. The
    cosine similarity `phi_ij` between the current (already corrected)
    gradient of task i and the original `g_j` is compared with a target
    `phi_hat_ij`, an exponential moving average of the past similarities of
    the pair (state, starting at 0). When `phi_ij < phi_hat_ij`, task i's
    gradient receives the multiple of `g_j` that sets their cosine to exactly
    the target:

        g_i <- g_i + ||g_i|| (phi_hat sqrt(1 - phi^2) - phi sqrt(1 - phi_hat^2))
                     / (||g_j|| sqrt(1 - phi_hat^2)) g_j

    and in training, for every visited pair, `phi_hat_ij <- (1 - beta)
    phi_hat_ij + beta phi_ij`, as in the paper's Algorithm 1 (LibMTL moves
    only the targets of corrected pairs). The direction is the sum of the
    corrected gradients. Inside the correction, which is unbounded for a
    target of 1, targets are bounded by `MAX_TARGET_COSINE`.

    With `granularity="whole"` (the default, LibMTL's) the similarities are
    those of the whole Jacobian. Each corrected gradient is then a linear
    combination of the original ones, so the method works on the `(T, T)`
    Gram matrix and keeps the coefficients: `weights` is their sum and
    `direction == weights @ jacobian` exactly (as for `PCGrad`, a task with
    a small gradient can get a large weight). The targets are a
    non-trainable `(T, T)` variable (diagonal unused) and the random orders
    come from a `keras.random.SeedGenerator`, both saved with the model.

    With `granularity="layer"`, as in the paper's experiments, each shared
    layer (its kernel and bias) has its own targets, a `(layers, T, T)`
    variable made when the model plans its first step, and the correction
    is made layer by layer on that layer's columns of the Jacobian, with
    the same random orders; the direction is the layers' corrected sums
    side by side. It is not one combination of the task gradients: the
    logged weights are the mean over the layers of their coefficients.

    Args:
        beta: Rate of the moving average of the similarities (default 0.5,
            LibMTL's).
        granularity: `"whole"` (default) or `"layer"`.
        seed: Optional integer seed of the random orders.
        **kwargs: Passed to `GradientWeighting`.

    References:
        - Wang, Tsvetkov, Firat and Cao, "Gradient Vaccine: Investigating and
          Improving Multi-task Optimization in Massively Multilingual
          Models", ICLR 2021.
        - Lin and Zhang, "LibMTL: A Python Library for Multi-Task Learning",
          JMLR 2023 (default `beta`).
    """

    def __init__(self, beta=0.5, granularity="whole", seed=None, **kwargs):
        super().__init__(**kwargs)
        if granularity not in ("whole", "layer"):
            raise ValueError(
                f"`granularity` must be 'whole' or 'layer'; received {granularity!r}."
            )
        self.beta = checked_number("beta", beta, low=0, high=1)
        self.granularity = granularity
        self.column_state = granularity == "layer"
        self.seed = seed

    @property
    def weights_from_gram(self):
        return self.granularity == "whole"

    def build(self, task_names):
        super().build(task_names)
        num_tasks = len(task_names)
        self.target_cosines = self.add_weight(
            shape=(num_tasks, num_tasks),
            initializer="zeros",
            trainable=False,
            name="target_cosines",
        )

    def build_columns(self, group_sizes):
        super().build_columns(group_sizes)
        if self.granularity == "layer":
            self.layer_target_cosines = self.column_state_weight(
                "layer_target_cosines",
                (len(group_sizes), self.num_tasks, self.num_tasks),
                "shared layers",
            )

    def column_groups_of_state(self, shapes):
        # The layers' sizes are set again when the model plans its step.
        return [0] * shapes[0][0]

    def gram_weights(self, gram, losses, training=True, present=None):
        orders = self.other_tasks_in_random_order(training)
        weights, targets = self._vaccinated(
            gram, self.target_cosines, orders, presence(present, losses)
        )
        if training:
            self.target_cosines.assign(targets)
        return weights

    def aggregate(self, jacobian, losses, training=True, present=None):
        if self.granularity == "whole":
            return super().aggregate(jacobian, losses, training, present)
        present = presence(present, losses)
        orders = self.other_tasks_in_random_order(training)
        directions, weights, targets, start = [], [], [], 0
        for layer, size in enumerate(self.checked_column_groups(jacobian)):
            block = jacobian[:, start : start + size]
            start += size
            gram = ops.matmul(block, ops.transpose(block))
            layer_weights, layer_targets = self._vaccinated(
                gram, self.layer_target_cosines[layer], orders, present
            )
            directions.append(combination(layer_weights, block, gram)[0])
            weights.append(layer_weights)
            targets.append(layer_targets)
        if training:
            self.layer_target_cosines.assign(ops.stack(targets))
        return ops.concatenate(directions), ops.mean(ops.stack(weights), axis=0)

    def _vaccinated(self, gram, targets, orders, present):
        """Returns the summed coefficients of the corrected gradients and the
        new targets, for one Gram matrix and its `(T, T)` targets."""
        num_tasks = self.num_tasks
        norms = ops.sqrt(ops.maximum(ops.diagonal(gram), 0.0))
        identity = ops.eye(num_tasks)
        targets = ops.convert_to_tensor(targets)
        corrected, new_targets = [], []
        for i in range(num_tasks):
            coefficients = identity[i]
            # Inner products of the corrected g_i with every original gradient.
            inner_products = gram[i]
            row_targets = targets[i]
            for k in range(num_tasks - 1):
                other = orders[i, k]
                other_norm = ops.sum(other * norms)
                norm = ops.sqrt(
                    ops.maximum(ops.sum(coefficients * inner_products), 0.0)
                )
                cosine = ops.clip(
                    ops.divide_no_nan(
                        ops.sum(other * inner_products), norm * other_norm
                    ),
                    -1.0,
                    1.0,
                )
                target = ops.sum(other * row_targets)
                bounded = ops.clip(target, -MAX_TARGET_COSINE, MAX_TARGET_COSINE)
                sine = ops.sqrt(1.0 - ops.square(cosine))
                target_sine = ops.sqrt(1.0 - ops.square(bounded))
                scale = ops.divide_no_nan(
                    norm * (bounded * sine - cosine * target_sine),
                    other_norm * target_sine,
                )
                scale = ops.where(cosine < bounded, scale, 0.0)
                coefficients = coefficients + scale * other
                inner_products = inner_products + scale * ops.matmul(other, gram)
                # Only pairs of tasks present update their target.
                paired = present[i] * ops.sum(other * present)
                row_targets = row_targets + paired * other * self.beta * (
                    cosine - target
                )
            corrected.append(coefficients)
            new_targets.append(row_targets)
        return ops.sum(ops.stack(corrected), axis=0), ops.stack(new_targets)

    def get_config(self):
        return {
            **super().get_config(),
            "beta": self.beta,
            "granularity": self.granularity,
            "seed": self.seed,
        }
