"""The training steps: the only backend-specific code of keras-dwo.

Keras picks its own trainer for the backend at import time; so does this
package. `Trainer` is a mixin that `DynamicWeightedModel` puts before
`keras.Model`, replacing `train_step` and `test_step`.

These serve `keras_dwo.TaskBalancer`,
`DynamicWeightedModel.task_gradients` and the solvers of
`keras_dwo.weighting.min_norm`, one implementation per backend:

- `value_and_jacobian(function, variables)` runs `function`, which
  takes nothing and returns `(vector, aux)` (a `(T,)` tensor and anything
  else), and returns `(vector, aux, rows)`, where `rows[i]` is the
  `(T, ...)` Jacobian of the vector with respect to `variables[i]`. The
  variables that `function` assigns keep the values it assigned.
- `run_if(condition, function)` runs `function()` if the scalar boolean
  tensor `condition` is true.
- `runs_under_xla()`: whether the ops built now run in one XLA
  computation (JAX, TensorFlow with `jit_compile=True`), where a loop of
  small ops costs little, rather than op by op (torch, TensorFlow graphs
  without XLA).
- `values_are_finite(values)`: whether every float tensor in the list is
  finite, a scalar boolean tensor.
- `add_to_variables(variables, increments)`: adds each increment to its
  variable (`assign_add`; on torch one fused in-place update).
- `uniform(seed_generator, shape)`: float32 draws from U[0, 1) that
  advance the `keras.random.SeedGenerator`: Keras's own draws, except
  under `torch.compile`, where they are counter-based so that it traces
  them.
- `STATELESS_OPTIMIZERS`: whether Keras's optimizers of the backend update
  in a `keras.StatelessScope` (not on TensorFlow).
"""

import keras

_BACKEND = keras.backend.backend()

if _BACKEND == "tensorflow":
    from keras_dwo.trainers.tensorflow import STATELESS_OPTIMIZERS
    from keras_dwo.trainers.tensorflow import TensorFlowTrainer as Trainer
    from keras_dwo.trainers.tensorflow import run_if
    from keras_dwo.trainers.tensorflow import runs_under_xla
    from keras_dwo.trainers.tensorflow import value_and_jacobian
    from keras_dwo.trainers.tensorflow import values_are_finite
elif _BACKEND == "jax":
    from keras_dwo.trainers.jax import STATELESS_OPTIMIZERS
    from keras_dwo.trainers.jax import JAXTrainer as Trainer
    from keras_dwo.trainers.jax import run_if
    from keras_dwo.trainers.jax import runs_under_xla
    from keras_dwo.trainers.jax import value_and_jacobian
    from keras_dwo.trainers.jax import values_are_finite
elif _BACKEND == "torch":
    from keras_dwo.trainers.torch import STATELESS_OPTIMIZERS
    from keras_dwo.trainers.torch import TorchTrainer as Trainer
    from keras_dwo.trainers.torch import add_to_variables
    from keras_dwo.trainers.torch import run_if
    from keras_dwo.trainers.torch import runs_under_xla
    from keras_dwo.trainers.torch import uniform
    from keras_dwo.trainers.torch import value_and_jacobian
    from keras_dwo.trainers.torch import values_are_finite
else:
    raise ImportError(
        f"keras-dwo supports the tensorflow, jax and torch backends; the Keras "
        f"backend is {_BACKEND!r}."
    )

if _BACKEND != "torch":

    def add_to_variables(variables, increments):
        """Adds each increment (a tensor or a number) to its variable."""
        for variable, increment in zip(variables, increments):
            variable.assign_add(increment)

    def uniform(seed_generator, shape):
        """Float32 draws from U[0, 1) of `shape`; advances `seed_generator`."""
        return keras.random.uniform(shape, seed=seed_generator, dtype="float32")


__all__ = [
    "STATELESS_OPTIMIZERS",
    "add_to_variables",
    "Trainer",
    "run_if",
    "runs_under_xla",
    "uniform",
    "value_and_jacobian",
    "values_are_finite",
]
