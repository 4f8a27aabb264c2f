"""Gradient-level methods inside DynamicWeightedModel: steps, logs, graph, fit."""

import weakref

import keras
import numpy as np
import pytest

import keras_dwo
from keras_dwo import weighting
from keras_dwo.weighting.random_state import RandomState

from conftest import BACKEND
from conftest import TWO_TASK_LOSSES
from conftest import assert_seeded_uniform_draws
from conftest import built
from conftest import every_on_torch
from conftest import summed_gradients_method
from conftest import to_numpy
from conftest import two_task_data
from conftest import two_task_model
from conftest import variable_values

GRADIENT_METHODS = sorted(
    name for name in weighting.IDENTIFIERS if weighting.get(name).needs_task_gradients
)


torch_compile_only = pytest.mark.skipif(
    BACKEND != "torch",
    reason="Only torch.compile splits a function into graphs at code it cannot "
    "trace; TensorFlow and JAX trace the whole step or fail.",
)


def trained_variables(
    method, epochs=2, regularizer=None, samples=128, **compile_kwargs
):
    keras.utils.set_random_seed(0)
    model = two_task_model(method, regularizer=regularizer)
    model.compile(
        optimizer=keras.optimizers.Adam(0.01), loss=TWO_TASK_LOSSES, **compile_kwargs
    )
    x, y = two_task_data(samples)
    history = model.fit(x, y, epochs=epochs, batch_size=32, shuffle=False, verbose=0)
    return variable_values(model.trainable_variables), history.history


@pytest.mark.parametrize("interface", ["aggregate", "gram_weights"])
@pytest.mark.parametrize("wrt", ["parameters", "representation"])
def test_summed_task_gradients_train_exactly_like_equal_weighting(wrt, interface):
    regularizer = keras.regularizers.L2(0.01)
    expected, expected_history = trained_variables("equal", regularizer=regularizer)
    actual, history = trained_variables(
        summed_gradients_method(interface, wrt=wrt), regularizer=regularizer
    )
    for want, got in zip(expected, actual):
        np.testing.assert_allclose(got, want, atol=1e-5)
    for key in ("loss", "label_loss", "value_loss"):
        np.testing.assert_allclose(history[key], expected_history[key], rtol=1e-5)


def test_mixed_precision_per_task_gradients_are_unscaled():
    keras.config.set_dtype_policy("mixed_float16")
    expected, _ = trained_variables("equal")
    keras.config.set_dtype_policy("mixed_float16")
    actual, history = trained_variables(summed_gradients_method())
    for want, got in zip(expected, actual):
        np.testing.assert_allclose(got, want, atol=2e-3)
    assert history["value_loss"][-1] < history["value_loss"][0]


def test_logged_weights_are_coefficients_times_task_weights():
    class Halves(weighting.GradientWeighting):
        def aggregate(self, jacobian, losses, training=True):
            coefficients = keras.ops.full_like(losses, 0.5)
            return keras.ops.matmul(coefficients, jacobian), coefficients

    model = two_task_model(Halves())
    model.compile(optimizer="sgd", loss=TWO_TASK_LOSSES, loss_weights=[2.0, 0.25])
    x, y = two_task_data(64)
    logs = model.train_on_batch(x, y, return_dict=True)
    assert logs["label_weight"] == pytest.approx(1.0)
    assert logs["value_weight"] == pytest.approx(0.125)
    expected = 2.0 * logs["label_loss"] + 0.25 * logs["value_loss"]
    assert logs["loss"] == pytest.approx(expected, rel=1e-5)


def _variable_names(model, indices):
    variables = model.trainable_variables
    return sorted(variables[i].path.split("/")[0] for i in indices)


