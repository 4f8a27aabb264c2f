"""fit on PyDataset, Python generators and tf.data with dict targets."""

import keras
import numpy as np
import pytest

from conftest import TWO_TASK_LOSSES
from conftest import two_task_data
from conftest import two_task_model
from conftest import variable_values

BATCH = 32
SAMPLES = 128


def batches(x, y, sample_weight=None):
    for start in range(0, len(x), BATCH):
        window = slice(start, start + BATCH)
        batch = (x[window], {task: target[window] for task, target in y.items()})
        if sample_weight is not None:
            batch += ({task: w[window] for task, w in sample_weight.items()},)
        yield batch


class Batches(keras.utils.PyDataset):
    def __init__(self, x, y, sample_weight=None):
        super().__init__()
        self.items = list(batches(x, y, sample_weight))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]


def generator(x, y, sample_weight=None, epochs=2):
    for _ in range(epochs):
        yield from batches(x, y, sample_weight)


def fresh_model():
    # The same initial weights for every variant.
    keras.utils.set_random_seed(0)
    model = two_task_model("uncertainty")
    model.compile(optimizer="adam", loss=TWO_TASK_LOSSES)
    return model


def trained(data, epochs=2, **fit_kwargs):
    model = fresh_model()
    history = model.fit(data, epochs=epochs, verbose=0, **fit_kwargs)
    return variable_values(model.trainable_variables), history.history


def from_arrays(x, y, sample_weight=None):
    model = fresh_model()
    history = model.fit(
        x,
        y,
        sample_weight=sample_weight,
        batch_size=BATCH,
        epochs=2,
        shuffle=False,
        verbose=0,
    )
    return variable_values(model.trainable_variables), history.history


def assert_same_training(ours, expected):
    (variables, history), (expected_variables, expected_history) = ours, expected
    for value, expected_value in zip(variables, expected_variables):
        np.testing.assert_allclose(value, expected_value, rtol=1e-5, atol=1e-6)
    for key in ("label_loss", "value_loss", "label_weight", "value_weight"):
        np.testing.assert_allclose(history[key], expected_history[key], rtol=1e-5)


def per_task_sample_weights():
    rng = np.random.default_rng(1)
    return {
        "label": rng.uniform(0.5, 1.5, SAMPLES).astype("float32"),
        "value": rng.uniform(0.0, 2.0, SAMPLES).astype("float32"),
    }


@pytest.mark.parametrize("with_weights", [False, True])
def test_py_dataset_trains_as_arrays_do(with_weights):
    x, y = two_task_data(SAMPLES)
    sample_weight = per_task_sample_weights() if with_weights else None
    # fit shuffles the order of a PyDataset's batches unless told not to.
    assert_same_training(
        trained(Batches(x, y, sample_weight), shuffle=False),
        from_arrays(x, y, sample_weight),
    )


def test_python_generator_trains_as_arrays_do():
    x, y = two_task_data(SAMPLES)
    steps = SAMPLES // BATCH
    assert_same_training(
        trained(generator(x, y), steps_per_epoch=steps), from_arrays(x, y)
    )


def test_a_py_dataset_with_an_unknown_output_is_refused():
    x, y = two_task_data(SAMPLES)
    model = two_task_model()
    model.compile(optimizer="adam", loss=TWO_TASK_LOSSES)
    wrong = {"label": y["label"], "speed": y["value"]}
    with pytest.raises(ValueError, match=r"unknown output\(s\) \['speed'\]"):
        model.fit(Batches(x, wrong), epochs=1, verbose=0)


@pytest.mark.parametrize("with_weights", [False, True])
def test_tf_data_with_dict_targets_trains_as_arrays_do(with_weights):
    tf = pytest.importorskip("tensorflow")

    x, y = two_task_data(SAMPLES)
    sample_weight = per_task_sample_weights() if with_weights else None
    elements = (x, y) if sample_weight is None else (x, y, sample_weight)
    dataset = tf.data.Dataset.from_tensor_slices(elements).batch(BATCH)
    assert_same_training(trained(dataset), from_arrays(x, y, sample_weight))


def empty_data(kind):
    x, y = two_task_data(SAMPLES)
    x, y = x[:0], {task: target[:0] for task, target in y.items()}
    if kind == "py_dataset":
        return Batches(x, y)
    if kind == "tf_data":
        tf = pytest.importorskip("tensorflow")
        return tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH)
    if keras.backend.backend() != "torch":
        pytest.skip("a torch DataLoader is data for the torch backend only")
    import torch

    dataset = torch.utils.data.TensorDataset(torch.tensor(x), torch.tensor(y["label"]))
    return torch.utils.data.DataLoader(dataset, batch_size=BATCH)


@pytest.mark.parametrize("kind", ["py_dataset", "tf_data", "torch_data_loader"])
@pytest.mark.parametrize("call", ["fit", "evaluate"])
def test_a_dataset_of_no_batches_is_an_error_that_changes_nothing(kind, call):
    model = fresh_model()
    x, y = two_task_data(SAMPLES)
    model.fit(x, y, epochs=1, verbose=0)
    before = variable_values(model.variables)
    with pytest.raises(ValueError, match="The data holds no samples"):
        getattr(model, call)(empty_data(kind), verbose=0)
    for old, new in zip(before, variable_values(model.variables)):
        np.testing.assert_array_equal(old, new)
    assert np.isfinite(model.evaluate(x, y, verbose=0, return_dict=True)["loss"])
