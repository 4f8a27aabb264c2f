"""TaskBalancer: the methods inside a step the user writes."""

import keras
import numpy as np
import pytest

import keras_dwo

from conftest import BACKEND
from conftest import TWO_TASK_LOSSES
from conftest import every_on_torch
from conftest import replica_test_optimizer
from conftest import to_numpy
from conftest import two_task_data
from conftest import two_task_model
from conftest import variable_values

LAYERS = ["trunk", "label", "value"]


def task_loss_function(model, x, y):
    label_loss = keras.losses.get(TWO_TASK_LOSSES["label"])
    value_loss = keras.losses.get(TWO_TASK_LOSSES["value"])
    label = keras.ops.convert_to_tensor(y["label"])
    value = keras.ops.convert_to_tensor(y["value"])

    def losses():
        predictions = model(x, training=True)
        return {
            "label": keras.ops.mean(label_loss(label, predictions["label"])),
            "value": keras.ops.mean(value_loss(value, predictions["value"])),
        }

    return losses


@pytest.mark.parametrize(
    "method", every_on_torch(["equal", "uncertainty", "famo", "upgrad", "mgda"])
)
def test_the_same_update_as_fit(method):
    x, y = two_task_data(32)
    # Every layer shared: fit combines every variable's task gradients, as
    # the balancer does with the variables it is given.
    model = two_task_model(method, shared=LAYERS)
    layer_variables = [v for name in LAYERS for v in model.get_layer(name).weights]
    initial = variable_values(layer_variables)
    model.compile(optimizer=replica_test_optimizer(), loss=TWO_TASK_LOSSES)
    history = model.fit(x, y, batch_size=32, epochs=3, shuffle=False, verbose=0)
    expected = variable_values(layer_variables)
    expected_state = variable_values(model.weighting.variables)

    for variable, value in zip(layer_variables, initial):
        variable.assign(value)
    balancer = keras_dwo.TaskBalancer(method, ["label", "value"])
    optimizer = replica_test_optimizer()
    losses = task_loss_function(model, x, y)
    for _ in range(3):
        logs = balancer.apply(optimizer, losses, layer_variables)
        assert bool(to_numpy(logs["applied"]))
    for got, want in zip(variable_values(layer_variables), expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    for got, want in zip(variable_values(balancer.method.variables), expected_state):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        to_numpy(logs["value_weight"]), history.history["value_weight"][-1], 1e-5
    )


@pytest.mark.parametrize("method", every_on_torch(["uncertainty", "famo", "upgrad"]))
def test_a_non_finite_step_changes_nothing(method):
    x, y = two_task_data(32)
    model = two_task_model()
    variables = model.trainable_variables
    balancer = keras_dwo.TaskBalancer(method, ["label", "value"])
    optimizer = keras.optimizers.Adam(1e-2)
    finite = task_loss_function(model, x, y)
    balancer.apply(optimizer, finite, variables)
    before = variable_values(variables + optimizer.variables + balancer.weights)

    def poisoned():
        losses = finite()
        return {**losses, "value": losses["value"] * float("nan")}

    logs = balancer.apply(optimizer, poisoned, variables)
    assert not bool(to_numpy(logs["applied"]))
    after = variable_values(variables + optimizer.variables + balancer.weights)
    for got, want in zip(after, before):
        np.testing.assert_array_equal(got, want)
    assert bool(to_numpy(balancer.apply(optimizer, finite, variables)["applied"]))


def test_state_saves_with_the_model_that_holds_it(tmp_path):
    @keras.saving.register_keras_serializable(package="test_task_balancer")
    class Holder(keras.Model):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.dense = keras.layers.Dense(1)
            self.balancer = keras_dwo.TaskBalancer("uncertainty", ["a", "b"])

        def call(self, x):
            return self.dense(x)

    x = np.ones((4, 3), "float32")
    holder = Holder()
    holder(x)
    optimizer = keras.optimizers.SGD(0.1)

    def losses():
        prediction = holder.dense(x)
        return [keras.ops.mean(prediction**2), keras.ops.mean(prediction**2) * 3.0]

    holder.balancer.apply(optimizer, losses, holder.dense.trainable_variables)
    learned = to_numpy(holder.balancer.method.uncertainty.log_variances)
    assert np.all(learned != 0.0)
    holder.save_weights(tmp_path / "holder.weights.h5")
    restored = Holder()
    restored(x)
    restored.load_weights(tmp_path / "holder.weights.h5")
    np.testing.assert_array_equal(
        to_numpy(restored.balancer.method.uncertainty.log_variances), learned
    )
    config = keras.saving.serialize_keras_object(holder.balancer)
    clone = keras.saving.deserialize_keras_object(config)
    assert clone.task_names == ("a", "b")
    assert type(clone.method) is type(holder.balancer.method)