def test_shared_variables_come_from_the_graph_or_from_shared():
    x, y = two_task_data(32)
    model = two_task_model(summed_gradients_method())
    model.compile(optimizer="sgd", loss=TWO_TASK_LOSSES)
    model.train_on_batch(x, y)
    plan = model.gradient_plan()
    assert _variable_names(model, plan.shared_indices) == ["trunk", "trunk"]
    assert set(_variable_names(model, plan.other_indices)) == {"label", "value"}

    named = two_task_model(summed_gradients_method(), shared=["trunk", "value"])
    named.compile(optimizer="sgd", loss=TWO_TASK_LOSSES)
    named.train_on_batch(x, y)
    shared = _variable_names(named, named.gradient_plan().shared_indices)
    assert shared == ["trunk", "trunk", "value", "value"]
    with pytest.raises(ValueError, match=r"unknown layer\(s\) \['nope'\]"):
        two_task_model("equal", shared=["nope"])


class TrunkWithOperations(keras_dwo.DynamicWeightedModel):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.trunk = keras.layers.Dense(16, name="trunk")
        self.label = keras.layers.Dense(3, activation="softmax", name="label")
        self.value = keras.layers.Dense(1, name="value")

    def call(self, x):
        hidden = keras.ops.relu(self.trunk(x / 4.0))
        return {"label": self.label(hidden), "value": self.value(hidden)}


def functional_trunk_with_operations(weighting):
    inputs = keras.Input(shape=(6,))
    hidden = keras.ops.relu(keras.layers.Dense(16, name="trunk")(inputs / 4.0))
    outputs = {
        "label": keras.layers.Dense(3, activation="softmax", name="label")(hidden),
        "value": keras.layers.Dense(1, name="value")(hidden),
    }
    return keras_dwo.DynamicWeightedModel(inputs, outputs, weighting=weighting)


@pytest.mark.parametrize("form", ["functional", "subclassed"])
def test_operations_that_are_not_layers_in_the_trunk_hold_no_variables(form):
    x, y = two_task_data(64)
    if form == "functional":
        model = functional_trunk_with_operations("upgrad")
    else:
        model = TrunkWithOperations(weighting="upgrad")
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=TWO_TASK_LOSSES)
    history = model.fit(x, y, epochs=3, batch_size=16, verbose=0).history
    plan = model.gradient_plan()
    assert _variable_names(model, plan.shared_indices) == ["trunk", "trunk"]
    assert set(_variable_names(model, plan.other_indices)) == {"label", "value"}
    assert history["skipped_steps"] == [0.0, 0.0, 0.0]
    for task in ("label", "value"):
        assert history[f"{task}_loss"][-1] < history[f"{task}_loss"][0]


