"""Progress-based task weights, like `keras.callbacks.LearningRateScheduler`."""

import keras
import numpy as np

from keras_dwo.task_weights import validated_task_weights


class LossWeightScheduler(keras.callbacks.Callback):
    """Sets `task_weights` at the start of every epoch from a schedule.

    Args:
        schedule: A function `schedule(epoch, weights)` of the epoch index
            (from 0) and the current weights (a NumPy array in task order)
            that returns the new weights: a sequence in task order or a dict
            keyed by task name (tasks left out keep their weight). Weights
            must be finite and non-negative; otherwise the callback raises a
            `ValueError` that names the tasks.
        verbose: 1 prints the weights each epoch.

    Example:

    ```python
    def shift_to_classification(epoch, weights):
        progress = min(epoch / 20, 1.0)
        return {"box": 1.0 - 0.9 * progress, "label": 0.1 + 0.9 * progress}

    model.fit(x, y, epochs=30, callbacks=[
        keras_dwo.callbacks.LossWeightScheduler(shift_to_classification)])
    ```
    """

    def __init__(self, schedule, verbose=0):
        super().__init__()
        self.schedule = schedule
        self.verbose = verbose

    def on_epoch_begin(self, epoch, logs=None):
        model = self.model
        current = keras.ops.convert_to_numpy(model.task_weights)
        proposed = self.schedule(epoch, current.copy())
        if isinstance(proposed, dict):
            unknown = sorted(set(proposed) - set(model.task_names))
            if unknown:
                raise ValueError(
                    f"The schedule returned weights for unknown task(s) {unknown}; "
                    f"the tasks are {model.task_names}."
                )
            proposed = [
                proposed.get(name, weight)
                for name, weight in zip(model.task_names, current.tolist())
            ]
        try:
            weights = validated_task_weights(proposed, model.task_names)
        except ValueError as error:
            raise ValueError(
                f"The schedule returned invalid weights at epoch {epoch}: {error}"
            ) from None
        model.task_weights.assign(np.asarray(weights, dtype="float32"))
        if self.verbose:
            shown = ", ".join(
                f"{name}={w:.4g}" for name, w in zip(model.task_names, weights)
            )
            print(f"\nEpoch {epoch + 1}: LossWeightScheduler setting weights {shown}.")
