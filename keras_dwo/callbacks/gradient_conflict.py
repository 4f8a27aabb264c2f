"""GradientConflict: do the tasks' gradients conflict while the model trains?"""

import itertools

import keras
import numpy as np


def conflict_statistics(gradients, task_names):
    """Returns the conflict logs of per-task gradients.

    Args:
        gradients: One `(T, ...)` array per shared variable.
        task_names: The T task names.

    Returns:
        A dict: `cosine_<a>_<b>` for each pair of tasks (the cosine
        similarity of their gradients; 0 where one is zero) and
        `<task>_gradient_ratio` (the gradient's norm over the mean of the
        tasks' norms).
    """
    num_tasks = len(task_names)
    jacobian = np.concatenate(
        [np.reshape(np.asarray(g, "float64"), (num_tasks, -1)) for g in gradients],
        axis=1,
    )
    gram = jacobian @ jacobian.T
    norms = np.sqrt(np.diag(gram))
    logs = {}
    for i, j in itertools.combinations(range(num_tasks), 2):
        denominator = norms[i] * norms[j]
        cosine = gram[i, j] / denominator if denominator > 0 else 0.0
        logs[f"cosine_{task_names[i]}_{task_names[j]}"] = float(cosine)
    mean_norm = norms.mean()
    for name, norm in zip(task_names, norms):
        logs[f"{name}_gradient_ratio"] = float(norm / mean_norm) if mean_norm else 0.0
    return logs


class GradientConflict(keras.callbacks.Callback):
    """Logs how the tasks' gradients of the shared variables agree.

    On a batch you give it, every `every` training steps and at the end of
    every epoch, it takes each weighted task loss's gradient with respect to
    the model's shared variables (`DynamicWeightedModel.task_gradients`, the
    backend code the training step uses) and adds to the epoch's logs, so
    to History, CSVLogger and TensorBoard when they come after it in the
    callback list:

    - `cosine_<a>_<b>`: the cosine similarity of tasks a's and b's
      gradients at the end of the epoch (negative: they conflict);
    - `<task>_gradient_ratio`: the norm of the task's gradient over the
      mean of the tasks' norms (far from 1: one task dominates);
    - `conflicting_fraction`: the fraction of the epoch's measurements in
      which some pair of tasks conflicted.

    It works with any method, equal weights included, where it is the
    first diagnosis to run: tasks that rarely conflict and have similar
    norms gain little from a gradient-level method.

    Each measurement costs one forward pass and T backward passes on the
    batch, outside the training step.

    Args:
        x: The inputs of the batch to measure on.
        y: Its targets.
        sample_weight: Optional sample weights.
        every: Measure every this many training steps too; None (default)
            measures at the end of each epoch only.

    Example:

    ```python
    conflict = keras_dwo.callbacks.GradientConflict(x[:256], y_first_256)
    history = model.fit(x, y, epochs=10, callbacks=[conflict])
    history.history["cosine_species_mass"]
    keras_dwo.plot_conflicts(history)
    ```
    """

    def __init__(self, x, y, sample_weight=None, every=None):
        super().__init__()
        if every is not None and int(every) < 1:
            raise ValueError(f"`every` must be a positive integer; received {every}.")
        self.x, self.y, self.sample_weight = x, y, sample_weight
        self.every = None if every is None else int(every)
        self._conflicts = []

    def measure(self):
        """Returns the conflict logs of the batch for the current variables."""
        _, gradients = self.model.task_gradients(self.x, self.y, self.sample_weight)
        gradients = [keras.ops.convert_to_numpy(g) for g in gradients]
        return conflict_statistics(gradients, self.model.task_names)

    def _record(self):
        logs = self.measure()
        cosines = [v for k, v in logs.items() if k.startswith("cosine_")]
        self._conflicts.append(min(cosines) < 0)
        return logs

    def on_epoch_begin(self, epoch, logs=None):
        self._conflicts = []

    def on_train_batch_end(self, batch, logs=None):
        if self.every is not None and (batch + 1) % self.every == 0:
            self._record()

    def on_epoch_end(self, epoch, logs=None):
        measured = self._record()
        if logs is not None:
            logs.update(measured)
            logs["conflicting_fraction"] = float(np.mean(self._conflicts))