def test_tasks_without_shared_variables_train_their_heads_with_a_warning():
    def separate_heads(weighting):
        inputs = keras.Input(shape=(6,))
        label = keras.layers.Dense(3, activation="softmax", name="label")(inputs)
        value = keras.layers.Dense(1, name="value")(inputs)
        return keras_dwo.DynamicWeightedModel(
            inputs, {"label": label, "value": value}, weighting=weighting
        )

    x, y = two_task_data(32)
    reference = separate_heads("equal")
    model = separate_heads(summed_gradients_method())
    model.set_weights(reference.get_weights())
    for each in (reference, model):
        each.compile(optimizer="sgd", loss=TWO_TASK_LOSSES)
    with pytest.warns(UserWarning, match="share no trainable variable"):
        model.train_on_batch(x, y)
    reference.train_on_batch(x, y)
    for trained, expected in zip(model.get_weights(), reference.get_weights()):
        np.testing.assert_allclose(trained, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.skipif(
    BACKEND != "torch",
    reason="Only the torch step holds the per-task gradients by Python "
    "references; TensorFlow's and XLA's graphs free their buffers themselves.",
)
def test_torch_holds_one_task_gradient_at_a_time(monkeypatch):
    """Each task's gradients are let go before the next task's pass.

    Otherwise a step holds one more gradient of the shared parameters than
    the Jacobian (measured: `(T + 1) P` floats over equal weighting instead
    of `T P`, benchmarks/memory.py).
    """
    import torch

    model = two_task_model("upgrad")
    model.compile(optimizer="sgd", loss=TWO_TASK_LOSSES)
    x, y = two_task_data(32)
    model.train_on_batch(x, y)
    trunk_kernel = model.get_layer("trunk").kernel.value
    returned, alive_at_each_pass = [], []
    gradients_of = torch.autograd.grad

    def recording(outputs, inputs, *args, **kwargs):
        alive_at_each_pass.append(sum(ref() is not None for ref in returned))
        gradients = gradients_of(outputs, inputs, *args, **kwargs)
        returned.extend(
            weakref.ref(gradient)
            for source, gradient in zip(inputs, gradients)
            if source is trunk_kernel and gradient is not None
        )
        return gradients

    monkeypatch.setattr(torch.autograd, "grad", recording)
    model.train_on_batch(x, y)
    assert len(returned) == 2
    assert alive_at_each_pass == [0] * len(alive_at_each_pass)


def test_representation_needs_heads_that_read_only_the_representation():
    inputs = keras.Input(shape=(6,))
    hidden = keras.layers.Dense(8, name="trunk")(inputs)
    label = keras.layers.Dense(3, activation="softmax", name="label")(hidden)
    value = keras.layers.Dense(1, name="value")(
        keras.layers.Concatenate()([hidden, inputs])
    )
    model = keras_dwo.DynamicWeightedModel(
        inputs,
        {"label": label, "value": value},
        weighting=summed_gradients_method(wrt="representation"),
    )
    model.compile(optimizer="sgd", loss=TWO_TASK_LOSSES)
    with pytest.raises(ValueError, match="reads a model input directly"):
        model.gradient_plan()


def test_representation_is_refused_by_methods_that_need_parameters():
    class ParametersOnly(weighting.GradientWeighting):
        pass

    with pytest.raises(ValueError, match="does not allow wrt='representation'"):
        ParametersOnly(wrt="representation")
    with pytest.raises(ValueError, match="'parameters' or 'representation'"):
        summed_gradients_method(wrt="outputs")


def _linear_model(method):
    """A linear trunk with two linear heads, weights from a fixed generator."""
    inputs = keras.Input(shape=(4,))
    hidden = keras.layers.Dense(3, name="trunk")(inputs)
    first = keras.layers.Dense(1, name="first")(hidden)
    second = keras.layers.Dense(1, name="second")(hidden)
    model = keras_dwo.DynamicWeightedModel(
        inputs, {"first": first, "second": second}, weighting=method
    )
    rng = np.random.default_rng(7)
    for variable in model.trainable_variables:
        variable.assign(rng.normal(size=variable.shape).astype("float32"))
    return model


def _reference_jacobian(weights, x, targets, task_weights):
    """Per-task gradients of the linear model's MSE losses, in NumPy."""
    kernel, bias, *heads = (w.astype("float64") for w in weights)
    hidden = x @ kernel + bias
    losses, trunk_rows, head_gradients = [], [], []
    for task, (head_kernel, head_bias) in enumerate(zip(heads[::2], heads[1::2])):
        error = hidden @ head_kernel + head_bias - targets[task]
        losses.append(np.mean(error**2))
        d_prediction = task_weights[task] * 2 * error / len(x)
        d_hidden = d_prediction @ head_kernel.T
        trunk_rows.append(np.concatenate([(x.T @ d_hidden).ravel(), d_hidden.sum(0)]))
        head_gradients.append([hidden.T @ d_prediction, d_prediction.sum(0)])
    return np.array(losses), np.stack(trunk_rows), head_gradients


PARAMETER_METHODS = [
    name for name in GRADIENT_METHODS if weighting.get(name).wrt == "parameters"
]


# The NumPy reference checks the trainer's gradients and how it applies the
# method's result, which differ between methods only in `weights_heads`.
@pytest.mark.parametrize("name", every_on_torch(PARAMETER_METHODS))
def test_a_step_matches_a_numpy_reference(name):
    """The same step on every backend: the NumPy gradients, then the method."""
    model = _linear_model(_fresh(name))
    task_weights = np.array([1.5, 0.5])
    model.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss={"first": "mse", "second": "mse"},
        loss_weights=list(task_weights),
    )
    rng = np.random.default_rng(1)
    x = rng.normal(size=(16, 4)).astype("float32")
    targets = [rng.normal(size=(16, 1)).astype("float32") for _ in range(2)]
    before = variable_values(model.trainable_variables)
    logs = model.train_on_batch(
        x, {"first": targets[0], "second": targets[1]}, return_dict=True
    )
    losses, jacobian, head_gradients = _reference_jacobian(
        before, x, targets, task_weights
    )
    np.testing.assert_allclose(
        [logs["first_loss"], logs["second_loss"]], losses, rtol=1e-5
    )
    reference = built(_fresh(name), 2, num_columns=jacobian.shape[1])
    direction, coefficients = (
        to_numpy(value)
        for value in reference.aggregate(
            keras.ops.convert_to_tensor(jacobian, "float32"),
            keras.ops.convert_to_tensor(losses, "float32"),
        )
    )
    head_factors = coefficients if reference.weights_heads else np.ones(2)
    expected = [
        before[0] - 0.1 * direction[:12].reshape(4, 3),
        before[1] - 0.1 * direction[12:],
    ]
    for factor, (kernel_gradient, bias_gradient), kernel, bias in zip(
        head_factors, head_gradients, before[2::2], before[3::2]
    ):
        expected += [
            kernel - 0.1 * factor * kernel_gradient,
            bias - 0.1 * factor * bias_gradient,
        ]
    for want, got in zip(expected, variable_values(model.trainable_variables)):
        np.testing.assert_allclose(got, want, atol=1e-4)
    np.testing.assert_allclose(
        [logs["first_weight"], logs["second_weight"]],
        task_weights * coefficients,
        rtol=1e-4,
        atol=1e-6,
    )


