"""Methods that combine the task gradients by their Gram matrix, in blocks."""

import keras
import numpy as np
import pytest

from keras_dwo import weighting
from keras_dwo.aggregation import aggregate_blocks
from keras_dwo.weighting.base import GradientWeighting

from conftest import TWO_TASK_LOSSES
from conftest import built
from conftest import to_numpy
from conftest import two_task_data
from conftest import two_task_model

RULES = sorted(
    name
    for name in weighting.IDENTIFIERS
    if weighting.get(name).needs_task_gradients
    and weighting.get(name).wrt == "parameters"
)
# GradDrop drops signs; the others keep state per parameter (MoDo and
# SDMGrad pair the Jacobian with the previous step's).
NOT_GRAM_RULES = {"graddrop", "db_mtl", "moco", "excess_mtl", "modo", "sdmgrad"}
GRAM_RULES = [name for name in RULES if name not in NOT_GRAM_RULES]
SPLIT = 4


def method(name):
    rule = weighting.get(name)
    if "seed" in rule.get_config():
        # Two instances draw the same random orders.
        rule = type(rule).from_config({**rule.get_config(), "seed": 3})
    return built(rule, 3, num_columns=10)


def case():
    rng = np.random.default_rng(0)
    jacobian = rng.normal(size=(3, 10)).astype("float32")
    # A conflict, so that the projecting rules do project.
    jacobian[2] = -0.5 * jacobian[0] + 0.1 * jacobian[2]
    losses = np.array([0.5, 1.0, 2.0], "float32")
    return jacobian, losses


def tensors(*arrays):
    return [keras.ops.convert_to_tensor(a) for a in arrays]


def test_every_rule_but_those_named_combines_by_the_gram_matrix():
    assert {name for name in RULES if method(name).weights_from_gram} == set(GRAM_RULES)


@pytest.mark.parametrize("name", RULES)
def test_blocks_give_the_direction_of_the_whole_jacobian(name):
    jacobian, losses = case()
    want, want_weights = method(name).aggregate(*tensors(jacobian, losses))
    blocks = tensors(jacobian[:, :SPLIT], jacobian[:, SPLIT:])
    got, weights = aggregate_blocks(method(name), blocks, *tensors(losses))
    got = np.concatenate([to_numpy(d) for d in got])
    np.testing.assert_allclose(got, to_numpy(want), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        to_numpy(weights), to_numpy(want_weights), rtol=1e-4, atol=1e-5
    )


def replica_of(jacobian, columns):
    """A replica holding `columns` of the Jacobian, and the sum over both."""
    others = np.ones(jacobian.shape[1], bool)
    others[columns] = False
    with np.errstate(invalid="ignore", over="ignore"):
        other_gram = jacobian[:, others] @ jacobian[:, others].T

    def sum_over_replicas(values):
        (gram,) = values
        return [gram + other_gram]

    return tensors(jacobian[:, columns]), sum_over_replicas


@pytest.mark.parametrize("name", GRAM_RULES)
def test_each_replica_finds_its_slice_of_the_direction(name):
    jacobian, losses = case()
    want, _ = method(name).aggregate(*tensors(jacobian, losses))
    for columns in (slice(0, SPLIT), slice(SPLIT, None)):
        blocks, sum_over_replicas = replica_of(jacobian, columns)
        (got,), _ = aggregate_blocks(
            method(name), blocks, *tensors(losses), sum_over_replicas
        )
        np.testing.assert_allclose(
            to_numpy(got), to_numpy(want)[columns], rtol=1e-4, atol=1e-5
        )


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("name", RULES)
def test_a_non_finite_entry_anywhere_makes_every_slice_non_finite(name, bad):
    jacobian, losses = case()
    jacobian[1, -1] = bad
    blocks = tensors(jacobian[:, :SPLIT], jacobian[:, SPLIT:])
    directions, _ = aggregate_blocks(method(name), blocks, *tensors(losses))
    assert not np.all(np.isfinite(np.concatenate([to_numpy(d) for d in directions])))
    if name in GRAM_RULES:
        # The replica without the bad entry learns of it from the sum.
        blocks, sum_over_replicas = replica_of(jacobian, slice(0, SPLIT))
        (clean,), weights = aggregate_blocks(
            method(name), blocks, *tensors(losses), sum_over_replicas
        )
        assert not np.any(np.isfinite(to_numpy(clean)))
        assert not np.any(np.isfinite(to_numpy(weights)))


def test_a_method_without_a_rule_names_both_hooks():
    class NoRule(GradientWeighting):
        pass

    with pytest.raises(NotImplementedError, match="gram_weights.*aggregate"):
        built(NoRule(), 2).combine(np.eye(2, 3), np.ones(2))


@keras.saving.register_keras_serializable(package="tests")
class InverseNorm(GradientWeighting):
    """README's example: each task gradient scaled to unit length, then summed."""

    def gram_weights(self, gram, losses, training=True, present=None):
        norms = keras.ops.sqrt(keras.ops.diagonal(gram))
        return keras.ops.divide_no_nan(keras.ops.ones_like(norms), norms)


def test_a_rule_written_as_gram_weights_combines_saves_and_loads(tmp_path):
    jacobian, losses = case()
    direction = InverseNorm().combine(jacobian, losses)
    unit_rows = jacobian / np.linalg.norm(jacobian, axis=1, keepdims=True)
    np.testing.assert_allclose(to_numpy(direction), unit_rows.sum(0), rtol=1e-5)

    model = two_task_model(InverseNorm())
    model.compile(optimizer="sgd", loss=TWO_TASK_LOSSES)
    x, y = two_task_data(64)
    history = model.fit(x, y, epochs=2, batch_size=32, verbose=0).history
    # The weights are the inverse gradient norms: positive and unequal.
    assert history["label_weight"][-1] > 0 and history["value_weight"][-1] > 0
    assert history["label_weight"][-1] != history["value_weight"][-1]
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded.weighting, InverseNorm)
    np.testing.assert_allclose(
        to_numpy(loaded.predict(x, verbose=0)["value"]),
        to_numpy(model.predict(x, verbose=0)["value"]),
        rtol=1e-6,
    )
