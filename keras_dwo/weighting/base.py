"""The two interfaces of weighting methods: loss-level and gradient-level."""

import keras
from keras import ops

from keras_dwo.weighting.gram import combination


@keras.saving.register_keras_serializable(package="keras_dwo")
class LossWeighting(keras.layers.Layer):
    """Base class of loss-level methods: per-task losses in, one objective out.

    A loss-level method needs only the values of the task losses, so the model
    takes one backward pass through the objective it returns. The method is a
    Keras layer: its state lives in Keras variables, which the model tracks, so
    it trains, saves, restores and distributes like any other weight.

    Subclasses implement `call(losses, training, present)`, which returns the
    objective (a scalar) and the effective weights: the derivative of the
    objective with respect to each task loss, as a `(T,)` tensor that is
    reported in the logs as `<task>_weight`. Methods that learn from how the
    losses changed over a step set `updates_after_step = True` and implement
    `update`.

    `present` is None or a float `(T,)` mask: 0 marks a task without any
    label in the batch (partial labels, see `DynamicWeightedModel`'s
    `missing_label`). Such a task's loss is 0 and has no gradient; a method
    treats the step as one of the other tasks alone and leaves its state for
    that task as it was.

    Args:
        **kwargs: Passed to `keras.layers.Layer`. The layer computes in
            float32 unless a `dtype` is given, so mixed precision does not
            round the weights.
    """

    needs_task_gradients = False
    updates_after_step = False
    # State per shared parameter or layer: see `GradientWeighting.build_columns`.
    column_state = False

    def __init__(self, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.task_names = None

    def build(self, task_names):
        """Creates the method's state for the given tasks.

        Args:
            task_names: Sequence of task names, in output order.
        """
        self.task_names = tuple(task_names)

    def get_build_config(self):
        # The model that owns the method builds it for its tasks.
        return None

    @property
    def num_tasks(self):
        return len(self.task_names)

    def call(self, losses, training=False, present=None):
        """Returns `(objective, weights)` for a `(T,)` vector of task losses."""
        raise NotImplementedError(
            f"{type(self).__name__} must implement `call(losses, training, present)`."
        )

    def update(self, losses_before, losses_after, present=None):
        """Updates the state from the task losses before and after a step."""
        del losses_before, losses_after, present


def check_unclaimed(method, owner):
    """Raises if `method` already serves the tasks of another `owner`."""
    if method.task_names is not None:
        raise ValueError(
            f"The weighting {method.name!r} already serves the tasks "
            f"{method.task_names}; give each {owner} its own instance."
        )


def presence(present, losses):
    """Returns the float32 `(T,)` presence mask, all ones where `present` is None."""
    if present is None:
        return ops.ones_like(losses)
    return ops.cast(present, losses.dtype)


def positive_presence(present, losses):
    """Returns the presence mask, with the tasks whose loss is not positive absent.

    For the methods defined only for positive losses (they take logarithms
    or ratios of them): a loss of 0, which a task weight of 0 also gives, a
    negative loss (a cosine similarity, a log-likelihood) or a NaN one makes
    its task absent from the step, exactly as a task without labels.

    Args:
        present: None or the float `(T,)` presence mask.
        losses: `(T,)` task losses (or their distance to a lower bound).
    """
    return presence(present, losses) * ops.cast(losses > 0, losses.dtype)


def linear_objective(weights, losses):
    """Objective `sum_i w_i L_i` for weights that receive no gradient."""
    weights = ops.stop_gradient(weights)
    return ops.sum(weights * losses), weights


@keras.saving.register_keras_serializable(package="keras_dwo")
class GradientWeighting(LossWeighting):
    """Base class of gradient-level methods: per-task gradients in, one direction out.

    The model computes the Jacobian of the weighted task losses
    (`task_weights * L`) with respect to the shared variables, one row per
    task, and hands it to `aggregate`, which returns the direction that the
    optimizer applies to the shared variables as their gradient. Each task's
    own (head) variables get the gradient of that task's weighted loss,
    multiplied by the task's coefficient when `weights_heads` is true (methods
    whose weights are loss weights, such as GradNorm).

    Most methods combine the task gradients with coefficients found from
    their inner products alone: such a subclass implements
    `gram_weights(gram, losses, training, present)`, which returns the
    coefficients `w` from the `(T, T)` Gram matrix `G = J J^T`, and the
    direction is `w @ J`. Knowing this, a data-parallel trainer exchanges
    far less than the T task gradients: each replica sums one slice of the
    parameters' Jacobian, the partial Gram matrices are summed, and the
    slices of the direction are gathered. Methods whose direction is not
    such a combination (GradDrop) implement
    `aggregate(jacobian, losses, training, present)` instead. `present` is
    as for `LossWeighting`: an absent task's row is zero. Methods
    whose rule holds for the gradients of a shared representation (the
    tensor the heads read, far cheaper than the parameters) set
    `allows_representation = True`; the user then chooses with `wrt`.

    Evaluation has no gradients: there the objective and the logged weights
    come from `call`, the current loss weights (1 unless the method learns
    them).

    `aggregate` never raises on a Jacobian with NaN, infinite or overflowing
    entries: it returns a non-finite direction, which the model's guard
    drops with the step. The methods that solve or decompose the Gram matrix
    sanitise it first and make their result non-finite afterwards (see
    `keras_dwo.weighting.gram`). An all-zero Jacobian, or a zero row, gives
    finite weights and direction.

    Args:
        wrt: `"parameters"` (default): gradients with respect to the shared
            variables. `"representation"`: gradients with respect to the
            shared representation, for the methods that allow it; the
            direction found there is pulled back through the shared layers.
        **kwargs: Passed to `LossWeighting`.
    """

    needs_task_gradients = True
    weights_heads = False
    allows_representation = False

    def __init__(self, wrt="parameters", **kwargs):
        super().__init__(**kwargs)
        self.column_groups = None
        if wrt not in ("parameters", "representation"):
            raise ValueError(
                f"`wrt` must be 'parameters' or 'representation'; received {wrt!r}."
            )
        if wrt == "representation" and not self.allows_representation:
            raise ValueError(
                f"{type(self).__name__} needs the gradients of the shared "
                "parameters; it does not allow wrt='representation'."
            )
        self.wrt = wrt

    def build_columns(self, group_sizes):
        """Records the Jacobian's columns; a method with `column_state` makes its state.

        Methods that keep state per parameter (moving averages of the task
        gradients) or per layer set `column_state = True`: their variables'
        shapes depend on the shared variables, which the model knows only
        when it plans its first step. The model calls this then (and
        `TaskBalancer` before its first step); loading a saved method
        builds it from the shapes saved.

        Args:
            group_sizes: The number of columns of each shared layer, in the
                Jacobian's column order.
        """
        self.column_groups = tuple(int(size) for size in group_sizes)

    def column_groups_of_state(self, shapes):
        """The `group_sizes` that give a `column_state` method's saved state.

        By default the first variable that `build_columns` made is a
        `(T, P)` one (`per_column_weight`): one group of P columns.

        Args:
            shapes: The shapes of the variables that `build_columns` made,
                as saved.
        """
        return [shapes[0][-1]]

    def per_column_weight(self, name):
        """Adds a non-trainable `(T, P)` zero variable, one entry per task and column.

        For `build_columns`; see `column_state_weight`.
        """
        return self.column_state_weight(
            name, (self.num_tasks, sum(self.column_groups)), "shared parameters"
        )

    def column_state_weight(self, name, shape, counted="shared parameters"):
        """Adds a non-trainable zero variable whose shape depends on the columns.

        For `build_columns`: made once; a later call for another shape (the
        shared variables changed) is refused.

        Args:
            name: The attribute and variable name.
            shape: Its shape.
            counted: What the first dimension that can differ counts, for
                the error message.
        """
        existing = getattr(self, name, None)
        if existing is not None:
            if tuple(existing.shape) != tuple(shape):
                raise ValueError(
                    f"{type(self).__name__}'s state {name!r} has shape "
                    f"{tuple(existing.shape)}, made for other {counted} than "
                    f"the model's now ({tuple(shape)}). Build a new method for "
                    "the new shared layers."
                )
            return existing
        # Made after `build`, which locks the layer's state.
        locked = self._tracker.locked
        self._tracker.unlock()
        try:
            return self.add_weight(
                shape=shape, initializer="zeros", trainable=False, name=name
            )
        finally:
            if locked:
                self._tracker.lock()

    def checked_column_groups(self, jacobian):
        """Returns `column_groups`, checked against the Jacobian's columns."""
        groups = self.column_groups
        if groups is None or sum(groups) != jacobian.shape[1]:
            raise ValueError(
                f"{type(self).__name__} keeps state per shared parameter or "
                f"layer, built for the column groups {groups}; the Jacobian has "
                f"{jacobian.shape[1]} columns. Call `build_columns(group_sizes)` "
                "for these variables before the step (the model does at the "
                "start of `fit`, `TaskBalancer` at each step)."
            )
        return groups

    def load_own_variables(self, store):
        built = len(self._trainable_variables) + len(self._non_trainable_variables)
        stored = len(store.keys())
        if self.column_state and self.column_groups is None and stored > built:
            shapes = [store[str(index)].shape for index in range(built, stored)]
            self.build_columns(self.column_groups_of_state(shapes))
        super().load_own_variables(store)

    def call(self, losses, training=False, present=None):
        # An absent task's loss is 0 and has no gradient: the sum ignores it.
        del present
        return ops.sum(losses), ops.ones_like(losses)

    @property
    def weights_from_gram(self):
        """Whether the direction is `gram_weights(J J^T, ...) @ J`.

        True for the methods that implement `gram_weights` and leave
        `aggregate` as it is.
        """
        return type(self).aggregate is GradientWeighting.aggregate

    def gram_weights(self, gram, losses, training=True, present=None):
        """Returns the `(T,)` coefficients of the task gradients.

        Args:
            gram: Float32 `(T, T)` Gram matrix `J J^T` of the task
                gradients, as computed: an overflowing inner product makes
                entries infinite (see `keras_dwo.weighting.gram`).
            losses: Float32 `(T,)` tensor of the unweighted task losses.
            training: Whether the method may update its state.
            present: None, or a float `(T,)` mask that is 0 for the tasks
                without a label in the batch.

        Returns:
            The `(T,)` weights `w`; the direction is `w @ J`.
        """
        raise NotImplementedError(
            f"{type(self).__name__} must implement `gram_weights(gram, losses, "
            "training, present)` or `aggregate(jacobian, losses, training, "
            "present)`."
        )

    def aggregate(self, jacobian, losses, training=True, present=None):
        """Returns `(direction, weights)` for a `(T, P)` Jacobian.

        By default the weights are `gram_weights` of the Jacobian's Gram
        matrix and the direction is their combination of its rows (both NaN
        where the Gram matrix is not finite, so that the step is dropped).

        Args:
            jacobian: Float32 `(T, P)` tensor; row i is the gradient of task
                i's weighted loss with respect to the shared variables (or
                representation), flattened.
            losses: Float32 `(T,)` tensor of the unweighted task losses.
            training: Whether the method may update its state.
            present: None, or a float `(T,)` mask that is 0 for the tasks
                without a label in the batch.

        Returns:
            The `(P,)` direction and the `(T,)` coefficients of the task
            gradients in it (`direction = weights @ jacobian` where the
            direction is such a combination; see the method's docstring
            otherwise).
        """
        gram = ops.matmul(jacobian, ops.transpose(jacobian))
        weights = self.gram_weights(gram, losses, training=training, present=present)
        return combination(weights, jacobian, gram)

    def combine(self, jacobian, losses, present=None):
        """Returns the direction for a `(T, P)` Jacobian and `(T,)` losses.

        Usable without a model: an unbuilt method is built for `T` tasks
        named `task_0`, `task_1`, ... first. `present` is an optional `(T,)`
        0/1 mask of the tasks that take part (see `aggregate`). A Jacobian
        without rows (no task) gives a zero direction, as no task asks for
        a change.
        """
        jacobian = ops.convert_to_tensor(jacobian, "float32")
        losses = ops.convert_to_tensor(losses, "float32")
        if ops.shape(jacobian)[0] == 0:
            return ops.zeros(ops.shape(jacobian)[1:], jacobian.dtype)
        if self.task_names is None:
            self.build([f"task_{i}" for i in range(ops.shape(jacobian)[0])])
        if self.column_state and self.column_groups is None:
            self.build_columns([ops.shape(jacobian)[1]])
        return self.aggregate(jacobian, losses, training=True, present=present)[0]

    def get_config(self):
        return {**super().get_config(), "wrt": self.wrt}