def _fresh(name):
    """A new instance of a registered method, seeded where it draws."""
    method = weighting.get(name)
    config = method.get_config()
    if "seed" in config:
        config["seed"] = 3
        method = type(method).from_config(config)
    return method


@pytest.mark.parametrize("name", every_on_torch(GRADIENT_METHODS))
def test_fit_lowers_every_task_loss(name):
    model = two_task_model(_fresh(name))
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss=TWO_TASK_LOSSES)
    x, y = two_task_data(256)
    before = model.evaluate(x, y, verbose=0, return_dict=True)
    history = model.fit(x, y, epochs=15, batch_size=32, verbose=0).history
    after = model.evaluate(x, y, verbose=0, return_dict=True)
    assert after["label_loss"] < before["label_loss"]
    assert after["value_loss"] < 0.5 * before["value_loss"]
    for task in model.task_names:
        assert np.all(np.isfinite(history[f"{task}_weight"]))


@pytest.mark.parametrize(
    "method",
    every_on_torch(
        ["upgrad", "pcgrad", "moco", "mgda_ub", "gradnorm", "uncertainty", "famo"],
        elsewhere=["upgrad"],
    ),
)
def test_jit_compile_takes_the_steps_of_the_eager_step(method):
    # On torch, `jit_compile=True` compiles the forward pass with the task
    # losses (apart from the trunk with wrt="representation") and the
    # combination of the task gradients; on TensorFlow and JAX, Keras
    # compiles the whole step.
    # 120 samples: the last batch of each epoch, of 24, is compiled again.
    expected, expected_history = trained_variables(
        method, samples=120, run_eagerly=True
    )
    if keras.backend.backend() == "torch":
        import torch
        from torch._dynamo.utils import counters

        torch._dynamo.reset()
    actual, history = trained_variables(method, samples=120, jit_compile=True)
    if keras.backend.backend() == "torch":
        assert counters["frames"]["ok"] > 0, "nothing was compiled"
    for want, got in zip(expected, actual):
        np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(history["loss"], expected_history["loss"], rtol=1e-5)
    for task in ("label", "value"):
        np.testing.assert_allclose(
            history[f"{task}_weight"], expected_history[f"{task}_weight"], rtol=1e-5
        )


