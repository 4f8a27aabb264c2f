"""Callbacks that set `model.task_weights` or watch the tasks during training."""

from keras_dwo.callbacks.auto_lambda import AutoLambda
from keras_dwo.callbacks.dynamic_weight_average import DynamicWeightAverage
from keras_dwo.callbacks.gradient_conflict import GradientConflict
from keras_dwo.callbacks.loss_weight_scheduler import LossWeightScheduler

__all__ = [
    "AutoLambda",
    "DynamicWeightAverage",
    "GradientConflict",
    "LossWeightScheduler",
]
