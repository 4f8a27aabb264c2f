"""The interface of loss-level weighting methods."""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="keras_dwo")
class LossWeighting(keras.layers.Layer):
    """Base class of loss-level methods: per-task losses in, one objective out.

    A loss-level method needs only the values of the task losses, so the model
    takes one backward pass through the objective it returns. The method is a
    Keras layer: its state lives in Keras variables, which the model tracks, so
    it trains, saves, restores and distributes like any other weight.

    Subclasses implement `call(losses, training)`, which returns the objective
    (a scalar) and the effective weights: the derivative of the objective with
    respect to each task loss, as a `(T,)` tensor that is reported in the logs
    as `<task>_weight`. Methods that learn from how the losses changed over a
    step set `updates_after_step = True` and implement `update`.

    Args:
        **kwargs: Passed to `keras.layers.Layer`. The layer computes in
            float32 unless a `dtype` is given, so mixed precision does not
            round the weights.
    """

    updates_after_step = False

    def __init__(self, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.task_names = None

    def build(self, task_names):
        """Creates the method's state for the given tasks.

        Args:
            task_names: Sequence of task names, in output order.
        """
        self.task_names = tuple(task_names)

    def get_build_config(self):
        # The model that owns the method builds it for its tasks.
        return None

    @property
    def num_tasks(self):
        return len(self.task_names)

    def call(self, losses, training=False):
        """Returns `(objective, weights)` for a `(T,)` vector of task losses."""
        raise NotImplementedError(
            f"{type(self).__name__} must implement `call(losses, training)`."
        )

    def update(self, losses_before, losses_after):
        """Updates the state from the task losses before and after a step."""
        del losses_before, losses_after


def linear_objective(weights, losses):
    """Objective `sum_i w_i L_i` for weights that receive no gradient."""
    weights = ops.stop_gradient(weights)
    return ops.sum(weights * losses), weights
