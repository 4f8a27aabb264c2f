"""Mixed precision: float16 compute, float32 weighting, loss scaling."""

import keras
import numpy as np
import pytest

from conftest import TWO_TASK_LOSSES
from conftest import to_numpy
from conftest import two_task_data
from conftest import two_task_model


def test_mixed_float16_trains_with_loss_scaling():
    keras.config.set_dtype_policy("mixed_float16")
    model = two_task_model("uncertainty")
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss=TWO_TASK_LOSSES)
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert model.get_layer("trunk").compute_dtype == "float16"
    log_variances = model.weighting.uncertainty.log_variances
    assert log_variances.dtype == "float32"
    x, y = two_task_data(256)
    history = model.fit(x, y, epochs=8, batch_size=32, verbose=0).history
    assert np.all(np.isfinite(history["loss"]))
    assert history["value_loss"][-1] < 0.5 * history["value_loss"][0]
    assert history["label_loss"][-1] < history["label_loss"][0]
    assert np.all(np.isfinite(to_numpy(log_variances)))
    assert np.all(np.abs(to_numpy(log_variances)) > 1e-3)


@pytest.mark.parametrize("weighting", ["upgrad", "gradnorm"])
def test_mixed_float16_with_per_task_gradients(weighting):
    keras.config.set_dtype_policy("mixed_float16")
    model = two_task_model(weighting)
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss=TWO_TASK_LOSSES)
    x, y = two_task_data(256)
    history = model.fit(x, y, epochs=8, batch_size=32, verbose=0).history
    for key in ("loss", "label_weight", "value_weight"):
        assert np.all(np.isfinite(history[key]))
    assert history["value_loss"][-1] < 0.5 * history["value_loss"][0]
    assert history["label_loss"][-1] < history["label_loss"][0]
    assert all(variable.dtype == "float32" for variable in model.weighting.weights)