def test_loss_weights_scale_the_tasks():
    balancer = keras_dwo.TaskBalancer("equal", ["a", "b"], loss_weights=[2.0, 0.5])
    objective, weights = balancer.objective({"a": 1.0, "b": 4.0})
    np.testing.assert_allclose(to_numpy(objective), 4.0)
    np.testing.assert_allclose(to_numpy(weights), [2.0, 0.5])


def test_bad_input_is_named():
    for names in (["only"], "ab"):
        with pytest.raises(ValueError, match="two or more tasks"):
            keras_dwo.TaskBalancer("equal", names)
    balancer = keras_dwo.TaskBalancer("equal", ["a", "b"])
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['c'\]"):
        balancer.objective({"a": 1.0, "b": 1.0, "c": 1.0})
    with pytest.raises(ValueError, match=r"No loss for task\(s\) \['b'\]"):
        balancer.objective({"a": 1.0})
    with pytest.raises(ValueError, match="shape"):
        balancer.objective(keras.ops.ones((3,)))
    method = keras_dwo.weighting.get("famo")
    keras_dwo.TaskBalancer(method, ["a", "b"])
    with pytest.raises(ValueError, match="its own instance"):
        keras_dwo.TaskBalancer(method, ["a", "b"])


def test_misuse_is_refused_by_name():
    balancer = keras_dwo.TaskBalancer("equal", ["a", "b"])
    per_sample = keras.ops.ones((8,))
    with pytest.raises(ValueError, match="'a' is not a scalar"):
        balancer.objective({"a": per_sample, "b": 1.0})
    optimizer = keras.optimizers.SGD(0.1)
    with pytest.raises(ValueError, match="`variables` is empty"):
        balancer.apply(optimizer, lambda: {"a": 1.0, "b": 1.0}, [])
    for method in ("upgrad", "famo"):
        with pytest.raises(ValueError, match="take the step with `apply`"):
            keras_dwo.TaskBalancer(method, ["a", "b"]).objective([1.0, 1.0])


def test_the_config_keeps_the_loss_weights():
    balancer = keras_dwo.TaskBalancer("uncertainty", ["a", "b"], loss_weights=[2, 0.5])
    clone = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(balancer)
    )
    np.testing.assert_array_equal(to_numpy(clone.task_weights), [2.0, 0.5])
    plain = keras_dwo.TaskBalancer.from_config(
        keras_dwo.TaskBalancer("equal", ["a", "b"]).get_config()
    )
    np.testing.assert_array_equal(to_numpy(plain.task_weights), [1.0, 1.0])


def _normalized_network():
    keras.utils.set_random_seed(0)
    network = keras.Sequential(
        [
            keras.layers.Dense(8),
            keras.layers.BatchNormalization(),
            keras.layers.Dropout(0.5),
            keras.layers.Dense(2),
        ]
    )
    return network


@pytest.mark.parametrize("method", ["uncertainty", "upgrad"])
def test_the_forward_pass_updates_its_statistics(method):
    # The moving statistics of batch normalization and the seed of dropout
    # are assigned by the forward pass of `loss_fn`.
    x, y = regression_data()
    network = _normalized_network()
    network(x)
    batch_norm, dropout = network.layers[1], network.layers[2]
    balancer = keras_dwo.TaskBalancer(method, ["first", "second"])
    optimizer = keras.optimizers.SGD(0.0)
    targets = keras.ops.convert_to_tensor(y)

    def losses():
        return keras.ops.mean((network(x, training=True) - targets) ** 2, axis=0)

    mean = to_numpy(batch_norm.moving_mean).copy()
    seed = to_numpy(dropout.seed_generator.state).copy()
    if BACKEND == "jax":
        # Uncertainty weighting trains its log-variances with the network.
        optimizer.build(network.trainable_variables + balancer.trainable_variables)
        balancer.build_columns(network.trainable_variables)
        state = network.variables + optimizer.variables + balancer.variables
        _, values = balancer.stateless_apply(
            optimizer,
            losses,
            network.trainable_variables,
            [(v, v.value) for v in state],
        )
        for variable, value in zip(state, values):
            variable.assign(value)
    else:
        balancer.apply(optimizer, losses, network.trainable_variables)
    assert not np.allclose(to_numpy(batch_norm.moving_mean), mean)
    if BACKEND != "torch":
        # Keras's torch dropout draws from torch's own generator.
        assert not np.array_equal(to_numpy(dropout.seed_generator.state), seed)


