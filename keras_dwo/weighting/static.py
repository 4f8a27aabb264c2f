"""Fixed task weights: equal weighting and static weights."""

import keras
from keras import ops

from keras_dwo.weighting.base import LossWeighting
from keras_dwo.weighting.base import linear_objective


@keras.saving.register_keras_serializable(package="keras_dwo")
class Static(LossWeighting):
    """Fixed weights: the objective is `sum_i w_i L_i`.

    With no `weights`, every task weighs 1 (the identifier `"equal"`). The
    model multiplies the task losses by `model.task_weights` before any method
    sees them, so the weights given to `compile(loss_weights=...)`, and those
    that callbacks such as `DynamicWeightAverage` set, apply on top.

    Args:
        weights: Optional sequence of T non-negative floats, in task order.
        **kwargs: Passed to `LossWeighting`.

    Example:

    ```python
    model = keras_dwo.DynamicWeightedModel(
        inputs, outputs, weighting=keras_dwo.weighting.Static([1.0, 0.1]))
    ```
    """

    def __init__(self, weights=None, **kwargs):
        super().__init__(**kwargs)
        self.fixed_weights = None if weights is None else [float(w) for w in weights]

    def build(self, task_names):
        super().build(task_names)
        if self.fixed_weights is not None and len(self.fixed_weights) != len(
            task_names
        ):
            raise ValueError(
                f"Static weighting got {len(self.fixed_weights)} weights for "
                f"{len(task_names)} tasks {tuple(task_names)}."
            )

    def call(self, losses, training=False, present=None):
        # An absent task's loss is 0 and has no gradient: the sum ignores it.
        del present
        if self.fixed_weights is None:
            return ops.sum(losses), ops.ones_like(losses)
        weights = ops.convert_to_tensor(self.fixed_weights, dtype=losses.dtype)
        return linear_objective(weights, losses)

    def get_config(self):
        return {**super().get_config(), "weights": self.fixed_weights}
