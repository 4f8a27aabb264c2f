"""GradVac with one set of cosine targets per shared layer (the paper's)."""

import keras
import numpy as np
import pytest

from keras_dwo import weighting

from conftest import TWO_TASK_LOSSES
from conftest import built
from conftest import compiled_aggregate
from conftest import to_numpy
from conftest import two_task_data
from conftest import two_task_model
from conftest import variable_values

LAYERS = ["trunk", "label", "value"]


def test_each_layer_is_vaccinated_as_a_model_of_its_own():
    # The same seed draws the same random orders: per layer, GradVac must
    # take the steps that whole-model GradVac takes on that layer's columns.
    rng = np.random.default_rng(0)
    sizes = [3, 4]
    per_layer = built(weighting.GradVac(granularity="layer", seed=1), 3)
    per_layer.build_columns(sizes)
    wholes = [built(weighting.GradVac(seed=1), 3) for _ in sizes]
    for _ in range(4):
        jacobian = rng.normal(size=(3, sum(sizes))).astype("float32")
        # Conflicts, so that the targets bite.
        jacobian[2] = -0.7 * jacobian[0] + 0.2 * jacobian[2]
        losses = np.ones(3, "float32")
        direction, _ = compiled_aggregate(per_layer, jacobian, losses)
        expected = [
            compiled_aggregate(whole, jacobian[:, start:end], losses)[0]
            for whole, (start, end) in zip(wholes, [(0, 3), (3, 7)])
        ]
        np.testing.assert_allclose(
            direction, np.concatenate(expected), rtol=1e-5, atol=1e-6
        )
    targets = to_numpy(per_layer.layer_target_cosines)
    for layer, whole in enumerate(wholes):
        np.testing.assert_allclose(
            targets[layer], to_numpy(whole.target_cosines), rtol=1e-5, atol=1e-6
        )
    assert not np.allclose(targets[0], targets[1])


def test_fit_makes_targets_per_shared_layer_and_they_save(tmp_path):
    x, y = two_task_data(64)
    keras.utils.set_random_seed(0)
    model = two_task_model(weighting.GradVac(granularity="layer"), shared=LAYERS)
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss=TWO_TASK_LOSSES)
    assert not model.weighting.weights_from_gram
    model.fit(x, y, batch_size=32, epochs=2, verbose=0)
    sizes = [
        sum(int(np.prod(v.shape)) for v in model.get_layer(name).trainable_weights)
        for name in LAYERS
    ]
    assert model.weighting.column_groups == tuple(sizes)
    targets = to_numpy(model.weighting.layer_target_cosines)
    assert targets.shape == (3, 2, 2) and np.any(targets != 0.0)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    loaded_targets = to_numpy(loaded.weighting.layer_target_cosines)
    np.testing.assert_array_equal(loaded_targets, targets)
    assert loaded.weighting.granularity == "layer"
    before = variable_values(loaded.trainable_variables)
    loaded.fit(x, y, batch_size=32, epochs=1, verbose=0)
    assert loaded.weighting.column_groups == tuple(sizes)
    after = variable_values(loaded.trainable_variables)
    assert any(not np.array_equal(a, b) for a, b in zip(before, after))


def test_a_bad_granularity_is_refused():
    with pytest.raises(ValueError, match="granularity"):
        weighting.GradVac(granularity="matrix")
