"""The PyTorch training step."""

import contextlib
import inspect
import math

import keras
import torch
from keras.utils import unpack_x_y_sample_weight

from keras_dwo.aggregation import aggregate_blocks
from keras_dwo.trainers import torch_processes
from keras_dwo.trainers.scope import get_stateless_scope
from keras_dwo.trainers.stateful import StatefulTrainer
from keras_dwo.trainers.stateful import replicas_task_losses
from keras_dwo.trainers.torch_processes import process_count
from keras_dwo.trainers.torch_processes import sum_over_processes

# A gradient-level step differentiates each task's loss apart; through a
# compiled forward pass every such backward pass runs through all the task
# heads and losses, which costs more than compiling saves beyond a few tasks.
# Measured on benchmarks/gradient_methods.py's 64-512-512 trunk with one-unit
# heads (per-task gradients with the forward pass compiled / eager): 0.82 at
# T = 2, 0.86 at 4, 1.00 at 8, 1.44 at 32.
MOST_TASKS_WITH_COMPILED_FORWARD = 4


def _gradients(target, sources, **kwargs):
    if not sources:
        return []
    gradients = torch.autograd.grad(
        target, sources, retain_graph=True, allow_unused=True, **kwargs
    )
    return [torch.zeros_like(s) if g is None else g for g, s in zip(gradients, sources)]


STATELESS_OPTIMIZERS = True


def runs_under_xla():
    """Whether the ops built now run in one XLA computation: never on torch.

    Under `torch.compile` too, Keras's `while_loop` is a Python loop whose
    condition is read on the host, so it runs op by op.
    """
    return False


def value_and_jacobian(function, variables):
    """`value_and_jacobian` (see `keras_dwo.trainers`) by one backward per entry.

    Within a `keras.StatelessScope`, the variables' values there are the
    sources: they are made leaves that require gradients while `function`
    runs.
    """
    scope = get_stateless_scope()
    if scope is None:
        vector, aux = function()
        return vector.detach(), aux, _jacobian(vector, [v.value for v in variables])
    values = [v.value for v in variables]
    sources = [value.detach().requires_grad_() for value in values]
    scope.state_mapping.update(zip(map(id, variables), sources))
    try:
        vector, aux = function()
    finally:
        scope.state_mapping.update(zip(map(id, variables), values))
    return vector.detach(), aux, _jacobian(vector, sources)


def _jacobian(entries, sources, scales=None):
    """One `(T, ...)` tensor per source: the gradients of each of T scalars.

    Filled entry by entry: one entry's gradients at a time besides them.

    Args:
        entries: The T scalar tensors (or a `(T,)` tensor). A backward pass
            from an entry of a stacked vector runs through every stacked
            scalar's graph, so the scalars themselves are cheaper: T passes
            through T task heads each become T passes through one.
        sources: The tensors to differentiate with respect to.
        scales: None, or a `(T,)` tensor: row `i` is the gradient of
            `scales[i] * entries[i]`.
    """
    # Left uninitialised, each row written once: zeroing the rows first took
    # about 2 ms of a 45 ms step (T = 8, the 512 trunk of
    # benchmarks/gradient_methods.py), a pass over T gradients' memory.
    rows = [
        torch.empty((len(entries), *s.shape), dtype=s.dtype, device=s.device)
        for s in sources
    ]
    for index, entry in enumerate(entries):
        gradients = [None] * len(sources)
        if entry.requires_grad:
            gradients = torch.autograd.grad(
                entry,
                sources,
                grad_outputs=None if scales is None else scales[index],
                retain_graph=True,
                allow_unused=True,
            )
        for row, gradient in zip(rows, gradients):
            # None: the entry does not depend on the source (another task's head).
            if gradient is None:
                row[index].zero_()
            else:
                row[index] = gradient
        # Let go now, or the next entry's gradients are computed beside these.
        gradients = gradient = None
    return rows


