"""Dynamic weight average, DWA (Liu, Johns and Davison 2019)."""

import keras
import numpy as np

from keras_dwo.arguments import checked_number
from keras_dwo.task_weights import validated_task_weights


@keras.saving.register_keras_serializable(package="keras_dwo")
class DynamicWeightAverage(keras.callbacks.Callback):
    """Sets `task_weights` each epoch from how fast each task loss falls.

    Before epoch t, with `L_i(t-1)` and `L_i(t-2)` the mean training losses of
    task i in the two previous epochs (the logged `<task>_loss`):

        r_i = L_i(t-1) / L_i(t-2),   w_i = T exp(r_i / tau) / sum_j exp(r_j / tau).

    The weights are 1 until two epochs have been recorded, and always sum to
    T. A task whose loss falls more slowly gets more weight. The two epochs'
    losses are kept in `model.task_loss_history`, a model variable, so a model
    saved and loaded resumes with the same weights. An epoch whose logged task
    losses are not all finite and positive is not recorded, so the weights stay
    those computed from the last good epochs.

    Args:
        temperature: Softmax temperature `tau` (paper: 2); larger values make
            the weights more equal.

    Example:

    ```python
    model = keras_dwo.DynamicWeightedModel(inputs, outputs)  # equal weighting
    model.compile(optimizer="adam", loss={"a": "mse", "b": "mse"})
    model.fit(x, y, epochs=20,
              callbacks=[keras_dwo.callbacks.DynamicWeightAverage()])
    ```

    References:
        - Liu, Johns and Davison, "End-to-End Multi-Task Learning with
          Attention", CVPR 2019.
    """

    def __init__(self, temperature=2.0):
        super().__init__()
        self.temperature = checked_number(
            "temperature", temperature, low=0, low_open=True
        )

    def dwa_weights(self, history):
        """Returns the DWA weights for a `(2, T)` array of epoch losses."""
        history = np.asarray(history, dtype="float64")
        num_tasks = history.shape[1]
        if not np.all(history > 0):
            return np.ones(num_tasks)
        logits = history[1] / history[0] / self.temperature
        exp = np.exp(logits - logits.max())
        return num_tasks * exp / exp.sum()

    def on_epoch_begin(self, epoch, logs=None):
        model = self.model
        history = keras.ops.convert_to_numpy(model.task_loss_history)
        weights = validated_task_weights(self.dwa_weights(history), model.task_names)
        model.task_weights.assign(np.asarray(weights, dtype="float32"))

    def on_epoch_end(self, epoch, logs=None):
        model = self.model
        losses = np.array(
            [
                float((logs or {}).get(f"{name}_loss", np.nan))
                for name in model.task_names
            ]
        )
        if not np.all(np.isfinite(losses) & (losses > 0)):
            return
        history = keras.ops.convert_to_numpy(model.task_loss_history)
        model.task_loss_history.assign(np.stack([history[1], losses]).astype("float32"))

    def get_config(self):
        return {"temperature": self.temperature}
