"""Auto-Lambda: task weights learned by a one-step look-ahead on held-out data."""

import keras
import numpy as np
from keras import ops

from keras_dwo import trainers
from keras_dwo.arguments import checked_number

# The finite difference's step, relative to the validation gradient's norm
# (the authors' code).
FINITE_DIFFERENCE_SCALE = 0.01
ADAM_BETAS = (0.9, 0.999)
ADAM_EPSILON = 1e-8


class AutoLambda(keras.callbacks.Callback):
    """Learns `model.task_weights` so that a training step helps held-out data.

    Meta-learned weighting (Liu, Li, Kuang and Davison): the task weights
    `lambda` are those for which one step of training on `sum_i lambda_i
    L_i` lowers the validation loss of the primary tasks most. Every
    `every` training steps, on a training batch and a validation batch
    drawn from the data given:

    1. the look-ahead `theta' = theta - alpha grad sum_i lambda_i L_i(theta)`,
       one SGD step at the optimizer's current learning rate `alpha`;
    2. `d`, the gradient of the primary tasks' validation loss at `theta'`;
    3. the hypergradient `dL_val(theta') / dlambda_i = -alpha g_i . d`, with
       `g_i . d` taken, as in the paper, by a central finite difference of
       the training losses at `theta +- eps d`
       (`eps = 0.01 / ||d||`): two forward passes instead of T backward;
    4. one Adam step on `lambda` (learning rate 1e-4, the paper's), and
       `lambda` clipped at 0, since task weights cannot be negative.

    The weights are the model's `task_weights`, so they combine with any
    method (equal weights make it the paper's Auto-Lambda), are logged as
    `<task>_weight`, and save with the model; the Adam moments of `lambda`
    live in the callback and start again when training resumes.

    It runs between training steps, eagerly, on every backend: the update
    needs a validation batch and a second set of parameters, which Keras's
    compiled step does not have. Its cost per update: one forward and
    backward pass on the training batch, one on the validation batch and
    two forward passes on the training batch, with the layers in inference
    mode (no dropout noise in the finite difference).

    Args:
        x: Training inputs to draw batches from (arrays, or a dict or list
            of arrays).
        y: Their targets, as for `fit`.
        validation_data: `(x_val, y_val)` to draw validation batches from.
        batch_size: Samples per drawn batch (default 32).
        every: Update every this many training steps (default 1).
        primary_tasks: The tasks whose validation loss is lowered (default
            every task: the multi-task setting); the others are auxiliary.
        initial_weight: The task weights at the start of training (default
            0.1, the paper's); None keeps the model's (when resuming).
        learning_rate: Adam's learning rate for `lambda` (default 1e-4).
        seed: Seed of the drawn batches.

    Example:

    ```python
    auto_lambda = keras_dwo.callbacks.AutoLambda(
        x_train, y_train, validation_data=(x_val, y_val), primary_tasks=["depth"]
    )
    model.fit(x_train, y_train, epochs=20, callbacks=[auto_lambda])
    ```

    References:
        - Liu, Li, Kuang and Davison, "Auto-Lambda: Disentangling Dynamic
          Task Relationships", TMLR 2022.
    """

    def __init__(
        self,
        x,
        y,
        validation_data,
        batch_size=32,
        every=1,
        primary_tasks=None,
        initial_weight=0.1,
        learning_rate=1e-4,
        seed=None,
    ):
        super().__init__()
        if int(every) < 1:
            raise ValueError(f"`every` must be a positive integer; received {every}.")
        if int(batch_size) < 1:
            raise ValueError(
                f"`batch_size` must be a positive integer; received {batch_size}."
            )
        if initial_weight is not None:
            initial_weight = checked_number("initial_weight", initial_weight, low=0)
        if not isinstance(validation_data, (list, tuple)) or len(validation_data) != 2:
            raise ValueError("`validation_data` must be a pair `(x_val, y_val)`.")
        self.train = (x, y)
        self.validation = tuple(validation_data)
        self.batch_size = int(batch_size)
        self.every = int(every)
        self.primary_tasks = None if primary_tasks is None else list(primary_tasks)
        self.initial_weight = initial_weight
        self.learning_rate = checked_number(
            "learning_rate", learning_rate, low=0, low_open=True
        )
        self._rng = np.random.default_rng(seed)
        self._moments = None

    def on_train_begin(self, logs=None):
        model = self.model
        names = model.task_names
        primary = self.primary_tasks or list(names)
        unknown = sorted(set(primary) - set(names))
        if unknown:
            raise ValueError(
                f"`primary_tasks` names unknown task(s) {unknown}; the tasks are "
                f"{names}."
            )
        self._primary = np.array([name in primary for name in names], "float32")
        if self.initial_weight is not None:
            model.sync_variables()
            model.task_weights.assign(np.full(len(names), self.initial_weight))
        count = len(names)
        self._moments = (np.zeros(count), np.zeros(count), 0)

    def on_train_batch_end(self, batch, logs=None):
        if (batch + 1) % self.every == 0:
            self.update()

    def _batch(self, data):
        x, y = data
        size = len(keras.tree.flatten(x)[0])
        chosen = self._rng.choice(size, min(self.batch_size, size), replace=False)
        return keras.tree.map_structure(
            lambda values: np.asarray(values)[chosen], (x, y)
        )

    def _task_losses(self, x, y):
        return self.model.compute_task_losses(y, self.model(x, training=False))

    def hypergradient(self, train_batch, validation_batch):
        """Returns the `(T,)` derivative of the look-ahead's validation loss.

        With respect to the task weights, at the current variables (which it
        leaves as they were).
        """
        model = self.model
        model.sync_variables()
        learned = {id(v) for v in model.weighting.trainable_variables}
        variables = [v for v in model.trainable_variables if id(v) not in learned]
        weights = ops.convert_to_tensor(model.task_weights)
        primary = ops.convert_to_tensor(self._primary)
        alpha = float(ops.convert_to_numpy(model.optimizer.learning_rate))

        def train_objective():
            losses = self._task_losses(*train_batch)
            return ops.reshape(ops.sum(weights * losses), (1,)), losses

        def validation_objective():
            losses = self._task_losses(*validation_batch)
            return ops.reshape(ops.sum(primary * losses), (1,)), losses

        originals = [ops.copy(v.value) for v in variables]
        try:
            _, _, rows = trainers.value_and_jacobian(train_objective, variables)
            for variable, value, row in zip(variables, originals, rows):
                variable.assign(value - alpha * row[0])
            _, _, rows = trainers.value_and_jacobian(validation_objective, variables)
            direction = [row[0] for row in rows]
            norm = ops.sqrt(sum(ops.sum(ops.square(d)) for d in direction))
            step = FINITE_DIFFERENCE_SCALE / ops.maximum(norm, 1e-12)
            differences = []
            for sign in (1.0, -1.0):
                for variable, value, d in zip(variables, originals, direction):
                    variable.assign(value + sign * step * d)
                differences.append(
                    ops.convert_to_numpy(self._task_losses(*train_batch))
                )
        finally:
            for variable, value in zip(variables, originals):
                variable.assign(value)
        step = float(ops.convert_to_numpy(step))
        return -alpha * (differences[0] - differences[1]) / (2.0 * step)

    def update(self):
        """Takes one step on the task weights, on newly drawn batches."""
        gradient = self.hypergradient(
            self._batch(self.train), self._batch(self.validation)
        )
        if not np.all(np.isfinite(gradient)):
            return
        first, second, count = self._moments
        count += 1
        first = ADAM_BETAS[0] * first + (1.0 - ADAM_BETAS[0]) * gradient
        second = ADAM_BETAS[1] * second + (1.0 - ADAM_BETAS[1]) * gradient**2
        self._moments = (first, second, count)
        first_unbiased = first / (1.0 - ADAM_BETAS[0] ** count)
        second_unbiased = second / (1.0 - ADAM_BETAS[1] ** count)
        weights = ops.convert_to_numpy(self.model.task_weights)
        weights = weights - self.learning_rate * first_unbiased / (
            np.sqrt(second_unbiased) + ADAM_EPSILON
        )
        self.model.task_weights.assign(np.maximum(weights, 0.0).astype("float32"))
