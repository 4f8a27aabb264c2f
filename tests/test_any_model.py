"""Any model a practitioner brings: subclassed, wrapped, frozen, Keras's shorthand."""

import keras
import numpy as np
import pytest
from subclassed import TwoHeads

import keras_dwo

from conftest import TWO_TASK_LOSSES
from conftest import to_numpy
from conftest import two_task_data

GRADIENT_AND_LOSS_METHODS = ["uncertainty", "famo", "upgrad", "mgda_ub"]


class ListHeads(keras_dwo.DynamicWeightedModel):
    def __init__(self, **kwargs):
        super().__init__(task_names=["label", "value"], **kwargs)
        self.trunk = keras.layers.Dense(16, activation="relu")
        self.label = keras.layers.Dense(3, activation="softmax")
        self.value = keras.layers.Dense(1)

    def call(self, inputs):
        hidden = self.trunk(inputs)
        return [self.label(hidden), self.value(hidden)]


@pytest.mark.parametrize("method", GRADIENT_AND_LOSS_METHODS)
def test_a_subclassed_model_trains(method):
    x, y = two_task_data(128)
    model = TwoHeads(weighting=method)
    model.compile(optimizer="adam", loss=TWO_TASK_LOSSES, metrics={"value": ["mae"]})
    history = model.fit(x, y, batch_size=32, epochs=4, verbose=0).history
    assert model.task_names == ("label", "value")
    assert history["value_loss"][-1] < history["value_loss"][0]
    assert "value_mae" in history and "label_weight" in history
    if model.weighting.needs_task_gradients:
        shared = model.gradient_plan().shared_indices
        assert {id(model.trainable_variables[i]) for i in shared} == {
            id(v) for v in model.trunk.trainable_weights
        }


def test_a_subclassed_model_with_list_outputs_takes_task_names():
    x, y = two_task_data(64)
    model = ListHeads(weighting="pcgrad")
    model.compile(optimizer="adam", loss=["sparse_categorical_crossentropy", "mse"])
    history = model.fit(x, [y["label"], y["value"]], epochs=2, verbose=0).history
    assert {"label_loss", "value_loss", "label_weight"} <= set(history)
    assert len(model.gradient_plan().shared_indices) == 2


def test_a_subclassed_model_with_list_outputs_takes_metrics_by_output_name():
    x, y = two_task_data(64)
    model = ListHeads(weighting="uncertainty")
    model.compile(
        optimizer="adam",
        loss=["sparse_categorical_crossentropy", "mse"],
        metrics={"value": ["mae"], "label": ["sparse_categorical_accuracy"]},
    )
    targets = [y["label"], y["value"]]
    history = model.fit(x, targets, epochs=1, batch_size=64, verbose=0).history
    assert {"label_sparse_categorical_accuracy", "value_mae"} <= set(history)
    logs = model.evaluate(x, targets, batch_size=64, verbose=0, return_dict=True)
    prediction = to_numpy(model.predict(x, batch_size=64, verbose=0)[1])
    np.testing.assert_allclose(
        logs["value_mae"], np.mean(np.abs(prediction - y["value"])), rtol=1e-5
    )


def _trained_two_heads(x, y, epochs):
    model = TwoHeads(units=8, weighting="uncertainty")
    model.compile(optimizer="adam", loss=TWO_TASK_LOSSES)
    model.fit(x, y, epochs=epochs, verbose=0)
    return model


def test_a_subclassed_model_saves_loads_and_resumes(tmp_path):
    x, y = two_task_data(64)
    model = _trained_two_heads(x, y, epochs=2)
    model.save(tmp_path / "two_heads.keras")
    loaded = keras.models.load_model(tmp_path / "two_heads.keras")
    assert isinstance(loaded, TwoHeads) and loaded.task_names == model.task_names
    for original, restored in zip(model.weights, loaded.weights):
        np.testing.assert_allclose(to_numpy(original), to_numpy(restored))
    resumed = loaded.fit(x, y, epochs=1, shuffle=False, verbose=0).history
    straight = model.fit(x, y, epochs=1, shuffle=False, verbose=0).history
    np.testing.assert_allclose(resumed["loss"], straight["loss"], rtol=1e-5)


