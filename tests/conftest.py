"""Shared fixtures: every test runs on the backend that KERAS_BACKEND names."""

import collections
import gc

import keras
import numpy as np
import pytest

if keras.backend.backend() == "torch":
    import torch

    # Several times faster than the default on small CPU machines.
    torch.set_num_threads(1)

BACKEND = keras.backend.backend()

# One method of each path that a training step takes through the trainer.
STEP_PATHS = {
    "loss-level": "uncertainty",
    "loss-level, updated after the step": "famo",
    "gradient-level, parameters": "upgrad",
    "gradient-level, representation": "mgda_ub",
    "gradient-level, heads weighted": "gradnorm",
}


def every_on_torch(every, elsewhere=None):
    """`every` on torch; on TensorFlow and JAX, those of `elsewhere` in it.

    A sweep that trains a model per method compiles a step per method, which
    is cheap on torch only. Every method's rule meets each backend's compiler
    directly, in the compiled-against-eager and robustness tests; what a
    model adds around the rule depends on the path of the step alone. So
    TensorFlow and JAX take one method of each path, by default those of
    STEP_PATHS, and torch, the fastest here, takes them all.
    """
    every = list(every)
    if BACKEND == "torch":
        return every
    elsewhere = set(STEP_PATHS.values() if elsewhere is None else elsewhere)
    chosen = [name for name in every if name in elsewhere]
    assert chosen, f"none of {sorted(elsewhere)} in {every}"
    return chosen


# The files that take longest, handed out first in this order: the examples'
# quick modes and the replicas start processes, the compiled steps compile.
LONGEST_FILES = (
    "test_examples.py",
    "test_gradient_training.py",
    "test_distribution.py",
    "test_torch_processes.py",
)


def pytest_collection_modifyitems(items):
    """Orders the test files for the suites' workers: the longest first.

    The suites run one test file per process (`--dist loadfile`, with
    `--no-loadscope-reorder`, so in this order): LONGEST_FILES first, then
    the others by their number of tests. A long file handed out last would
    run on one core while the others wait.
    """
    counts = collections.Counter(item.path for item in items)

    def rank(item):
        name = item.path.name
        first = (
            LONGEST_FILES.index(name) if name in LONGEST_FILES else len(LONGEST_FILES)
        )
        return first, -counts[item.path]

    items.sort(key=rank)


# clear_session, before each test, collects garbage, which walks every
# object alive: with a backend's modules, a quarter of a second or more.
# Frozen after the collection, what is alive then is left out of the walks of
# the tests that follow; each test file starts with a full collection.
@pytest.fixture(autouse=True, scope="module")
def _collect_everything_once_per_file():
    gc.unfreeze()
    yield


def fresh_session():
    keras.config.set_dtype_policy("float32")
    keras.backend.clear_session()
    gc.freeze()
    keras.utils.set_random_seed(0)


@pytest.fixture(autouse=True)
def _fresh_session():
    fresh_session()
    yield


