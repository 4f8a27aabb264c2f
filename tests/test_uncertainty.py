"""Uncertainty weighting learns the noise variance of each task."""

import keras
import numpy as np

import keras_dwo

from conftest import to_numpy


def noisy_regression(samples=2048, noise_std=(0.1, 1.0), seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(samples, 4)).astype("float32")
    signal = x @ rng.normal(size=(4, 1))
    targets = {
        f"task{i}": (signal + std * rng.normal(size=(samples, 1))).astype("float32")
        for i, std in enumerate(noise_std)
    }
    return x, targets


def test_log_variances_approach_the_noise_variances():
    x, y = noisy_regression()
    inputs = keras.Input(shape=(4,))
    trunk = keras.layers.Dense(16, name="trunk")(inputs)
    outputs = {name: keras.layers.Dense(1, name=name)(trunk) for name in y}
    model = keras_dwo.DynamicWeightedModel(inputs, outputs, weighting="uncertainty")
    model.compile(
        optimizer=keras.optimizers.Adam(0.02), loss={name: "mse" for name in y}
    )
    history = model.fit(x, y, epochs=30, batch_size=128, verbose=0)
    log_variances = to_numpy(model.weighting.uncertainty.log_variances)
    np.testing.assert_allclose(log_variances, np.log([0.01, 1.0]), atol=0.5)
    # The log holds the weight used in the last step, one update before the end.
    np.testing.assert_allclose(
        history.history["task0_weight"][-1], np.exp(-log_variances[0]), rtol=0.01
    )
    assert history.history["loss"][-1] < 0


def test_layer_standalone_and_config_round_trip():
    layer = keras_dwo.layers.UncertaintyWeighting(regression=[True, False])
    value = layer(keras.ops.convert_to_tensor([2.0, 3.0]))
    assert float(to_numpy(value)) == 0.5 * 2.0 + 3.0
    assert layer.compute_output_shape((2,)) == ()
    clone = keras_dwo.layers.UncertaintyWeighting.from_config(layer.get_config())
    assert clone.regression == [True, False] and clone.num_tasks == 2
