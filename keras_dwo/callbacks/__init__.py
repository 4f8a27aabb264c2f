"""Callbacks that set `model.task_weights` during training."""

from keras_dwo.callbacks.dynamic_weight_average import DynamicWeightAverage
from keras_dwo.callbacks.loss_weight_scheduler import LossWeightScheduler

__all__ = ["DynamicWeightAverage", "LossWeightScheduler"]
