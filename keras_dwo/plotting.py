"""Plots of what `fit` logged: task weights and losses, gradient conflicts."""


def _history_dict(history):
    logs = getattr(history, "history", history)
    if not isinstance(logs, dict):
        raise TypeError(
            "`history` must be the History that `fit` returns or its `.history` "
            f"dict; received {type(history).__name__}."
        )
    return logs


def _matplotlib():
    try:
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError as error:
        raise ImportError(
            "keras-dwo's plots need matplotlib: `pip install keras-dwo[plot]`."
        ) from error
    return Figure, MaxNLocator


def _plot_runs(runs, tasks, figure):
    if not runs:
        raise ValueError("No runs to plot: the dict of histories is empty.")
    Figure, _ = _matplotlib()
    if figure is None:
        figure = Figure(figsize=(10, 3.2 * len(runs)), layout="constrained")
    panels = figure.subfigures(len(runs), 1, squeeze=False)[:, 0]
    for panel, (name, run) in zip(panels, runs.items()):
        plot_weights(run, tasks=tasks, figure=panel)
        panel.suptitle(name)
    return figure


def _is_run_collection(history):
    return isinstance(history, dict) and all(
        hasattr(run, "history") or isinstance(run, dict) for run in history.values()
    )


def plot_weights(history, tasks=None, figure=None):
    """Draws each task's weight and loss over the epochs of a `fit`.

    The left panel shows `<task>_weight`, the right one `<task>_loss` (and
    `val_<task>_loss`, dashed, where `fit` had validation data), one colour
    per task. Given several runs by name, it draws one such row per run,
    titled with its name. Needs matplotlib (`pip install keras-dwo[plot]`).

    Args:
        history: The `keras.callbacks.History` returned by `fit`, or its
            `.history` dict; or a dict of those by run name, such as
            `{"equal": history_1, "upgrad": history_2}`.
        tasks: Optional task names to draw, in order; by default every task
            with a `<task>_weight` log.
        figure: Optional `matplotlib.figure.Figure` to draw on; by default a
            new one.

    Returns:
        The `matplotlib.figure.Figure`, with the weights' and the losses'
        axes in `figure.axes` (two per run, in order).

    Example:

    ```python
    history = model.fit(x, y, epochs=20)
    figure = keras_dwo.plot_weights(history)
    figure.savefig("weights.png")
    ```
    """
    if _is_run_collection(history):
        return _plot_runs(history, tasks, figure)
    logs = _history_dict(history)
    available = [key[: -len("_weight")] for key in logs if key.endswith("_weight")]
    if tasks is None:
        tasks = [task for task in available if not task.startswith("val_")]
    if not tasks:
        raise ValueError(
            "The history has no `<task>_weight` log; it must come from fitting "
            f"a DynamicWeightedModel. Its keys are {sorted(logs)}."
        )
    unknown = [task for task in tasks if task not in available]
    if unknown:
        raise ValueError(
            f"No `<task>_weight` log for task(s) {unknown}; the history has "
            f"weights for {available}."
        )
    Figure, MaxNLocator = _matplotlib()
    if figure is None:
        figure = Figure(figsize=(10, 4), layout="constrained")
    weights_axes, losses_axes = figure.subplots(1, 2)
    for index, task in enumerate(tasks):
        colour = f"C{index % 10}"
        weights = logs[f"{task}_weight"]
        epochs = range(1, len(weights) + 1)
        weights_axes.plot(epochs, weights, color=colour, label=task)
        losses_axes.plot(epochs, logs[f"{task}_loss"], color=colour, label=task)
        if f"val_{task}_loss" in logs:
            losses_axes.plot(
                epochs,
                logs[f"val_{task}_loss"],
                color=colour,
                linestyle="--",
                label=f"val_{task}",
            )
    weights_axes.set(title="task weights", xlabel="epoch", ylabel="weight")
    losses_axes.set(title="task losses", xlabel="epoch", ylabel="loss")
    for axes in (weights_axes, losses_axes):
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.legend()
    return figure


def plot_conflicts(history, figure=None):
    """Draws the gradient conflicts that `callbacks.GradientConflict` logged.

    The left panel is a heat map of each pair of tasks' cosine similarity
    over the epochs (blue: they agree, red: they conflict); the right one
    shows each task's `<task>_gradient_ratio`, its gradient norm over the
    tasks' mean. Needs matplotlib (`pip install keras-dwo[plot]`).

    Args:
        history: The `keras.callbacks.History` returned by `fit`, or its
            `.history` dict.
        figure: Optional `matplotlib.figure.Figure` to draw on; by default a
            new one.

    Returns:
        The `matplotlib.figure.Figure`, with the heat map's and the ratios'
        axes in `figure.axes`.

    Example:

    ```python
    conflict = keras_dwo.callbacks.GradientConflict(x_probe, y_probe)
    history = model.fit(x, y, epochs=20, callbacks=[conflict])
    keras_dwo.plot_conflicts(history).savefig("conflicts.png")
    ```
    """
    logs = _history_dict(history)
    pairs = [key for key in logs if key.startswith("cosine_")]
    ratios = [key for key in logs if key.endswith("_gradient_ratio")]
    if not pairs:
        raise ValueError(
            "The history has no `cosine_<a>_<b>` log; fit with the callback "
            f"keras_dwo.callbacks.GradientConflict. Its keys are {sorted(logs)}."
        )
    Figure, MaxNLocator = _matplotlib()
    if figure is None:
        figure = Figure(figsize=(10, 1.5 + 0.5 * len(pairs)), layout="constrained")
    cosine_axes, ratio_axes = figure.subplots(1, 2)
    cosines = [logs[key] for key in pairs]
    epochs = len(cosines[0])
    image = cosine_axes.imshow(
        cosines,
        aspect="auto",
        cmap="RdBu",
        vmin=-1.0,
        vmax=1.0,
        extent=(0.5, epochs + 0.5, len(pairs) - 0.5, -0.5),
    )
    cosine_axes.set_yticks(range(len(pairs)))
    cosine_axes.set_yticklabels([key[len("cosine_") :] for key in pairs])
    cosine_axes.set(title="cosine of task gradients", xlabel="epoch")
    figure.colorbar(image, ax=cosine_axes)
    for index, key in enumerate(ratios):
        values = logs[key]
        ratio_axes.plot(
            range(1, len(values) + 1),
            values,
            color=f"C{index % 10}",
            label=key[: -len("_gradient_ratio")],
        )
    ratio_axes.axhline(1.0, color="grey", linewidth=0.8)
    ratio_axes.set(title="gradient norm / mean", xlabel="epoch", ylabel="ratio")
    for axes in (cosine_axes, ratio_axes):
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    ratio_axes.legend()
    return figure
