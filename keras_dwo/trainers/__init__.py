"""The training steps: the only backend-specific code of keras-dwo.

Keras picks its own trainer for the backend at import time; so does this
package. `Trainer` is a mixin that `DynamicWeightedModel` puts before
`keras.Model`, replacing `train_step` and `test_step`; `value_and_jacobian`
and `run_if` serve `keras_dwo.TaskBalancer` in custom training steps.
"""

import keras

_BACKEND = keras.backend.backend()

if _BACKEND == "tensorflow":
    from keras_dwo.trainers.tensorflow import TensorFlowTrainer as Trainer
    from keras_dwo.trainers.tensorflow import run_if
    from keras_dwo.trainers.tensorflow import value_and_jacobian
elif _BACKEND == "jax":
    from keras_dwo.trainers.jax import JAXTrainer as Trainer
    from keras_dwo.trainers.jax import run_if
    from keras_dwo.trainers.jax import value_and_jacobian
elif _BACKEND == "torch":
    from keras_dwo.trainers.torch import TorchTrainer as Trainer
    from keras_dwo.trainers.torch import run_if
    from keras_dwo.trainers.torch import value_and_jacobian
else:
    raise ImportError(
        f"keras-dwo supports the tensorflow, jax and torch backends; the Keras "
        f"backend is {_BACKEND!r}."
    )

__all__ = ["Trainer", "run_if", "value_and_jacobian"]