@pytest.mark.parametrize("build", ["call", "build", "call_after_compile"])
@pytest.mark.parametrize("method", ["uncertainty", "upgrad"])
def test_a_subclassed_model_built_before_its_tasks_are_known_trains(build, method):
    # Keras locks a subclassed model's state once it is built; its tasks are
    # known only at `compile` (a dict of losses) or at the first batch.
    x, y = two_task_data(64)
    model = TwoHeads(units=8, weighting=method)
    loss = TWO_TASK_LOSSES
    if build == "call":
        model(x[:2])
    elif build == "build":
        model.build((None, x.shape[1]))
    else:
        # One loss for every output: the tasks are read from the first batch.
        loss = "mse"
        y = {"label": y["value"], "value": y["value"]}
        model.compile(optimizer="adam", loss=loss)
        model(x[:2])
    model.compile(optimizer="adam", loss=loss)
    history = model.fit(x, y, batch_size=16, epochs=3, verbose=0).history
    assert model.task_names == ("label", "value")
    assert history["value_loss"][-1] < history["value_loss"][0]
    assert {id(v) for v in model.weights} >= {id(model.task_weights)}


def test_a_loaded_subclassed_model_saves_again_and_resumes(tmp_path):
    x, y = two_task_data(64)
    model = _trained_two_heads(x, y, epochs=1)
    model.save(tmp_path / "first.keras")
    loaded = keras.models.load_model(tmp_path / "first.keras")
    loaded.fit(x, y, epochs=1, shuffle=False, verbose=0)
    # Keras keeps the build config a model was loaded with, and saves it.
    assert set(loaded.get_build_config()) == {"input_shape", "output_names"}
    loaded.save(tmp_path / "second.keras")
    again = keras.models.load_model(tmp_path / "second.keras")
    state = loaded.weights + loaded.optimizer.variables
    for original, restored in zip(state, again.weights + again.optimizer.variables):
        np.testing.assert_array_equal(to_numpy(original), to_numpy(restored))
    resumed = again.fit(x, y, epochs=1, shuffle=False, verbose=0).history
    straight = loaded.fit(x, y, epochs=1, shuffle=False, verbose=0).history
    np.testing.assert_allclose(resumed["loss"], straight["loss"], rtol=1e-5)


def test_a_file_resaved_with_output_names_among_the_shapes_loads(tmp_path):
    # keras-dwo 0.1 wrote a loaded subclassed model's output names into the
    # input shapes of its build config when it saved it again.
    import json
    import zipfile

    x, y = two_task_data(64)
    model = _trained_two_heads(x, y, epochs=1)
    model.save(tmp_path / "model.keras")
    with zipfile.ZipFile(tmp_path / "model.keras") as archive:
        files = {name: archive.read(name) for name in archive.namelist()}
    config = json.loads(files["config.json"])
    build = config["build_config"]
    config["build_config"] = {"shapes_dict": dict(build), **build}
    del config["build_config"]["input_shape"]
    files["config.json"] = json.dumps(config).encode()
    with zipfile.ZipFile(tmp_path / "resaved.keras", "w") as archive:
        for name, content in files.items():
            archive.writestr(name, content)
    loaded = keras.models.load_model(tmp_path / "resaved.keras")
    assert loaded.task_names == ("label", "value")
    for original, restored in zip(
        model.optimizer.variables, loaded.optimizer.variables, strict=True
    ):
        np.testing.assert_array_equal(to_numpy(original), to_numpy(restored))
    assert loaded.get_build_config() == {
        "input_shape": build["input_shape"],
        "output_names": ["label", "value"],
    }


def test_from_model_traces_a_subclassed_model_with_a_sequential_trunk(tmp_path):
    class Plain(keras.Model):
        def __init__(self):
            super().__init__()
            self.trunk = keras.Sequential(
                [keras.layers.Dense(16, activation="relu")], name="trunk"
            )
            self.label = keras.layers.Dense(3, activation="softmax", name="label")
            self.value = keras.layers.Dense(1, name="value")

        def call(self, inputs):
            hidden = self.trunk(inputs)
            return {"label": self.label(hidden), "value": self.value(hidden)}

    x, y = two_task_data(64)
    plain = Plain()
    plain(x[:2])
    model = keras_dwo.DynamicWeightedModel.from_model(plain, weighting="upgrad")
    assert {id(v) for v in model.weights} >= {id(v) for v in plain.weights}
    model.compile(optimizer="adam", loss=TWO_TASK_LOSSES)
    before = to_numpy(plain.trunk.weights[0]).copy()
    model.fit(x, y, epochs=1, verbose=0)
    assert not np.allclose(before, to_numpy(plain.trunk.weights[0]))
    shared = {
        id(model.trainable_variables[i]) for i in model.gradient_plan().shared_indices
    }
    assert shared == {id(v) for v in plain.trunk.trainable_weights}
    model.save(tmp_path / "traced.keras")
    loaded = keras.models.load_model(tmp_path / "traced.keras")
    np.testing.assert_allclose(
        to_numpy(loaded.predict(x, verbose=0)["value"]),
        to_numpy(model.predict(x, verbose=0)["value"]),
        rtol=1e-6,
    )
    assert loaded.weighting.name == model.weighting.name


