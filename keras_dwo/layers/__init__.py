"""Layers of keras-dwo."""

from keras_dwo.layers.uncertainty_weighting import UncertaintyWeighting

__all__ = ["UncertaintyWeighting"]