@pytest.mark.parametrize("method", ["uncertainty", "upgrad"])
def test_jit_compile_logs_the_metrics_of_the_eager_step(method):
    # On torch, jit_compile=True compiles the update of the logs with the
    # compiled metrics; on TensorFlow and JAX, Keras compiles the whole step.
    metrics = {"label": ["sparse_categorical_accuracy"], "value": ["mae"]}
    _, expected = trained_variables(
        method, samples=120, run_eagerly=True, metrics=metrics
    )
    _, actual = trained_variables(
        method, samples=120, jit_compile=True, metrics=metrics
    )
    assert "value_mae" in expected and "label_sparse_categorical_accuracy" in expected
    assert sorted(actual) == sorted(expected)
    for key, values in expected.items():
        np.testing.assert_allclose(actual[key], values, rtol=1e-5, err_msg=key)


@pytest.mark.skipif(
    BACKEND != "torch",
    reason="Counts torch.compile's compilations: TensorFlow and JAX trace the "
    "whole step, where whether it is applied is a tensor already.",
)
@pytest.mark.parametrize("method", ["uncertainty", "upgrad"])
def test_a_skipped_step_compiles_nothing_again(method):
    # The compiled end of the torch step takes whether the step was applied
    # as a tensor: a Python bool would be compiled again at the first
    # skipped step, seconds in the middle of training.
    from torch._dynamo.utils import counters

    x, y = two_task_data(32)
    model = two_task_model(method)
    model.compile(optimizer="adam", loss=TWO_TASK_LOSSES, jit_compile=True)
    model.train_on_batch(x, y)
    model.train_on_batch(x, y)
    compiled = counters["frames"]["ok"]
    logs = model.train_on_batch(
        x, {**y, "value": np.full_like(y["value"], np.nan)}, return_dict=True
    )
    assert logs["skipped_steps"] == 1.0
    model.train_on_batch(x, y)
    assert counters["frames"]["ok"] == compiled


@torch_compile_only
@pytest.mark.parametrize("name", GRADIENT_METHODS)
def test_the_combination_compiles_into_one_graph(name):
    # With jit_compile=True the torch step compiles the combination of the
    # task gradients. Keras's torch `ops.max` and `ops.min` break a graph:
    # Aligned-MTL's combination ran as ten graphs, 1.5 ms of a 15 ms step;
    # so did Keras's torch random draws (GradDrop's signs).
    import torch

    model = two_task_model(_fresh(name))
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss=TWO_TASK_LOSSES)
    # One eager step builds the optimizer and the method's state.
    model.train_on_batch(*two_task_data(32))
    plan = model.gradient_plan()
    shared = [model.trainable_variables[i] for i in plan.shared_indices]
    generator = np.random.default_rng(0)
    task_gradients = [
        torch.as_tensor(generator.normal(size=(2, *v.shape)), dtype=torch.float32)
        for v in shared
    ]
    losses = torch.tensor([0.7, 1.3])
    explanation = torch._dynamo.explain(model.combine_task_gradients)(
        task_gradients, losses
    )
    reasons = [str(b.reason).splitlines()[0] for b in explanation.break_reasons]
    assert explanation.graph_count == 1, reasons


RANDOM_METHODS = [
    name for name in GRADIENT_METHODS if isinstance(weighting.get(name), RandomState)
]


def _three_task_gradients():
    import torch

    generator = np.random.default_rng(1)
    return [
        torch.as_tensor(generator.normal(size=(3, 6, 5)), dtype=torch.float32),
        torch.as_tensor(generator.normal(size=(3, 5)), dtype=torch.float32),
    ], torch.tensor([0.7, 1.3, 1.0])


@torch_compile_only
@pytest.mark.parametrize("name", RANDOM_METHODS)
def test_random_draws_compile_into_the_combination(name):
    # From three tasks on, PCGrad and GradVac draw the orders of the other
    # tasks; GradDrop draws at every number of tasks.
    import torch

    from keras_dwo import aggregation

    method = built(_fresh(name), 3, 35)
    explanation = torch._dynamo.explain(
        lambda gradients, losses: aggregation.combine(method, gradients, losses)
    )(*_three_task_gradients())
    reasons = [str(b.reason).splitlines()[0] for b in explanation.break_reasons]
    assert explanation.graph_count == 1, reasons


