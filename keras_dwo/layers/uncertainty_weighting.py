"""Homoscedastic uncertainty weighting as a layer of learnable log-variances."""

import keras
from keras import ops

from keras_dwo.arguments import checked_number

# The largest |s_i| of learned log-scales. A loss that stays at 0 pulls its
# s_i by the learning rate at every step, without end, until exp overflows
# and the objective is inf * 0. Within the bound the weights exp(-s_i) lie
# between 2e-9 and 5e8: the optimum s_i = log(L_i) of losses from 2e-9 to
# 5e8 is reachable, and exp(-s_i) L_i is finite for any loss below 7e29.
MAX_ABS_LOG_VARIANCE = 20.0


def checked_initial_log_variance(value):
    """Returns `value` as a float within the bounds of the log-variances."""
    return checked_number(
        "initial_log_variance",
        value,
        low=-MAX_ABS_LOG_VARIANCE,
        high=MAX_ABS_LOG_VARIANCE,
    )


@keras.saving.register_keras_serializable(package="keras_dwo")
class Bounded(keras.constraints.Constraint):
    """Clips every entry of a variable into `[min_value, max_value]`.

    Keras optimizers apply a variable's constraint after each update.

    Args:
        min_value: Lower bound.
        max_value: Upper bound.
    """

    def __init__(self, min_value, max_value):
        self.min_value = float(min_value)
        self.max_value = float(max_value)

    def __call__(self, w):
        return ops.clip(w, self.min_value, self.max_value)

    def differentiable_clip(self, x):
        """Clips `x`, with a gradient of 1 inside the bounds and at them.

        `ops.clip`'s gradient is 0.5 at a bound on JAX, where a variable
        that the constraint clipped sits; outside the bounds it is 0.
        """
        x = ops.convert_to_tensor(x)
        return ops.where(
            x < self.min_value,
            self.min_value,
            ops.where(x > self.max_value, self.max_value, x),
        )

    def get_config(self):
        return {"min_value": self.min_value, "max_value": self.max_value}


@keras.saving.register_keras_serializable(package="keras_dwo")
class UncertaintyWeighting(keras.layers.Layer):
    """Combines task losses with learnable log-variances (Kendall et al. 2018).

    The layer holds one trainable log-variance `s_i = log(sigma_i^2)` per task
    and maps a `(T,)` vector of task losses to the scalar

        sum_i exp(-s_i) * L_i + s_i.

    At the optimum `s_i = log(L_i)`, so a task whose loss is large (a noisy
    task) is weighted down. With `regression` given, each task's term follows
    the paper exactly: `0.5 * exp(-s_i) * L_i + 0.5 * s_i` for a regression
    task (a Gaussian likelihood) and `exp(-s_i) * L_i + 0.5 * s_i` for a
    classification task (a scaled softmax); the optimum is `s_i = log(L_i)` in
    the first case and `log(2 L_i)` in the second.

    The objective is negative once a loss falls below 1 (`s_i < 0`):
    callbacks that watch `loss`, such as `EarlyStopping` and
    `ReduceLROnPlateau`, should watch a task loss or a metric instead.

    A loss that is 0 has no optimum: its `s_i` falls by the learning rate at
    every step until `exp(-s_i)` overflows. The log-variances are therefore
    bounded to `[-MAX_ABS_LOG_VARIANCE, MAX_ABS_LOG_VARIANCE]` (20): the
    variable's constraint, which Keras optimizers apply after each update,
    clips them, and the objective uses the clipped values, so it and the
    precisions stay finite whatever value the variable holds.

    Args:
        num_tasks: Number of tasks T; inferred from the input when omitted.
        regression: Optional sequence of T booleans, True for a regression
            task, to use the paper's per-likelihood factors.
        initial_log_variance: Initial value of every `s_i`, within the
            bounds.
        **kwargs: Passed to `keras.layers.Layer`.

    Example:

    ```python
    weighting = keras_dwo.layers.UncertaintyWeighting()
    total = weighting(keras.ops.stack([loss_a, loss_b]))
    ```

    References:
        - Kendall, Gal and Cipolla, "Multi-Task Learning Using Uncertainty to
          Weigh Losses for Scene Geometry and Semantics", CVPR 2018.
    """

    def __init__(
        self, num_tasks=None, regression=None, initial_log_variance=0.0, **kwargs
    ):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.num_tasks = num_tasks
        self.regression = None if regression is None else [bool(r) for r in regression]
        self.initial_log_variance = checked_initial_log_variance(initial_log_variance)
        self.log_variance_bounds = Bounded(-MAX_ABS_LOG_VARIANCE, MAX_ABS_LOG_VARIANCE)
        if num_tasks is not None:
            self.build((num_tasks,))

    def build(self, input_shape):
        num_tasks = input_shape[-1]
        if self.regression is not None and len(self.regression) != num_tasks:
            raise ValueError(
                f"`regression` has {len(self.regression)} entries for "
                f"{num_tasks} tasks."
            )
        self.num_tasks = num_tasks
        self.log_variances = self.add_weight(
            shape=(num_tasks,),
            initializer=keras.initializers.Constant(self.initial_log_variance),
            constraint=self.log_variance_bounds,
            name="log_variances",
        )

    def loss_factors(self):
        """Returns the factors `(a, b)` of the terms `a exp(-s) L + b s`."""
        if self.regression is None:
            return 1.0, 1.0
        regression = ops.convert_to_tensor(self.regression, dtype="float32")
        return 1.0 - 0.5 * regression, 0.5

    def bounded_log_variances(self):
        """Returns the log-variances `s_i`, clipped into their bounds."""
        return self.log_variance_bounds.differentiable_clip(self.log_variances)

    def precisions(self, log_variances=None):
        """Returns the effective weights `a_i exp(-s_i)` of the task losses.

        Args:
            log_variances: The clipped log-variances, where already at hand.
        """
        if log_variances is None:
            log_variances = self.bounded_log_variances()
        precisions = ops.exp(-log_variances)
        if self.regression is None:
            return precisions
        scale, _ = self.loss_factors()
        return scale * precisions

    def objective_and_precisions(self, losses, present=None):
        """Returns the combined loss and the precisions it weighs losses by.

        Args:
            losses: `(T,)` task losses.
            present: Optional `(T,)` 0/1 mask; a task marked 0 has no label in
                the batch, and its log-variance gets no gradient.
        """
        log_variances = self.bounded_log_variances()
        precisions = self.precisions(log_variances)
        if self.regression is not None:
            _, log_variance_factor = self.loss_factors()
            log_variances = log_variance_factor * log_variances
        terms = precisions * losses + log_variances
        if present is not None:
            terms = ops.cast(present, terms.dtype) * terms
        return ops.sum(terms), precisions

    def call(self, losses):
        return self.objective_and_precisions(losses)[0]

    def compute_output_shape(self, input_shape):
        return ()

    def get_config(self):
        return {
            **super().get_config(),
            "num_tasks": self.num_tasks,
            "regression": self.regression,
            "initial_log_variance": self.initial_log_variance,
        }
