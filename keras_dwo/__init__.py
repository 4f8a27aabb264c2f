"""keras-dwo: dynamic loss weighting for multi-task Keras 3 models."""

from keras_dwo import callbacks
from keras_dwo import layers
from keras_dwo import tuning
from keras_dwo import weighting
from keras_dwo.comparison import compare
from keras_dwo.model import DynamicWeightedModel
from keras_dwo.plotting import plot_conflicts
from keras_dwo.plotting import plot_weights
from keras_dwo.task_balancer import TaskBalancer

__version__ = "0.1.0"

__all__ = [
    "DynamicWeightedModel",
    "TaskBalancer",
    "callbacks",
    "compare",
    "layers",
    "plot_conflicts",
    "plot_weights",
    "tuning",
    "weighting",
]