@torch_compile_only
def test_compiled_draws_are_uniform_and_follow_the_seed():
    # Under torch.compile the draws are counter-based (Keras's are not
    # traced), with the properties of Keras's eager draws.
    import torch

    method, same_seed = (built(_fresh("pcgrad"), 3) for _ in range(2))
    assert_seeded_uniform_draws(
        torch.compile(lambda: method.uniform((64, 64), training=True)),
        torch.compile(lambda: same_seed.uniform((64, 64), training=True)),
        method.seed_generator,
    )


@torch_compile_only
@pytest.mark.parametrize(
    "optimizer",
    [
        keras.optimizers.Adam,
        keras.optimizers.AdamW,
        lambda: keras.optimizers.SGD(momentum=0.9, nesterov=True),
        lambda: keras.optimizers.Adam(global_clipnorm=1.0),
    ],
    ids=["adam", "adamw", "sgd_momentum", "adam_clipped"],
)
def test_the_optimizer_update_compiles_into_one_graph(optimizer):
    # With jit_compile=True the torch step compiles the optimizer's update,
    # as `_compiled_optimizer_apply` does: Keras's Adam took 1.4 ms eagerly
    # and 0.5 ms compiled on a 300k-parameter network, SGD with momentum
    # 0.53 and 0.31; split into graphs, SGD's took 0.86.
    import torch

    model = two_task_model("upgrad")
    model.compile(optimizer=optimizer(), loss=TWO_TASK_LOSSES, jit_compile=True)
    model.train_on_batch(*two_task_data(32))
    variables = model.trainable_variables
    state = variables + model.optimizer.variables
    gradients = [torch.full_like(v.value, 0.1) for v in variables]
    before = variable_values(state)
    model._optimizer_apply(gradients, variables)
    eager = variable_values(state)
    for variable, value in zip(state, before):
        variable.assign(value)
    with torch._dynamo.config.patch(capture_scalar_outputs=True):
        explanation = torch._dynamo.explain(model._optimizer_apply)(
            gradients, variables
        )
    reasons = [str(b.reason).splitlines()[0] for b in explanation.break_reasons]
    assert explanation.graph_count == 1, reasons
    # The compiled update is the eager one.
    for want, got in zip(eager, variable_values(state)):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert not np.array_equal(eager[0], before[0])


@pytest.mark.parametrize(
    "method", every_on_torch(["uncertainty", "upgrad", "mgda_ub"], elsewhere=["upgrad"])
)
def test_jit_compile_with_batch_normalization_takes_the_eager_steps(method):
    # BatchNormalization assigns its moving statistics in the forward pass,
    # which splits a compiled forward pass into pieces on torch.
    def trained(**compile_kwargs):
        keras.utils.set_random_seed(0)
        inputs = keras.Input(shape=(6,))
        hidden = keras.layers.Dense(16, activation="relu", name="trunk")(inputs)
        hidden = keras.layers.BatchNormalization(name="norm")(hidden)
        outputs = {
            "label": keras.layers.Dense(3, activation="softmax", name="label")(hidden),
            "value": keras.layers.Dense(1, name="value")(hidden),
        }
        model = keras_dwo.DynamicWeightedModel(inputs, outputs, weighting=method)
        model.compile(
            optimizer=keras.optimizers.Adam(0.01),
            loss=TWO_TASK_LOSSES,
            **compile_kwargs,
        )
        x, y = two_task_data(120)
        history = model.fit(x, y, epochs=2, batch_size=32, shuffle=False, verbose=0)
        return variable_values(model.variables), history.history["loss"]

    expected, expected_loss = trained(run_eagerly=True)
    actual, loss = trained(jit_compile=True)
    for want, got in zip(expected, actual):
        np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