@pytest.mark.parametrize("method", ["uncertainty", "upgrad"])
def test_a_loss_scale_optimizer_takes_its_inner_optimizers_steps(method):
    # Mixed precision wraps the optimizer in a LossScaleOptimizer, which
    # divides the gradients by its loss scale: the losses are scaled first.
    x, y = regression_data()
    trained = []
    for optimizer in (
        keras.optimizers.SGD(0.05),
        keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.05)),
    ):
        keras.utils.set_random_seed(0)
        model = Balanced(method)
        model(x)
        model.compile(optimizer=optimizer)
        initial = variable_values(model.network_variables())
        model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
        trained.append(variable_values(model.network_variables()))
    assert not np.allclose(trained[1][0], initial[0])
    for plain, scaled in zip(*trained):
        np.testing.assert_allclose(scaled, plain, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(
    BACKEND == "jax",
    reason="Keras's LossScaleOptimizer has no stateful update on JAX; the "
    "step there is stateless_apply (previous test), and apply says so.",
)
def test_a_non_finite_step_lowers_the_loss_scale():
    x, y = regression_data()
    network = _normalized_network()
    network(x)
    balancer = keras_dwo.TaskBalancer("upgrad", ["first", "second"])
    optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1))
    optimizer.build(network.trainable_variables)
    before = variable_values(network.trainable_variables)
    scale = float(to_numpy(optimizer.dynamic_scale))
    logs = balancer.apply(
        optimizer,
        lambda: {"first": float("inf"), "second": keras.ops.sum(network(x))},
        network.trainable_variables,
    )
    assert not bool(to_numpy(logs["applied"]))
    assert float(to_numpy(optimizer.dynamic_scale)) == scale / 2
    for old, new in zip(before, variable_values(network.trainable_variables)):
        np.testing.assert_array_equal(old, new)


def test_apply_with_a_loss_scale_optimizer_on_jax_says_what_to_use():
    if BACKEND != "jax":
        pytest.skip("Only JAX's LossScaleOptimizer lacks a stateful update.")
    x, _ = regression_data()
    network = _normalized_network()
    network(x)
    balancer = keras_dwo.TaskBalancer("equal", ["first", "second"])
    optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1))
    with pytest.raises(ValueError, match="use `stateless_apply`"):
        balancer.apply(
            optimizer,
            lambda: keras.ops.mean(network(x), axis=0),
            network.trainable_variables,
        )


class Balanced(keras.Model):
    """A model whose overridden `train_step` balances two regression columns.

    On JAX, Keras's `train_step` is stateless: it calls `stateless_apply`;
    elsewhere `apply`, and `stateless` asks for `stateless_apply` on torch.
    """

    stateless = False

    def __init__(self, method="upgrad", **kwargs):
        super().__init__(**kwargs)
        self.trunk = keras.layers.Dense(8, activation="relu")
        self.heads = keras.layers.Dense(2)
        self.balancer = keras_dwo.TaskBalancer(method, ["first", "second"])

    def call(self, x):
        return self.heads(self.trunk(x))

    def network_variables(self):
        return self.trunk.trainable_variables + self.heads.trainable_variables

    def losses_of(self, x, y):
        y = keras.ops.convert_to_tensor(y)

        def losses():
            return keras.ops.mean((self(x, training=True) - y) ** 2, axis=0)

        return losses

    def train_step(self, *args):
        if BACKEND == "jax":
            state, (x, y) = args
        elif self.stateless:
            (x, y) = args[0]
            state = [
                [v.value for v in variables]
                for variables in (
                    self.trainable_variables,
                    self.non_trainable_variables,
                    self.optimizer.variables,
                    self.metrics_variables,
                )
            ]
        else:
            x, y = args[0]
            return self.balancer.apply(
                self.optimizer, self.losses_of(x, y), self.network_variables()
            )
        trainable, non_trainable, optimizer_values, metrics = state
        mapping = [
            *zip(self.trainable_variables, trainable),
            *zip(self.non_trainable_variables, non_trainable),
            *zip(self.optimizer.variables, optimizer_values),
        ]
        logs, values = self.balancer.stateless_apply(
            self.optimizer, self.losses_of(x, y), self.network_variables(), mapping
        )
        trainable_count = len(trainable)
        count = trainable_count + len(non_trainable)
        state = (
            values[:trainable_count],
            values[trainable_count:count],
            values[count:],
            metrics,
        )
        if BACKEND == "jax":
            return logs, state
        for variables, values in zip(
            (self.trainable_variables, self.non_trainable_variables),
            state,
        ):
            for variable, value in zip(variables, values):
                variable.assign(value)
        for variable, value in zip(self.optimizer.variables, state[2]):
            variable.assign(value)
        return logs


def regression_data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype("float32")
    y = np.stack([x[:, 0], -x[:, 0] + x[:, 1]], axis=1).astype("float32")
    return x, y


