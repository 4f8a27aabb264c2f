"""Uncertainty weighting (Kendall, Gal and Cipolla 2018)."""

import keras

from keras_dwo.layers.uncertainty_weighting import UncertaintyWeighting
from keras_dwo.layers.uncertainty_weighting import checked_initial_log_variance
from keras_dwo.weighting.base import LossWeighting


@keras.saving.register_keras_serializable(package="keras_dwo")
class Uncertainty(LossWeighting):
    """Learned homoscedastic uncertainty: `sum_i exp(-s_i) L_i + s_i`.

    The log-variances `s_i` are trainable variables of a
    `keras_dwo.layers.UncertaintyWeighting` layer (`self.uncertainty`), trained
    by the model's optimizer together with the network. The logged weight of a
    task is `exp(-s_i)` (times 0.5 for a regression task in the paper's form).

    The objective becomes negative once task losses drop below 1: monitor a
    task loss or a metric, not `loss`, in `EarlyStopping` or
    `ReduceLROnPlateau`.

    A task loss that stays at 0 (or a task weight of 0) drives its `s_i`
    down at every step; the log-variances are bounded to `[-20, 20]` (a
    constraint on the variable, which the optimizer applies after each
    update, and clipping in the objective), so the objective and the
    weights stay finite, at most `exp(20)`, about `5e8`.

    Args:
        regression_tasks: Optional names of the regression tasks. When given,
            each term takes the paper's factors (1/2 for regression, 1 for
            classification, and 1/2 on every `s_i`); when omitted, the common
            form `exp(-s_i) L_i + s_i` is used for every task.
        initial_log_variance: Initial value of every `s_i` (paper: 0).
        **kwargs: Passed to `LossWeighting`.

    Example:

    ```python
    model = keras_dwo.DynamicWeightedModel(
        inputs, outputs, weighting="uncertainty")
    model.weighting.uncertainty.log_variances  # learned s_i
    ```

    References:
        - Kendall, Gal and Cipolla, "Multi-Task Learning Using Uncertainty to
          Weigh Losses for Scene Geometry and Semantics", CVPR 2018.
    """

    def __init__(self, regression_tasks=None, initial_log_variance=0.0, **kwargs):
        super().__init__(**kwargs)
        if isinstance(regression_tasks, str):
            regression_tasks = [regression_tasks]
        self.regression_tasks = (
            None if regression_tasks is None else list(regression_tasks)
        )
        self.initial_log_variance = checked_initial_log_variance(initial_log_variance)

    def build(self, task_names):
        super().build(task_names)
        regression = None
        if self.regression_tasks is not None:
            unknown = sorted(set(self.regression_tasks) - set(task_names))
            if unknown:
                raise ValueError(
                    f"Unknown regression task(s) {unknown}; the tasks are "
                    f"{tuple(task_names)}."
                )
            regression = [name in self.regression_tasks for name in task_names]
        self.uncertainty = UncertaintyWeighting(
            num_tasks=len(task_names),
            regression=regression,
            initial_log_variance=self.initial_log_variance,
            name="uncertainty",
        )

    def call(self, losses, training=False, present=None):
        return self.uncertainty.objective_and_precisions(losses, present)

    def get_config(self):
        return {
            **super().get_config(),
            "regression_tasks": self.regression_tasks,
            "initial_log_variance": self.initial_log_variance,
        }
