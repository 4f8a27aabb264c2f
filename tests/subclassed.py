"""A subclassed DynamicWeightedModel that several test files train."""

import keras

import keras_dwo


@keras.saving.register_keras_serializable(package="keras_dwo_tests")
class TwoHeads(keras_dwo.DynamicWeightedModel):
    """A subclassed model: a trunk and two heads, outputs in a dict."""

    def __init__(self, units=16, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.trunk = keras.layers.Dense(units, activation="relu", name="trunk")
        self.label = keras.layers.Dense(3, activation="softmax", name="label")
        self.value = keras.layers.Dense(1, name="value")

    def call(self, inputs):
        hidden = self.trunk(inputs)
        return {"label": self.label(hidden), "value": self.value(hidden)}

    def get_config(self):
        return {
            **super().get_config(),
            "units": self.units,
            "weighting": keras.saving.serialize_keras_object(self.weighting),
        }