def two_task_data(samples=128, seed=0):
    """Inputs, a 3-class label and a regression target."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(samples, 6)).astype("float32")
    label = ((x[:, 0] > 0).astype("int32") + (x[:, 1] > 0.5)).astype("int32")
    value = (x @ rng.normal(size=(6, 1)) + 0.1 * rng.normal(size=(samples, 1))).astype(
        "float32"
    )
    return x, {"label": label, "value": value}


def two_task_model(weighting="equal", regularizer=None, **kwargs):
    """A shared trunk with a classification and a regression head."""
    import keras_dwo

    inputs = keras.Input(shape=(6,))
    hidden = keras.layers.Dense(
        16, activation="relu", kernel_regularizer=regularizer, name="trunk"
    )(inputs)
    label = keras.layers.Dense(3, activation="softmax", name="label")(hidden)
    value = keras.layers.Dense(1, name="value")(hidden)
    return keras_dwo.DynamicWeightedModel(
        inputs, {"label": label, "value": value}, weighting=weighting, **kwargs
    )


TWO_TASK_LOSSES = {"label": "sparse_categorical_crossentropy", "value": "mse"}


def partially_labelled(y):
    """`two_task_data`'s targets with some regression labels missing (NaN).

    Missing mostly in the first half of each batch of 32, so that the halves
    held by two replicas have different numbers of labels.
    """
    value = y["value"].copy()
    value[[0, 1, 2, 3, 5, 8, 40, 41, 70, 100]] = np.nan
    return {**y, "value": value}


def replica_test_optimizer():
    """The optimizer of the tests that train on several replicas.

    SGD, unlike Adam, takes a step twice as long from gradients twice as
    large, so a replica's gradient summed twice, or not at all, shows.
    """
    return keras.optimizers.SGD(0.05, momentum=0.5)


def to_numpy(value):
    return keras.ops.convert_to_numpy(value)


def gradient_of(function, value):
    """The gradient of the scalar `function(value)` with respect to `value`.

    `value`: a float32 array or tensor; returns a numpy array.
    """
    value = keras.ops.convert_to_tensor(value, "float32")
    if BACKEND == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            tape.watch(value)
            result = function(value)
        return to_numpy(tape.gradient(result, value))
    if BACKEND == "jax":
        import jax

        return to_numpy(jax.grad(function)(value))
    value = value.detach().requires_grad_(True)
    return to_numpy(torch.autograd.grad(function(value), value)[0])


def variable_values(variables):
    return [to_numpy(v).copy() for v in variables]


def summed_gradients_method(interface="aggregate", **kwargs):
    """A gradient-level method whose direction is the sum of the task gradients.

    Training with it must match loss-level equal weighting exactly, which
    checks the per-task gradient machinery independently of any rule.

    Args:
        interface: The method's hook: `"aggregate"` (from the Jacobian) or
            `"gram_weights"` (weights from the Gram matrix).
    """
    from keras_dwo.weighting.base import GradientWeighting

    class SummedGradients(GradientWeighting):
        allows_representation = True

        def aggregate(self, jacobian, losses, training=True):
            return keras.ops.sum(jacobian, axis=0), keras.ops.ones_like(losses)

    class GramSummedGradients(GradientWeighting):
        allows_representation = True

        def gram_weights(self, gram, losses, training=True):
            return keras.ops.ones_like(losses)

    methods = {"aggregate": SummedGradients, "gram_weights": GramSummedGradients}
    return methods[interface](**kwargs)


def compiled_aggregate(method, jacobian, losses):
    """`aggregate` under the backend's compiler; the state is updated."""
    jacobian = keras.ops.convert_to_tensor(np.asarray(jacobian, "float32"))
    losses = keras.ops.convert_to_tensor(np.asarray(losses, "float32"))
    if BACKEND == "jax":
        import jax

        variables = method.non_trainable_variables

        @jax.jit
        def step(values, jacobian, losses):
            mapping = list(zip(variables, values))
            with keras.StatelessScope(state_mapping=mapping) as scope:
                direction, weights = method.aggregate(jacobian, losses, training=True)
            new_values = [scope.get_current_value(v) for v in variables]
            new_values = [
                old if new is None else new for old, new in zip(values, new_values)
            ]
            return direction, weights, new_values

        direction, weights, values = step(
            [v.value for v in variables], jacobian, losses
        )
        for variable, value in zip(variables, values):
            variable.assign(value)
    elif BACKEND == "tensorflow":
        import tensorflow as tf

        direction, weights = tf.function(method.aggregate, jit_compile=True)(
            jacobian, losses
        )
    else:
        direction, weights = method.aggregate(jacobian, losses)
    return to_numpy(direction), to_numpy(weights)


def assert_seeded_uniform_draws(draw, draw_with_the_same_seed, seed_generator):
    """Asserts what every `draw()` of a method's random state must give.

    Float32 draws in [0, 1) that Pearson's test finds uniform (the
    statistic over 16 equal bins below 37.7, the 0.001 quantile of a
    chi-squared law with 15 degrees of freedom); the generator advanced by
    one per draw; a second draw uncorrelated with the first; the same draws
    from a method with the same seed.
    """
    state = to_numpy(seed_generator.state.value).copy()
    first = to_numpy(draw())
    np.testing.assert_array_equal(to_numpy(seed_generator.state.value), state + [0, 1])
    assert first.dtype == np.float32 and np.all((first >= 0) & (first < 1))
    counts = np.histogram(first, bins=16, range=(0.0, 1.0))[0]
    expected = first.size / 16
    assert np.sum((counts - expected) ** 2 / expected) < 37.7
    second = to_numpy(draw())
    assert abs(np.corrcoef(first.ravel(), second.ravel())[0, 1]) < 0.05
    np.testing.assert_array_equal(to_numpy(draw_with_the_same_seed()), first)


def built(method, num_tasks, num_columns=None):
    """The method built for `num_tasks` tasks (and a Jacobian of `num_columns`)."""
    method.build([f"task_{i}" for i in range(num_tasks)])
    if getattr(method, "column_state", False) and num_columns is not None:
        method.build_columns([num_columns])
    return method


def aggregate(method, jacobian, losses=None, training=True):
    """`method.aggregate` on NumPy inputs (losses default to ones), built if needed."""
    jacobian = np.asarray(jacobian, "float32")
    if method.task_names is None:
        built(method, len(jacobian), jacobian.shape[1])
    if losses is None:
        losses = np.ones(len(jacobian), "float32")
    direction, weights = method.aggregate(
        keras.ops.convert_to_tensor(jacobian),
        keras.ops.convert_to_tensor(np.asarray(losses, "float32")),
        training=training,
    )
    return to_numpy(direction), to_numpy(weights)
