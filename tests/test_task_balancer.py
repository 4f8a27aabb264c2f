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
    with pytest.raises(ValueError, match="at least two tasks"):
        keras_dwo.TaskBalancer("equal", ["only"])
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


@pytest.mark.skipif(BACKEND != "tensorflow", reason="the TensorFlow backend's error")
def test_stateless_apply_is_refused_on_tensorflow():
    x, y = regression_data()
    model = built_balanced("upgrad", x)
    mapping = [(v, v.value) for v in [*model.weights, *model.optimizer.variables]]
    with pytest.raises(ValueError, match="Call `apply`"):
        model.balancer.stateless_apply(
            model.optimizer, model.losses_of(x, y), model.network_variables(), mapping
        )