@contextlib.contextmanager
def _retainable_compiled_graphs():
    """Compiles backward passes that allow the graph to be retained.

    A compiled backward pass may reuse ("donate") the buffers it saved,
    which it allows only for a graph that is not retained, and PyTorch may
    compile it at the first backward pass (for a new shape); the per-task
    backward passes retain the graph.
    """
    config = torch._functorch.config
    donated = config.donated_buffer
    config.donated_buffer = False
    try:
        yield
    finally:
        config.donated_buffer = donated


def values_are_finite(values):
    """Whether every float tensor in `values` is finite: a boolean tensor.

    One fused reduction for the common case: the L2 norms of all the
    tensors at once (`torch._foreach_norm`), finite if every entry is. A
    norm that is not finite (a non-finite entry, or finite entries whose
    squares overflow) is settled by the exact check of each tensor. Keras's
    ops, one `isfinite` and one `all` per tensor, cost a few hundred
    microseconds per step on CPU.
    """
    floats = [
        value
        for value in values
        if torch.is_floating_point(value) and value.numel() > 0
    ]
    if not floats:
        return torch.tensor(True)
    with torch.no_grad():
        norms = torch._foreach_norm(floats)
        if all(norm.dtype == norms[0].dtype for norm in norms):
            if bool(torch.isfinite(torch.stack(norms)).all()):
                return torch.tensor(True, device=floats[0].device)
        return torch.stack([torch.isfinite(value).all() for value in floats]).all()


def add_to_variables(variables, increments):
    """Adds each increment (a tensor or a number) to its variable, in place.

    One `torch._foreach_add_` for all of them: Keras's `assign_add` costs
    about 14 microseconds a variable on eager torch, an in-place add 2.5,
    and every step adds to five variables of its logs.
    """
    values = [variable.value for variable in variables]
    increments = [
        torch.as_tensor(increment, dtype=value.dtype, device=value.device)
        for increment, value in zip(increments, values)
    ]
    with torch.no_grad():
        torch._foreach_add_(values, increments)


_LOW_32_BITS = 0xFFFFFFFF


def _times(values, factor):
    """`values * factor` modulo 2**32, for int64 values below 2**32.

    A factor from 2**31 on is taken as its negative equivalent modulo
    2**32, so that no product overflows.
    """
    if factor >= 1 << 31:
        factor -= 1 << 32
    return (values * factor) & _LOW_32_BITS


def _mix_32_bits(values):
    """A bijective hash of int64 values below 2**32 (lowbias32)."""
    values = values ^ (values >> 16)
    values = _times(values, 0x7FEB352D)
    values = values ^ (values >> 15)
    values = _times(values, 0x846CA68B)
    return values ^ (values >> 16)


def uniform(seed_generator, shape):
    """Float32 draws from U[0, 1) of `shape`; advances `seed_generator`.

    Eagerly these are Keras's draws. Keras's torch draws seed a
    `torch.Generator` on the host, which `torch.compile` cannot trace: each
    draw broke a compiled combination of the task gradients into graphs
    (PCGrad's at T = 4 took 1.9 ms against 1.2 in one graph). Under
    `torch.compile` the draws are counter-based instead, in ops that it
    traces: entry i of the draw that the state `(seed, c)` keys is a hash
    of (seed, c, i), its 24 high bits scaled to [0, 1); the state then
    moves to `(seed, c + 1)`, as Keras's `SeedGenerator.next` moves it.
    Both are determined by the state, but they are not the same numbers.
    Eagerly the hash, a dozen passes over int64 values, took 6.9 ms for
    300k draws (one per shared parameter for GradDrop) against Keras's 2.7.
    """
    if not torch.compiler.is_compiling():
        return keras.random.uniform(shape, seed=seed_generator, dtype="float32")
    state = seed_generator.state.value
    seed, counter = state.to(torch.int64)
    seed_generator.state.assign(state + torch.tensor([0, 1], dtype=state.dtype))
    key = _mix_32_bits(_mix_32_bits(seed & _LOW_32_BITS) ^ counter)
    index = torch.arange(math.prod(shape), dtype=torch.int64, device=state.device)
    bits = _mix_32_bits(
        _mix_32_bits((index + _times(key, 0x9E3779B9)) & _LOW_32_BITS) ^ key
    )
    return ((bits >> 8).to(torch.float32) / float(1 << 24)).reshape(shape)