def built_balanced(method, x, run_eagerly=False, stateless=False):
    keras.utils.set_random_seed(0)
    model = Balanced(method)
    model.stateless = stateless
    model(x)
    model.compile(optimizer=keras.optimizers.SGD(0.05), run_eagerly=run_eagerly)
    model.optimizer.build(model.trainable_variables)
    # MoCo's state per parameter must exist before a compiled first step.
    model.balancer.build_columns(model.network_variables())
    return model


@pytest.mark.parametrize("method", ["upgrad", "uncertainty", "moco"])
def test_inside_an_overridden_train_step_compiled_as_eager(method):
    x, y = regression_data()
    trained = []
    for run_eagerly in (False, True):
        model = built_balanced(method, x, run_eagerly)
        history = model.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0)
        assert history.history["applied"][-1] == 1.0
        trained.append(variable_values(model.trainable_variables))
    assert history.history["first_loss"][-1] < history.history["first_loss"][0]
    for compiled, eager in zip(*trained):
        np.testing.assert_allclose(compiled, eager, rtol=1e-5, atol=1e-6)


STATELESS_ON_TENSORFLOW = pytest.mark.skipif(
    BACKEND == "tensorflow",
    reason="Keras's TensorFlow optimizers have no stateless update; "
    "test_stateless_apply_is_refused_on_tensorflow checks the error",
)


@STATELESS_ON_TENSORFLOW
@pytest.mark.parametrize("method", ["upgrad", "uncertainty", "famo", "moco"])
def test_stateless_apply_takes_the_steps_of_apply(method):
    x, y = regression_data()
    stateful = built_balanced(method, x)
    for start in range(0, 48, 16):
        batch = (x[start : start + 16], y[start : start + 16])
        stateful.balancer.apply(
            stateful.optimizer, stateful.losses_of(*batch), stateful.network_variables()
        )
    stateless = built_balanced(method, x, stateless=True)
    history = stateless.fit(x[:48], y[:48], batch_size=16, shuffle=False, verbose=0)
    assert history.history["applied"] == [1.0]
    for got, want in zip(
        variable_values(stateless.weights + stateless.optimizer.variables),
        variable_values(stateful.weights + stateful.optimizer.variables),
    ):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@STATELESS_ON_TENSORFLOW
@pytest.mark.parametrize("method", ["uncertainty", "famo", "upgrad"])
def test_a_non_finite_stateless_step_keeps_the_values(method):
    x, y = regression_data()
    model = built_balanced(method, x)
    tracked = [*model.weights, *model.optimizer.variables]
    mapping = [(v, v.value) for v in tracked]

    def poisoned():
        return model.losses_of(x, y)() * float("nan")

    logs, values = model.balancer.stateless_apply(
        model.optimizer, poisoned, model.network_variables(), mapping
    )
    assert not bool(to_numpy(logs["applied"]))
    for got, (_, want) in zip(values, mapping):
        np.testing.assert_array_equal(to_numpy(got), to_numpy(want))
    logs, values = model.balancer.stateless_apply(
        model.optimizer, model.losses_of(x, y), model.network_variables(), mapping
    )
    assert bool(to_numpy(logs["applied"]))
    changed = [
        not np.array_equal(to_numpy(got), to_numpy(want))
        for got, (_, want) in zip(values, mapping)
    ]
    assert all(changed[: len(model.network_variables())])


@STATELESS_ON_TENSORFLOW
def test_stateless_apply_names_what_is_missing():
    x, y = regression_data()
    model = built_balanced("uncertainty", x)
    variables = model.network_variables()
    mapping = [(v, v.value) for v in [*variables, *model.optimizer.variables]]
    with pytest.raises(ValueError, match="log_variances"):
        model.balancer.stateless_apply(
            model.optimizer, model.losses_of(x, y), variables, mapping
        )
    with pytest.raises(ValueError, match="built optimizer"):
        model.balancer.stateless_apply(
            keras.optimizers.SGD(0.1), model.losses_of(x, y), variables, mapping
        )
    # MoCo's state per parameter, made at the first step, must be mapped too.
    balancer = keras_dwo.TaskBalancer("moco", ["first", "second"])
    mapping += [(v, v.value) for v in balancer.variables]
    with pytest.raises(ValueError, match=r"build_columns\(variables\)"):
        balancer.stateless_apply(
            model.optimizer, model.losses_of(x, y), variables, mapping
        )


@pytest.mark.skipif(BACKEND != "tensorflow", reason="the TensorFlow backend's error")
def test_stateless_apply_is_refused_on_tensorflow():
    x, y = regression_data()
    model = built_balanced("upgrad", x)
    mapping = [(v, v.value) for v in [*model.weights, *model.optimizer.variables]]
    with pytest.raises(ValueError, match="Call `apply`"):
        model.balancer.stateless_apply(
            model.optimizer, model.losses_of(x, y), model.network_variables(), mapping
        )
