"""Fixed task weights: equal weighting and static weights."""

import keras
from keras import ops

from keras_dwo import tasks
from keras_dwo.arguments import checked_number
from keras_dwo.task_weights import validated_task_weights
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
        weights: Optional T finite, non-negative floats: a sequence in task
            order, or a dict keyed by task name.
        **kwargs: Passed to `LossWeighting`.

    Example:

    ```python
    model = keras_dwo.DynamicWeightedModel(
        inputs, outputs, weighting=keras_dwo.weighting.Static([1.0, 0.1]))
    ```
    """

    def __init__(self, weights=None, **kwargs):
        super().__init__(**kwargs)
        self.fixed_weights = None
        if weights is not None:
            by_task = isinstance(weights, dict)
            entries = weights.items() if by_task else enumerate(weights)
            checked = {
                str(key) if by_task else key: checked_number(
                    f"weights[{key!r}]", weight, low=0
                )
                for key, weight in entries
            }
            self.fixed_weights = checked if by_task else list(checked.values())
        self._weights_in_task_order = None

    def build(self, task_names):
        super().build(task_names)
        if self.fixed_weights is not None:
            self._weights_in_task_order = validated_task_weights(
                tasks.by_name(self.fixed_weights, task_names, "weight", kind="task"),
                task_names,
            )

    def call(self, losses, training=False, present=None):
        # An absent task's loss is 0 and has no gradient: the sum ignores it.
        del present
        if self.fixed_weights is None:
            return ops.sum(losses), ops.ones_like(losses)
        weights = ops.convert_to_tensor(self._weights_in_task_order, dtype=losses.dtype)
        return linear_objective(weights, losses)

    def get_config(self):
        return {**super().get_config(), "weights": self.fixed_weights}
