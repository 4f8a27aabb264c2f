"""AutoLambda: task weights meta-learned by a look-ahead on held-out data."""

import keras
import numpy as np
import pytest

import keras_dwo
from keras_dwo import trainers

from conftest import TWO_TASK_LOSSES
from conftest import to_numpy
from conftest import two_task_data
from conftest import two_task_model


def started(callback, model):
    callback.set_model(model)
    callback.on_train_begin()
    return callback


def test_the_hypergradient_is_minus_alpha_times_the_task_gradients_dot_d():
    x, y = two_task_data(64)
    x_val, y_val = two_task_data(64, seed=1)
    model = two_task_model()
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss=TWO_TASK_LOSSES)
    model.task_weights.assign([0.7, 1.3])
    callback = started(
        keras_dwo.callbacks.AutoLambda(x, y, (x_val, y_val), initial_weight=None),
        model,
    )
    before = [to_numpy(v).copy() for v in model.trainable_variables]
    got = callback.hypergradient((x, y), (x_val, y_val))
    for variable, value in zip(model.trainable_variables, before):
        np.testing.assert_array_equal(to_numpy(variable), value)

    # The exact derivative, by per-task gradients: -alpha g_i . d.
    variables = model.trainable_variables
    weights = keras.ops.convert_to_tensor([0.7, 1.3])

    def losses_on(inputs, targets):
        return model.compute_task_losses(targets, model(inputs, training=False))

    _, _, jacobian = trainers.value_and_jacobian(
        lambda: (losses_on(x, y), None), variables
    )
    for variable, value, rows in zip(variables, before, jacobian):
        step = keras.ops.tensordot(weights, rows, axes=1)
        variable.assign(keras.ops.convert_to_tensor(value) - 0.05 * step)
    _, _, validation = trainers.value_and_jacobian(
        lambda: (keras.ops.reshape(keras.ops.sum(losses_on(x_val, y_val)), (1,)), None),
        variables,
    )
    dots = sum(
        np.reshape(to_numpy(rows), (2, -1)) @ np.reshape(to_numpy(d[0]), -1)
        for rows, d in zip(jacobian, validation)
    )
    np.testing.assert_allclose(got, -0.05 * dots, rtol=2e-2, atol=1e-6)


def auxiliary_tasks_model():
    # One prediction read by the three tasks: the helpful task pulls it to
    # the primary's target, the harmful one (through a sign flip) away.
    inputs = keras.Input(shape=(4,))
    prediction = keras.layers.Dense(1, name="trunk")(inputs)
    outputs = {
        "primary": keras.layers.Identity(name="primary")(prediction),
        "helpful": keras.layers.Identity(name="helpful")(prediction),
        "harmful": keras.layers.Rescaling(-1.0, name="harmful")(prediction),
    }
    return keras_dwo.DynamicWeightedModel(inputs, outputs)


def auxiliary_data(samples, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(samples, 4)).astype("float32")
    target = x @ np.array([[1.0], [-2.0], [0.5], [0.0]], "float32")
    return x, {"primary": target, "helpful": target, "harmful": target}


def test_a_helpful_auxiliary_task_gains_weight_over_a_harmful_one():
    x, y = auxiliary_data(256, 0)
    x_val, y_val = auxiliary_data(128, 1)
    keras.utils.set_random_seed(0)
    model = auxiliary_tasks_model()
    model.compile(optimizer=keras.optimizers.SGD(0.02), loss="mse")
    callback = keras_dwo.callbacks.AutoLambda(
        x,
        y,
        (x_val, y_val),
        primary_tasks=["primary"],
        learning_rate=0.01,
        seed=0,
    )
    history = model.fit(x, y, batch_size=32, epochs=3, verbose=0, callbacks=[callback])
    weights = dict(zip(model.task_names, to_numpy(model.task_weights)))
    assert weights["helpful"] > 0.1 > weights["harmful"]
    # The step trained with the weights the callback set, and logged them.
    np.testing.assert_allclose(
        history.history["harmful_weight"][-1], weights["harmful"], rtol=1e-2, atol=1e-3
    )
    assert min(to_numpy(model.task_weights)) >= 0.0


def test_the_initial_weight_is_set_and_none_keeps_the_model_s():
    x, y = two_task_data(32)
    model = two_task_model()
    model.compile(optimizer="sgd", loss=TWO_TASK_LOSSES)
    model.task_weights.assign([2.0, 3.0])
    started(keras_dwo.callbacks.AutoLambda(x, y, (x, y), initial_weight=None), model)
    np.testing.assert_array_equal(to_numpy(model.task_weights), [2.0, 3.0])
    started(keras_dwo.callbacks.AutoLambda(x, y, (x, y)), model)
    np.testing.assert_allclose(to_numpy(model.task_weights), [0.1, 0.1])


def test_bad_arguments_are_named():
    x, y = two_task_data(32)
    model = two_task_model()
    model.compile(optimizer="sgd", loss=TWO_TASK_LOSSES)
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['depth'\]"):
        started(
            keras_dwo.callbacks.AutoLambda(x, y, (x, y), primary_tasks=["depth"]),
            model,
        )
    with pytest.raises(ValueError, match="every"):
        keras_dwo.callbacks.AutoLambda(x, y, (x, y), every=0)
    with pytest.raises(ValueError, match="validation_data"):
        keras_dwo.callbacks.AutoLambda(x, y, x)
    with pytest.raises(ValueError, match="learning_rate"):
        keras_dwo.callbacks.AutoLambda(x, y, (x, y), learning_rate=0.0)
