"""Static loss weights searched with KerasTuner: the baseline to beat."""

import itertools
import math


def simplex_grid(num_tasks, resolution):
    """Returns the weight vectors of a regular grid on the simplex.

    Every vector has entries that are multiples of `num_tasks / resolution`
    and sum to `num_tasks` (equal weights are all ones), with no zero entry:
    a task with weight 0 would not be trained at all.

    Args:
        num_tasks: Number of tasks T.
        resolution: Steps per unit of the simplex; at least T.

    Returns:
        A list of tuples of T floats.
    """
    if resolution < num_tasks:
        raise ValueError(
            f"`resolution` must be at least the number of tasks ({num_tasks}) "
            f"for every weight to be positive; received {resolution}."
        )
    points = []
    for cuts in itertools.combinations(range(1, resolution), num_tasks - 1):
        parts = [b - a for a, b in zip((0, *cuts), (*cuts, resolution))]
        points.append(tuple(num_tasks * part / resolution for part in parts))
    return points


def _keras_tuner():
    try:
        import keras_tuner
    except ImportError as error:
        raise ImportError(
            "keras_dwo.tuning needs KerasTuner: `pip install keras-dwo[tuner]`."
        ) from error
    return keras_tuner


def static_weights_hypermodel(build_model, compile_kwargs, resolution=None):
    """Returns a KerasTuner hypermodel whose hyperparameters are loss weights.

    Each trial builds a `DynamicWeightedModel` with `build_model()` and
    compiles it with `loss_weights` drawn from the simplex (summing to T, the
    scale of equal weights), so that a tuner searches the static weights a
    careful user would otherwise tune by hand. With `resolution` the weights
    are one `hp.Choice` over `simplex_grid(T, resolution)`, which
    `keras_tuner.GridSearch` enumerates; without, they are `T` logits
    `hp.Float("logit_<task>", -3, 3)` mapped to `T * softmax(logits)`, for
    `keras_tuner.BayesianOptimization` or `RandomSearch`.

    `val_loss` is the weighted objective, so it cannot compare trials with
    different weights. The hypermodel's `fit` adds `task_loss_sum` and,
    with validation data, `val_task_loss_sum` (the unweighted sum of the
    task losses, per epoch) to the history: search with
    `objective=keras_tuner.Objective("val_task_loss_sum", "min")`, or a
    validation metric from `compile`.

    Args:
        build_model: A function of no arguments that returns a new
            `DynamicWeightedModel`, typically with `weighting="equal"`.
        compile_kwargs: The arguments of `compile` (`optimizer`, `loss`,
            `metrics`...), without `loss_weights`. An optimizer given as an
            instance is rebuilt from its config for every trial.
        resolution: Optional grid resolution, see `simplex_grid`.

    Returns:
        A `keras_tuner.HyperModel`; `weights_of(hp)` on it gives the weights
        of a trial's hyperparameters as a dict by task name.

    Example:

    ```python
    hypermodel = keras_dwo.tuning.static_weights_hypermodel(
        build_model, {"optimizer": "adam", "loss": losses}, resolution=8)
    tuner = keras_tuner.GridSearch(
        hypermodel,
        objective=keras_tuner.Objective("val_task_loss_sum", "min"),
        directory="search")
    tuner.search(x, y, epochs=10, validation_data=(x_val, y_val))
    best = hypermodel.weights_of(tuner.get_best_hyperparameters()[0])
    ```
    """
    keras_tuner = _keras_tuner()
    import keras

    if "loss_weights" in compile_kwargs:
        raise ValueError(
            "`compile_kwargs` must not contain `loss_weights`: they are the "
            "hyperparameters the tuner searches."
        )
    # Loss terms make tasks of their own: the compiled model names them.
    probe = build_model()
    probe.compile(loss=compile_kwargs.get("loss"))
    task_names = probe.task_names
    grid = None if resolution is None else simplex_grid(len(task_names), resolution)

    class StaticWeights(keras_tuner.HyperModel):
        def weights_of(self, hp):
            if grid is not None:
                weights = grid[int(hp.Choice("weights", list(range(len(grid)))))]
            else:
                logits = [hp.Float(f"logit_{task}", -3.0, 3.0) for task in task_names]
                largest = max(logits)
                exponentials = [math.exp(logit - largest) for logit in logits]
                total = sum(exponentials)
                weights = [len(task_names) * e / total for e in exponentials]
            return dict(zip(task_names, weights))

        def build(self, hp):
            model = build_model()
            kwargs = dict(compile_kwargs)
            optimizer = kwargs.get("optimizer")
            if isinstance(optimizer, keras.optimizers.Optimizer):
                kwargs["optimizer"] = optimizer.__class__.from_config(
                    optimizer.get_config()
                )
            model.compile(loss_weights=self.weights_of(hp), **kwargs)
            return model

        def fit(self, hp, model, *args, **kwargs):
            history = model.fit(*args, **kwargs)
            for prefix in ("", "val_"):
                task_losses = [
                    history.history.get(f"{prefix}{task}_loss") for task in task_names
                ]
                if all(losses is not None for losses in task_losses):
                    history.history[f"{prefix}task_loss_sum"] = [
                        sum(epoch) for epoch in zip(*task_losses)
                    ]
            return history

    return StaticWeights(name="static_loss_weights")