def _regression_pair(loss):
    """A keras.Model and a DynamicWeightedModel with the same layers' weights."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(64, 6)).astype("float32")
    y = {"a": x[:, :1] * 2.0, "b": x[:, 1:2] - x[:, 2:3]}
    models = []
    for cls in (keras.Model, keras_dwo.DynamicWeightedModel):
        keras.utils.set_random_seed(3)
        inputs = keras.Input(shape=(6,))
        hidden = keras.layers.Dense(8, activation="relu")(inputs)
        outputs = {
            "a": keras.layers.Dense(1)(hidden),
            "b": keras.layers.Dense(1)(hidden),
        }
        model = cls(inputs, outputs)
        model.compile(optimizer="sgd", loss=loss, metrics={"a": ["mae"]})
        models.append(model)
    return models, x, y


@pytest.mark.parametrize("loss", ["mse", keras.losses.MeanAbsoluteError()])
def test_one_loss_for_every_task_matches_keras(loss):
    (plain, dynamic), x, y = _regression_pair(loss)
    expected = plain.fit(x, y, epochs=2, shuffle=False, verbose=0).history
    history = dynamic.fit(x, y, epochs=2, shuffle=False, verbose=0).history
    for key in ("loss", "a_loss", "b_loss", "a_mae"):
        np.testing.assert_allclose(history[key], expected[key], rtol=1e-5)
    for a, b in zip(plain.trainable_variables, dynamic.trainable_variables):
        np.testing.assert_allclose(to_numpy(a), to_numpy(b), rtol=1e-5, atol=1e-7)


def test_list_targets_for_dict_outputs_are_refused_before_training():
    x, y = two_task_data(32)
    model = TwoHeads(weighting="upgrad")
    model.compile(optimizer="adam", loss=TWO_TASK_LOSSES)
    with pytest.raises(ValueError, match="dict keyed by output name"):
        model.fit(x, [y["label"], y["value"]], verbose=0)
    assert np.isfinite(model.fit(x, y, verbose=0).history["loss"][0])


def _backbone_model(method):
    inputs = keras.Input(shape=(6,))
    backbone = keras.Sequential(
        [keras.layers.Dense(16, activation="relu"), keras.layers.Dense(16)],
        name="backbone",
    )
    hidden = backbone(inputs)
    label = keras.layers.Dense(3, activation="softmax", name="label")(hidden)
    value = keras.layers.Dense(1, name="value")(hidden)
    model = keras_dwo.DynamicWeightedModel(
        inputs, {"label": label, "value": value}, weighting=method
    )
    return model, backbone


@pytest.mark.parametrize("method", GRADIENT_AND_LOSS_METHODS)
def test_a_frozen_backbone_trains_its_heads_then_fine_tunes(method):
    x, y = two_task_data(64)
    model, backbone = _backbone_model(method)
    backbone.trainable = False
    model.compile(optimizer="adam", loss=TWO_TASK_LOSSES)
    frozen = [to_numpy(v).copy() for v in backbone.weights]
    head = to_numpy(model.get_layer("value").kernel).copy()
    if model.weighting.needs_task_gradients:
        with pytest.warns(UserWarning, match="share no trainable variable"):
            model.fit(x, y, epochs=1, verbose=0)
    else:
        model.fit(x, y, epochs=1, verbose=0)
    for old, new in zip(frozen, backbone.weights):
        np.testing.assert_array_equal(old, to_numpy(new))
    assert not np.allclose(head, to_numpy(model.get_layer("value").kernel))

    backbone.trainable = True
    model.compile(optimizer=keras.optimizers.Adam(1e-4), loss=TWO_TASK_LOSSES)
    history = model.fit(x, y, epochs=2, verbose=0).history
    assert not np.allclose(frozen[0], to_numpy(backbone.weights[0]))
    assert all(np.isfinite(history["loss"]))
    if model.weighting.needs_task_gradients:
        assert model.gradient_plan().shared_indices


def test_tasks_that_read_one_output_tensor_train():
    """Two loss terms on one output: no task has variables of its own."""
    x, y = two_task_data(64)
    inputs = keras.Input(shape=(6,))
    hidden = keras.layers.Dense(8, activation="relu")(inputs)
    output = keras.layers.Dense(1)(hidden)
    model = keras_dwo.DynamicWeightedModel(
        inputs, {"squared": output, "absolute": output}, weighting="upgrad"
    )
    model.compile(optimizer="adam", loss={"squared": "mse", "absolute": "mae"})
    targets = {"squared": y["value"], "absolute": y["value"]}
    history = model.fit(x, targets, epochs=3, verbose=0).history
    assert not model.gradient_plan().other_indices
    assert history["squared_loss"][-1] < history["squared_loss"][0]


def test_an_error_inside_a_step_leaves_the_model_usable():
    x, y = two_task_data(32)

    class WrongKeys(keras.utils.PyDataset):
        def __len__(self):
            return 1

        def __getitem__(self, index):
            return x, {"label": y["label"], "nope": y["value"]}

    model = TwoHeads(weighting="upgrad")
    model.compile(optimizer="adam", loss=TWO_TASK_LOSSES)
    model.fit(x, y, epochs=1, verbose=0)
    with pytest.raises((ValueError, KeyError)):
        model.fit(WrongKeys(), epochs=1, verbose=0)
    assert np.isfinite(model.fit(x, y, epochs=1, verbose=0).history["loss"][0])
    assert model.predict(x, verbose=0)["value"].shape == (32, 1)


@pytest.mark.parametrize("method", ["upgrad", "uncertainty"])
def test_validation_weights_are_meaningful(method):
    x, y = two_task_data(64)
    model = TwoHeads(weighting=method)
    model.compile(optimizer="adam", loss=TWO_TASK_LOSSES)
    history = model.fit(
        x, y, epochs=2, batch_size=64, validation_data=(x, y), verbose=0
    ).history
    for task in ("label", "value"):
        # A gradient-level method's evaluation repeats the last step's
        # weights; a loss-level method's weights are its current ones, which
        # the last step changed only a little.
        np.testing.assert_allclose(
            history[f"val_{task}_weight"], history[f"{task}_weight"], rtol=0.05
        )
    assert history["label_weight"][-1] != 1.0


def test_evaluate_lists_and_metrics_names_follow_keras():
    (plain, dynamic), x, y = _regression_pair({"a": "mse", "b": "mae"})
    expected = plain.evaluate(x, y, verbose=0)
    results = dynamic.evaluate(x, y, verbose=0)
    assert len(results) == len(expected) + 3
    np.testing.assert_allclose(results[: len(expected)], expected, rtol=1e-5)
    logs = dynamic.evaluate(x, y, verbose=0, return_dict=True)
    tail = [logs["a_weight"], logs["b_weight"], logs["skipped_steps"]]
    np.testing.assert_allclose(results[len(expected) :], tail)
    assert dynamic.metrics_names == plain.metrics_names
    on_batch = dynamic.test_on_batch(x, y)
    np.testing.assert_allclose(on_batch[: len(expected)], expected, rtol=1e-5)


def test_representation_may_be_a_named_layer(tmp_path):
    inputs = keras.Input(shape=(6,))
    trunk = keras.layers.Dense(12, activation="relu", name="trunk")(inputs)
    neck = keras.layers.Dense(8, activation="relu", name="neck")(trunk)
    label = keras.layers.Dense(3, activation="softmax", name="label")(neck)
    value = keras.layers.Dense(1, name="value")(neck)
    model = keras_dwo.DynamicWeightedModel(
        inputs,
        {"label": label, "value": value},
        weighting="mgda_ub",
        representation="trunk",
    )
    model.compile(optimizer="adam", loss=TWO_TASK_LOSSES)
    x, y = two_task_data(64)
    history = model.fit(x, y, epochs=3, verbose=0).history
    assert history["value_loss"][-1] < history["value_loss"][0]
    assert tuple(model.gradient_plan().trunk.outputs[0].shape) == (None, 12)
    model.save(tmp_path / "named.keras")
    assert keras.models.load_model(tmp_path / "named.keras").representation == "trunk"
    with pytest.raises(ValueError, match="no layer"):
        keras_dwo.DynamicWeightedModel(
            inputs,
            {"label": label, "value": value},
            weighting="mgda_ub",
            representation="nope",
        ).gradient_plan()