def run_if(condition, function):
    """Runs `function()` if the scalar boolean tensor `condition` is true."""
    if bool(condition):
        function()


def _aggregate_over_processes(method, blocks, losses, **presence):
    """`aggregate_blocks` for each process's own task gradients.

    For a method that combines the task gradients by their inner products:
    each process sums its slice of the Jacobian's columns over the
    processes, the partial Gram matrices are summed, and the slices of the
    direction are gathered, which sends about half the elements of an
    all-reduce of the Jacobian and gives every process the same direction.
    """
    sizes = [block.shape[1] for block in blocks]
    own = torch_processes.sum_scattered(torch.cat(blocks, dim=1))
    (direction,), weights = aggregate_blocks(
        method, [own], losses, sum_over_processes, **presence
    )
    direction = torch_processes.gather_scattered(direction, sum(sizes))
    return torch.split(direction, sizes), weights


class TorchTrainer(StatefulTrainer):
    """`train_step` for the PyTorch backend (eager).

    A loss-level method takes one backward pass. A gradient-level method
    takes one `torch.autograd.grad` per task through the shared part of the
    graph, then one through the task-specific part. The step is applied only
    if `step_is_finite`; otherwise the method's state is put back.

    The steps run eagerly. With `jit_compile=True`, parts of the step are
    compiled with `torch.compile` (and compiled again by PyTorch for a new
    shape): the optimizer's update, the method's combination of the task
    gradients, the update of the logs and metrics (in one call with the
    update where nothing runs between them: no missing labels, no update
    of the method after the step), and the forward pass
    with the task losses for a loss-level method or a gradient-level one
    with at most `MOST_TASKS_WITH_COMPILED_FORWARD` tasks (with
    `wrt="representation"`, the trunk and the heads apart, since the step
    differentiates with respect to the trunk's outputs). Through a compiled
    forward pass the task-specific gradients come from the per-task passes.
    The whole step, compiled as Keras compiles a plain model's, breaks into
    graphs at its per-task backward passes and host checks and is no
    faster.

    When a `torch.distributed` process group is initialized (one process per
    device, as `torchrun` starts them), the processes train data-parallel,
    each on its own shard of every batch: the task losses are combined over
    the processes, weighted by their (labelled) samples, and the gradients
    are summed, the per-task gradients before the method combines them (a
    representation's, whose rows are samples, are gathered; a method that
    combines them by their inner products gets each process's slice of the
    sum and the summed Gram matrix instead), so that every
    process takes the step that one process would take on the whole batch
    and the method's state stays the same on every process.
    `DistributedDataParallel` is not used: its hooks do not fire in a step
    that calls `torch.autograd.grad`.
    """

    def _should_torch_compile(self):
        # Keras's `torch.compile` of the whole step: see the class docstring.
        return False

    def _compiled(self, method):
        """`method` (a bound method) under `torch.compile`, compiled once."""
        compiled = self.__dict__.setdefault("_torch_compiled", {})
        if method.__name__ not in compiled:
            compiled[method.__name__] = torch.compile(method)
        return compiled[method.__name__]

    def _compiles(self):
        # With several processes the steps run eagerly.
        return bool(self.jit_compile) and process_count() == 1

    def _compiles_forward(self, uses_task_gradients):
        """Whether this step's forward pass and task losses are compiled."""
        if not self._compiles():
            return False
        return (
            not uses_task_gradients
            or len(self.task_names) <= MOST_TASKS_WITH_COMPILED_FORWARD
        )

    def _outputs_and_losses(self, inputs, y, sample_weight, model):
        """`model`'s outputs on `inputs` and each task's loss on them."""
        y_pred = model(inputs, training=True)
        if model is not self:
            y_pred = self.outputs_like_model(y_pred)
        return y_pred, self.compute_each_task_loss(y, y_pred, sample_weight)

    def _representation(self, x):
        """The gradient plan's trunk's outputs on `x`, flattened."""
        return keras.tree.flatten(self.gradient_plan().trunk(x, training=True))

    def fit(self, x=None, y=None, *args, **kwargs):
        self._copied_from_first_process = False
        if process_count() > 1:
            arguments = inspect.signature(keras.Model.fit).bind(
                self, x, y, *args, **kwargs
            )
            self._check_same_steps(arguments.arguments)
        return super().fit(x, y, *args, **kwargs)

    def _check_same_steps(self, fit_arguments):
        # A process with a step more than the others would wait for them
        # forever in that step's first exchange.
        # Imported here: keras_dwo.model imports this module.
        from keras_dwo.model import _batch_size
        from keras_dwo.model import _is_arrays

        x = fit_arguments.get("x")
        if not _is_arrays(x) or fit_arguments.get("steps_per_epoch") is not None:
            return
        samples = _batch_size(x)
        split = fit_arguments.get("validation_split") or 0.0
        samples = math.ceil(samples * (1.0 - split))
        batch_size = fit_arguments.get("batch_size") or 32
        steps = math.ceil(samples / batch_size)
        fewest, most = torch_processes.range_over_processes(steps)
        if fewest != most:
            raise ValueError(
                f"Every process must take the same number of steps per epoch, "
                f"but with batch_size={batch_size} they take from {fewest} to "
                f"{most}: give each process a shard of the same length, or "
                "pass steps_per_epoch."
            )

    def global_task_losses(self, task_losses, label_counts, x):
        processes = process_count()
        if processes == 1:
            return task_losses, label_counts, 1
        losses, label_counts = replicas_task_losses(
            task_losses, label_counts, x, processes, sum_over_processes
        )
        return losses, label_counts, processes

    def get_metrics_result(self):
        """The metrics over every process's samples.

        The compiled metrics are summed over the processes for the result and
        then put back, so that each process keeps counting its own samples;
        the loss and task logs are already global.
        """
        if process_count() == 1:
            return super().get_metrics_result()
        own = (self._loss_tracker, getattr(self, "task_tracker", None))
        variables = [
            v
            for metric in self.metrics
            if not any(metric is m for m in own)
            for v in metric.variables
        ]
        local = [v.value.clone() for v in variables]
        for variable, total in zip(variables, sum_over_processes(local)):
            variable.assign(total)
        results = keras.tree.map_structure(
            lambda value: value.clone() if torch.is_tensor(value) else value,
            super().get_metrics_result(),
        )
        for variable, value in zip(variables, local):
            variable.assign(value)
        return results

    def _objective_gradients(self, task_losses, label_counts, processes):
        objective, weights = self.compute_objective(
            task_losses, training=True, label_counts=label_counts
        )
        variables = [v.value for v in self.trainable_variables]
        scaled = self.optimizer.scale_loss(objective / processes)
        gradients = _gradients(scaled, variables)
        if processes > 1:
            gradients = sum_over_processes(gradients)
        return objective, weights, gradients

    def _combined_gradients(
        self, each_loss, own_losses, task_losses, label_counts, processes, trunk_output
    ):
        plan = self.gradient_plan()
        variables = [v.value for v in self.trainable_variables]
        shared = [variables[i] for i in plan.shared_indices]
        others = [variables[i] for i in plan.other_indices]
        scaled_losses = self.optimizer.scale_loss(
            self.task_weights.value * task_losses / processes
        )
        # Each task differentiated from its own loss (`each_loss`, stacked
        # into `own_losses`), scaled as in `scaled_losses`: every map from
        # the stacked losses to those is elementwise. With one process it is
        # a product by the task weights and the loss scale, whose factors
        # need no backward pass.
        if task_losses is own_losses:
            scales = self.optimizer.scale_loss(self.task_weights.value)
        else:
            (scales,) = _gradients(
                scaled_losses,
                [own_losses],
                grad_outputs=torch.ones_like(scaled_losses),
            )
        sources = shared if trunk_output is None else trunk_output
        # Through a forward pass compiled into one node, a backward pass of
        # their own for the task-specific variables would run through the
        # whole graph again: their rows come from the tasks' passes instead.
        compiled_forward = self._compiles_forward(uses_task_gradients=True)
        rows = _jacobian(
            each_loss, sources + (others if compiled_forward else []), scales
        )
        task_gradients, other_rows = rows[: len(sources)], rows[len(sources) :]
        aggregate = aggregate_blocks
        if processes > 1 and trunk_output is None:
            if self.weighting.weights_from_gram:
                aggregate = _aggregate_over_processes
            else:
                task_gradients = sum_over_processes(task_gradients)
        elif processes > 1:
            # The representation's rows are samples: the processes' rows
            # together are the whole batch's.
            task_gradients, start, size = torch_processes.gather_over_processes(
                task_gradients, axis=1
            )
        objective, _ = self.compute_objective(
            task_losses.detach(), label_counts=label_counts
        )
        combination = self.combine_task_gradients
        if self._compiles():
            combination = self._compiled(combination)
        combined, weights, head_weights = combination(
            task_gradients, task_losses.detach(), label_counts, aggregate
        )
        if trunk_output is not None:
            if processes > 1:
                combined = [c[start : start + size] for c in combined]
            combined = _gradients(trunk_output, shared, grad_outputs=combined)
        if compiled_forward:
            other_gradients = [
                torch.tensordot(head_weights.to(row.dtype), row, dims=1)
                for row in other_rows
            ]
        else:
            other_gradients = _gradients(
                scaled_losses, others, grad_outputs=head_weights
            )
        if processes > 1 and trunk_output is None:
            other_gradients = sum_over_processes(other_gradients)
        elif processes > 1:
            summed = sum_over_processes(other_gradients + combined)
            other_gradients, combined = summed[: len(others)], summed[len(others) :]
        gradients = [None] * len(variables)
        for index, gradient in zip(plan.shared_indices, combined):
            gradients[index] = gradient
        for index, gradient in zip(plan.other_indices, other_gradients):
            gradients[index] = gradient
        # The same on every process: neither divided nor summed.
        regularization = self.regularization_loss()
        if regularization is not None:
            scaled = self.optimizer.scale_loss(regularization)
            gradients = [
                g + r for g, r in zip(gradients, _gradients(scaled, variables))
            ]
        return objective, weights, gradients

    def guarded_optimizer_apply(self, applied, gradients, compiled=True):
        """Applies the gradients if `applied`.

        A `LossScaleOptimizer` is handed non-finite gradients instead of a
        skipped step, so that it lowers its loss scale as it does for a
        plain model. `compiled=False` applies them eagerly even with
        `jit_compile=True`.
        """
        variables = self.trainable_variables
        apply = self._optimizer_apply
        if compiled and self._compiles():
            apply = self._compiled_optimizer_apply
        if applied:
            apply(gradients, variables)
        elif isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
            apply([torch.full_like(g, float("nan")) for g in gradients], variables)

    def _optimizer_apply(self, gradients, variables):
        self.optimizer.apply(gradients, variables)

    def _compiled_optimizer_apply(self, gradients, variables):
        """`optimizer.apply` under `torch.compile`, its updates fused.

        Keras's torch optimizers update with one `torch._foreach_*`
        operation after another, a pass over every variable each; compiled,
        Adam's update of a 300k-parameter network took 0.5 ms against 1.4
        eagerly. Keras's SGD hands its learning rate, a tensor, to an
        operation that takes a number: captured as a scalar of the graph,
        not read on the host, it leaves the update one graph.
        """
        with torch._dynamo.config.patch(capture_scalar_outputs=True):
            self._compiled(self._optimizer_apply)(gradients, variables)

    def _copy_from_first_process(self):
        """Starts every process from process 0's variables, as DDP does."""
        if getattr(self, "_copied_from_first_process", False):
            return
        variables = list(self.variables)
        if self.optimizer.built:
            variables += self.optimizer.variables
        torch_processes.copy_from_first_process(variables)
        self._copied_from_first_process = True

    def train_step(self, data):
        if not self._compiles():
            return self._train_step(data)
        with _retainable_compiled_graphs():
            return self._train_step(data)

    def _train_step(self, data):
        x, y, sample_weight = unpack_x_y_sample_weight(data)
        if process_count() > 1:
            self._copy_from_first_process()
        uses_task_gradients = self.uses_task_gradients()
        compiles_forward = self._compiles_forward(uses_task_gradients)
        representation, outputs_and_losses = (
            self._representation,
            self._outputs_and_losses,
        )
        if compiles_forward:
            # The trunk apart: the steps differentiate with respect to its outputs.
            representation = self._compiled(representation)
            outputs_and_losses = self._compiled(outputs_and_losses)
        trunk_output = None
        inputs, model = x, self
        if uses_task_gradients and self.gradient_plan().trunk is not None:
            trunk_output = representation(x)
            inputs, model = trunk_output, self.gradient_plan().heads
        y_pred, each_loss = outputs_and_losses(inputs, y, sample_weight, model)
        own_losses = torch.stack(each_loss)
        task_losses, label_counts, processes = self.global_task_losses(
            own_losses, self.count_task_labels(y, sample_weight), x
        )
        detached = task_losses.detach()
        state = self.weighting.non_trainable_variables
        previous = [v.value.clone() for v in state]
        if uses_task_gradients:
            objective, weights, gradients = self._combined_gradients(
                each_loss,
                own_losses,
                task_losses,
                label_counts,
                processes,
                trunk_output,
            )
        else:
            objective, weights, gradients = self._objective_gradients(
                task_losses, label_counts, processes
            )
        objective = objective.detach()
        finite = self.step_is_finite(
            detached, objective, gradients, [v.value for v in state]
        )
        applied = bool(finite)
        record_arguments = (
            objective,
            detached,
            weights,
            x,
            y,
            y_pred,
            sample_weight,
            label_counts,
            finite,
        )
        merged = self._merges_update_and_logs(label_counts)
        if merged and applied:
            with (
                torch.no_grad(),
                torch._dynamo.config.patch(capture_scalar_outputs=True),
            ):
                return self._compiled(self._apply_and_record)(
                    gradients, self.trainable_variables, *record_arguments
                )
        with torch.no_grad():
            self.apply_keeping_absent_tasks(
                lambda: self.guarded_optimizer_apply(
                    applied, gradients, compiled=not merged
                ),
                label_counts,
            )
            keep_state = applied
            if applied and self.weighting.updates_after_step:
                self.update_weighting_after_step(
                    x, y, sample_weight, detached, label_counts
                )
                keep_state = bool(self.values_are_finite([v.value for v in state]))
            if not keep_state:
                for variable, value in zip(state, previous):
                    variable.assign(value)
        finish = self._record_and_report
        if self._compiles() and not merged:
            finish = self._compiled(finish)
        # `finite`, a tensor, not `applied`: a compiled call specialises on a
        # Python bool, and would compile again at the first skipped step.
        with torch.no_grad():
            return finish(*record_arguments)

    def _merges_update_and_logs(self, label_counts):
        """Whether an applied step's update and logs are one compiled call.

        They are where nothing runs between them (no missing labels, no
        update of the method after the step): one call saved about 0.4 ms
        of a 14 ms step (UPGrad, T = 2, benchmarks/gradient_methods.py's 512
        trunk). A skipped step then ends eagerly, since compiling its end
        apart would take seconds in the middle of training.
        """
        return (
            self._compiles()
            and label_counts is None
            and not self.weighting.updates_after_step
        )

    def _apply_and_record(self, gradients, variables, *record_arguments):
        """`optimizer.apply`, then `_record_and_report(*record_arguments)`."""
        self._optimizer_apply(gradients, variables)
        return self._record_and_report(*record_arguments)

    def _record_and_report(
        self,
        objective,
        task_losses,
        weights,
        x,
        y,
        y_pred,
        sample_weight,
        label_counts,
        applied,
    ):
        """Updates the logs and returns the metrics' results."""
        self.record_step(objective, task_losses, weights, x, label_counts, applied)
        return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
