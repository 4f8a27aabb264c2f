"""compare: the same model trained with each method, side by side."""

import dataclasses
import time

import keras
from keras import ops


class _StepTimer(keras.callbacks.Callback):
    """Wall time per training step, over the epochs after the first."""

    def __init__(self):
        super().__init__()
        self.epochs = []

    def on_epoch_begin(self, epoch, logs=None):
        self._steps, self._start = 0, time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self._steps += 1

    def on_epoch_end(self, epoch, logs=None):
        self.epochs.append((time.perf_counter() - self._start, self._steps))

    @property
    def milliseconds_per_step(self):
        # The first epoch compiles the step: left out where there are others.
        timed = self.epochs[1:] or self.epochs
        seconds = sum(seconds for seconds, _ in timed)
        steps = sum(steps for _, steps in timed)
        return 1000.0 * seconds / max(steps, 1)


@dataclasses.dataclass
class Comparison:
    """What `compare` measured.

    Attributes:
        rows: One dict per method, in order: `method`, the final value of
            each task's loss (`val_<task>_loss` with validation data, else
            `<task>_loss`) and of each compiled metric, `ms_per_step` and
            each task's final weight (`<task>_weight`).
        histories: The `keras.callbacks.History` of each method, by name.
    """

    rows: list
    histories: dict

    def format(self):
        """Returns the rows as a plain-text table."""
        columns = list(self.rows[0])
        for row in self.rows[1:]:
            columns += [key for key in row if key not in columns]
        widths = {
            key: max(len(key), *(len(_cell(row.get(key))) for row in self.rows))
            for key in columns
        }
        lines = ["  ".join(key.rjust(widths[key]) for key in columns)]
        for row in self.rows:
            lines.append(
                "  ".join(_cell(row.get(key)).rjust(widths[key]) for key in columns)
            )
        return "\n".join(lines)

    def plot(self, figure=None):
        """Draws each method's weights and losses (`plot_weights`)."""
        from keras_dwo.plotting import plot_weights

        return plot_weights(self.histories, figure=figure)


def _cell(value):
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _network_variables(model):
    """The model's variables, without the weighting's and the tasks' state."""
    excluded = {id(v) for v in model.weighting.weights}
    excluded.update(id(v) for v in (model.task_weights, model.task_loss_history))
    return [v for v in model.weights if id(v) not in excluded]


def compare(
    build_model,
    methods,
    x=None,
    y=None,
    validation_data=None,
    epochs=1,
    batch_size=None,
    seed=0,
    callbacks=None,
    verbose=1,
    **fit_kwargs,
):
    """Trains the same model with each method and tabulates the outcome.

    Every method trains the network from the same initial weights (those
    of the first model built), on the same data in the same order (the
    random seed is set before each run), for the same number of epochs.

    Args:
        build_model: A function that takes a method (an identifier, or
            whatever `methods` holds) and returns a compiled
            `DynamicWeightedModel`; the same network each call.
        methods: The methods to compare: a list of identifiers or a dict of
            methods (identifiers, configs or factories of instances) by the
            name to show.
        x, y: The training data, as for `fit`.
        validation_data: Optional validation data, as for `fit`: the table
            then shows validation losses and metrics.
        epochs: Epochs per method.
        batch_size: As for `fit`.
        seed: The seed set before each run.
        callbacks: Optional callbacks given to every run's `fit`.
        verbose: 1 prints one line per method as it finishes and the table
            at the end; 0 prints nothing. `fit`'s own progress is
            `fit_kwargs["verbose"]` (0 by default).
        **fit_kwargs: Passed to every `fit` (`shuffle`, `sample_weight`...).

    Returns:
        A `Comparison`: its `rows`, `histories`, `format()` and `plot()`.

    Example:

    ```python
    def build(method):
        model = make_network(weighting=method)
        model.compile(optimizer="adam", loss=losses, metrics=metrics)
        return model

    result = keras_dwo.compare(
        build, ["equal", "uncertainty", "upgrad"], x, y,
        validation_data=(x_val, y_val), epochs=20)
    print(result.format())
    result.plot().savefig("methods.png")
    ```
    """
    if isinstance(methods, dict):
        named = dict(methods)
    else:
        named = {str(method): method for method in methods}
    if not named:
        raise ValueError("`methods` is empty: give one or more methods to compare.")
    fit_kwargs.setdefault("verbose", 0)
    initial, rows, histories = None, [], {}
    for name, method in named.items():
        keras.utils.set_random_seed(seed)
        model = build_model(method() if callable(method) else method)
        network = _network_variables(model)
        if initial is None:
            initial = [ops.convert_to_numpy(v) for v in network]
        else:
            if [tuple(v.shape) for v in network] != [v.shape for v in initial]:
                raise ValueError(
                    f"`build_model` built another network for {name!r}: its "
                    "variables differ in shape from the first method's."
                )
            for variable, value in zip(network, initial):
                variable.assign(value)
        keras.utils.set_random_seed(seed)
        timer = _StepTimer()
        history = model.fit(
            x,
            y,
            validation_data=validation_data,
            epochs=epochs,
            batch_size=batch_size,
            callbacks=[*(callbacks or []), timer],
            **fit_kwargs,
        )
        histories[name] = history
        rows.append(_row(name, model, history.history, timer))
        if verbose:
            summary = ", ".join(
                f"{key} {_cell(value)}"
                for key, value in rows[-1].items()
                if key != "method"
            )
            print(f"{name}: {summary}")
    result = Comparison(rows, histories)
    if verbose:
        print(result.format())
    return result


def _row(name, model, logs, timer):
    validation = any(key.startswith("val_") for key in logs)
    prefix = "val_" if validation else ""
    row = {"method": name}
    for task in model.task_names:
        row[f"{prefix}{task}_loss"] = float(logs[f"{prefix}{task}_loss"][-1])
    own = {
        f"{prefix}{task}_{kind}"
        for task in model.task_names
        for kind in ("loss", "weight")
    }
    own |= {f"{prefix}loss", f"{prefix}skipped_steps"}
    for key, values in logs.items():
        if key.startswith(prefix) and (validation or not key.startswith("val_")):
            if key not in own and key not in row:
                row[key] = float(values[-1])
    row["ms_per_step"] = timer.milliseconds_per_step
    for task in model.task_names:
        row[f"{task}_weight"] = float(logs[f"{task}_weight"][-1])
    return row
