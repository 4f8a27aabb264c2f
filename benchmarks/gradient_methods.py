"""Step time of every weighting method, and against TorchJD and LibMTL.

The network is a multi-task MLP: 64 inputs, a shared trunk of two 256-unit
ReLU layers and T one-unit regression heads (mean squared error each), for
T = 2, 4 and 8 (with `--many`: T = 16, 32 and 64), trained with Adam
(learning rate 1e-3) on one synthetic batch of 256 samples whose targets pull
the trunk in partly opposite directions.

Part A (every backend, the one `KERAS_BACKEND` picks): for every method in
`keras_dwo.weighting.IDENTIFIERS` (aliases of the same method measured once),
the median time of a `DynamicWeightedModel` training step with that method,
divided by the median with `weighting="equal"`. Gradient-level methods take
one gradient per task, so their ratio shows what the per-task gradients and
the combination cost over a single backward pass.

Part B (only on the PyTorch backend, when the packages are installed): the
same network in plain PyTorch, with the same initial weights, data and
optimizer, trained with TorchJD (`mtl_backward` then `jac_to_grad` with the
matching aggregator) and with LibMTL's weighting classes (composed with its
hard-parameter-sharing architecture as LibMTL's trainer does). The ratios are
ours / theirs, ours being the Keras model on the PyTorch backend. Each side
uses its published default hyperparameters (CAGrad c = 0.5, GradNorm
alpha = 1.5, GradVac beta = 0.5, Nash-MTL 20 solver iterations and gradient
norm clipped to 1, ...). LibMTL's IMTL is the hybrid IMTL (IMTL-L loss scales
and IMTL-G), the closest it has to "imtl_g"; its GradDrop and its MGDA for
"mgda_ub" work on the gradients of the shared representation, as LibMTL
requires or allows.

What is timed: one measurement runs `--steps` consecutive training steps of
one variant. For the Keras models a step is a call of the train function
that Keras builds and `fit` calls (`model.make_train_function()`), after
`train_on_batch` has built the model and compiled the function (the step
loop of `benchmarks/overhead.py`, reused from there); it leaves
out the data adapter that `train_on_batch` rebuilds at every call and the
callbacks and progress bar of `fit`, costs that are the same for every method
and that the plain PyTorch loops do not have. On JAX it waits for the
results before it reads the clock. A PyTorch step is forward, backward and
`optimizer.step()`. Every variant runs once untimed, then `--rounds` rounds
each measure every variant once, in a new random order each round, so that
drift and noise from other work on the machine hit all variants alike; the
tables give medians over the rounds. Each T is measured in its own block of
rounds, so milliseconds compare across methods within a column, not across
columns, on a machine whose load changes. Everything runs in one process. On the
PyTorch backend the script calls `torch.set_num_threads(1)`, which is faster
for networks this small on CPU, and compiles our models with
`jit_compile=True` (`torch.compile` of the combination of the task
gradients, and of the forward pass with the task losses up to four tasks).

`--many` measures many tasks: T = 16, 32 and 64, the gradient-level methods
(and `equal`, the denominator) except PCGrad and GradVac, 2 steps per
measurement and 7 rounds. The loss-level methods cost about what `equal`
costs at every T. PCGrad and GradVac walk the `T (T - 1)` ordered task pairs
one after another, which at T = 64 is 4032 unrolled projections: a torch
step of several seconds, and minutes to build the JAX step; name them in
`--methods` to measure them. `--tasks`, `--methods`, `--steps` and
`--rounds` override the choices of `--many`.

A method that fails to build or to train is left out of the tables ("error")
and its traceback is printed after them.

Run it from the repository root, once per backend:

    KERAS_BACKEND=torch python benchmarks/gradient_methods.py
    KERAS_BACKEND=jax python benchmarks/gradient_methods.py
    KERAS_BACKEND=tensorflow python benchmarks/gradient_methods.py
    KERAS_BACKEND=torch python benchmarks/gradient_methods.py --tasks 4 \\
        --methods pcgrad upgrad --steps 10 --rounds 30
    KERAS_BACKEND=jax python benchmarks/gradient_methods.py --many
    KERAS_BACKEND=jax python benchmarks/gradient_methods.py --quick

`--quick` uses a tiny network and batch, T = 2, few steps and rounds: a smoke
test that finishes in about a minute. Part B needs
`pip install -r benchmarks/requirements.txt -c constraints.txt` (see there
for LibMTL).
"""

import argparse
import dataclasses
import gc
import importlib
import importlib.metadata
import importlib.util
import inspect
import json
import os
import random
import statistics
import sys
import time
import traceback
import types
import warnings

import numpy as np

INPUT_DIM = 64
LEARNING_RATE = 1e-3
SEED = 0


@dataclasses.dataclass(frozen=True)
class Sizes:
    hidden: int = 256
    batch: int = 256


FULL = Sizes()
QUICK = Sizes(hidden=32, batch=32)
MANY_TASKS = (16, 32, 64)


@dataclasses.dataclass(frozen=True)
class Reference:
    """The counterpart of one of our methods in TorchJD and in LibMTL.

    Attributes:
        torchjd: Name of the `torchjd.aggregation` aggregator, or None.
        torchjd_kwargs: Its arguments (`n_tasks` is added where it takes it).
        libmtl: Name of the `LibMTL.weighting` class, or None.
        libmtl_rep_grad: Whether LibMTL takes the gradients of the shared
            representation instead of the shared parameters.
        libmtl_kwargs: The keyword arguments of its `backward`.
    """

    torchjd: str | None = None
    torchjd_kwargs: dict = dataclasses.field(default_factory=dict)
    libmtl: str | None = None
    libmtl_rep_grad: bool = False
    libmtl_kwargs: dict = dataclasses.field(default_factory=dict)


REFERENCES = {
    "equal": Reference(libmtl="EW"),
    "gradnorm": Reference(libmtl="GradNorm", libmtl_kwargs={"alpha": 1.5}),
    "mgda": Reference(torchjd="MGDA", libmtl="MGDA", libmtl_kwargs={"mgda_gn": "none"}),
    "mgda_ub": Reference(
        libmtl="MGDA", libmtl_rep_grad=True, libmtl_kwargs={"mgda_gn": "none"}
    ),
    "pcgrad": Reference(torchjd="PCGrad", libmtl="PCGrad"),
    "cagrad": Reference(
        torchjd="CAGrad",
        torchjd_kwargs={"c": 0.5},
        libmtl="CAGrad",
        libmtl_kwargs={"calpha": 0.5, "rescale": 1},
    ),
    "imtl_g": Reference(torchjd="IMTLG", libmtl="IMTL"),
    "graddrop": Reference(
        torchjd="GradDrop",
        libmtl="GradDrop",
        libmtl_rep_grad=True,
        libmtl_kwargs={"leak": 0.0},
    ),
    "gradvac": Reference(
        torchjd="GradVac",
        torchjd_kwargs={"beta": 0.5},
        libmtl="GradVac",
        libmtl_kwargs={"GradVac_beta": 0.5, "GradVac_group_type": 0},
    ),
    "nash_mtl": Reference(
        torchjd="NashMTL",
        torchjd_kwargs={"max_norm": 1.0, "update_weights_every": 1, "optim_niter": 20},
        libmtl="Nash_MTL",
        libmtl_kwargs={"update_weights_every": 1, "optim_niter": 20, "max_norm": 1.0},
    ),
    "aligned_mtl": Reference(torchjd="AlignedMTL", libmtl="Aligned_MTL"),
    "upgrad": Reference(
        torchjd="UPGrad",
        libmtl="UPGrad",
        libmtl_kwargs={"UPGrad_norm_eps": 1e-4, "UPGrad_reg_eps": 1e-4},
    ),
    "dualproj": Reference(torchjd="DualProj"),
    "config": Reference(torchjd="ConFIG"),
    "fairgrad": Reference(libmtl="FairGrad", libmtl_kwargs={"FairGrad_alpha": 1.0}),
}


# ---------------------------------------------------------------- data, versions


def task_names(num_tasks):
    return [f"task_{i}" for i in range(num_tasks)]


def synthetic_batch(num_tasks, sizes, seed=SEED):
    """Inputs and one regression target per task.

    Each target is a noisy nonlinear function of a direction that mixes a
    common component with a task's own, with alternating signs, so that the
    task gradients on the trunk partly conflict.
    """
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(sizes.batch, INPUT_DIM)).astype("float32")
    common = rng.normal(size=INPUT_DIM)
    targets = {}
    for i, name in enumerate(task_names(num_tasks)):
        direction = (-1) ** i * common + rng.normal(size=INPUT_DIM)
        value = np.tanh(x @ direction / np.sqrt(INPUT_DIM))
        value = value + 0.1 * rng.normal(size=sizes.batch)
        targets[name] = value[:, None].astype("float32")
    return x, targets


def package_version(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def backend_version(backend):
    module = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}[backend]
    return importlib.import_module(module).__version__


# ---------------------------------------------------------------- Keras side


def registered_methods(selected=None):
    """Our identifiers in registry order, "equal" first, one per distinct method.

    Two identifiers name the same method when they give instances of the same
    class with the same configuration (apart from the layer name).
    """
    import keras_dwo

    identifiers = list(keras_dwo.weighting.IDENTIFIERS)
    if selected:
        unknown = sorted(set(selected) - set(identifiers))
        if unknown:
            raise SystemExit(
                f"Unknown method(s) {unknown}; registered: {sorted(identifiers)}."
            )
        identifiers = [name for name in identifiers if name in selected]
    identifiers = ["equal"] + [name for name in identifiers if name != "equal"]
    seen, methods = set(), []
    for name in identifiers:
        method = keras_dwo.weighting.get(name)
        config = {k: v for k, v in method.get_config().items() if k != "name"}
        key = (type(method), json.dumps(config, sort_keys=True, default=repr))
        if key not in seen:
            seen.add(key)
            methods.append(name)
    return methods


def method_level(name):
    import keras_dwo

    method = keras_dwo.weighting.get(name)
    return "gradient" if getattr(method, "needs_task_gradients", False) else "loss"


# Gradient-level methods whose step grows with the number of task pairs.
PAIRWISE = ("pcgrad", "gradvac")


def many_task_methods(methods):
    """`equal` and the gradient-level methods of `--many` among `methods`."""
    return [
        m
        for m in methods
        if m == "equal" or (method_level(m) == "gradient" and m not in PAIRWISE)
    ]


def keras_batch(x, targets):
    """`synthetic_batch`'s arrays as backend tensors."""
    import keras

    return (
        keras.ops.convert_to_tensor(x),
        {name: keras.ops.convert_to_tensor(t) for name, t in targets.items()},
    )


def build_keras_model(method, num_tasks, sizes, seed=SEED):
    """The MLP as a compiled DynamicWeightedModel; same weights for every method."""
    import keras

    import keras_dwo

    keras.utils.set_random_seed(seed)
    inputs = keras.Input(shape=(INPUT_DIM,), name="features")
    hidden = keras.layers.Dense(sizes.hidden, activation="relu", name="trunk_1")(inputs)
    hidden = keras.layers.Dense(sizes.hidden, activation="relu", name="trunk_2")(hidden)
    outputs = {
        name: keras.layers.Dense(1, name=name)(hidden) for name in task_names(num_tasks)
    }
    model = keras_dwo.DynamicWeightedModel(
        inputs, outputs, weighting=method, name=f"mlp_{method}"
    )
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=LEARNING_RATE),
        loss={name: "mse" for name in outputs},
        # On torch, the combination of the task gradients is compiled; the
        # other backends compile the whole step by default.
        jit_compile=True if keras.backend.backend() == "torch" else "auto",
    )
    return model


def dense_weights(model):
    """`{layer name: (kernel, bias)}` of the model's Dense layers, as numpy."""
    return {
        layer.name: tuple(np.asarray(w) for w in layer.get_weights())
        for layer in model.layers
        if layer.weights
    }


def keras_runner(method, num_tasks, sizes, batch):
    """Returns `run(steps)` for our model with `method` (built and warmed up)."""
    from overhead import step_runner

    return step_runner(build_keras_model(method, num_tasks, sizes), batch)


# ---------------------------------------------------------------- PyTorch side


def import_torchjd():
    """The `torchjd` package, or None."""
    if importlib.util.find_spec("torchjd") is None:
        return None
    return importlib.import_module("torchjd")


class _TorchWithSymeig(types.ModuleType):
    """`torch`, plus the `torch.symeig` that PyTorch 2 removed (as `eigh`)."""

    def __init__(self):
        super().__init__("torch")

    def __getattr__(self, name):
        import torch

        return getattr(torch, name)

    @staticmethod
    def symeig(matrix, eigenvectors=True):
        import torch

        del eigenvectors
        return torch.linalg.eigh(matrix)


def import_libmtl():
    """`(LibMTL.weighting, LibMTL.architecture.HPS)`, or None if not installed.

    `import LibMTL` runs the package's `__init__`, which imports its trainer
    and model zoo and with them torch_geometric and torchvision, neither of
    which the weighting classes use (and torchvision has no wheel for the CPU
    build of PyTorch on PyPI). So the package is registered as an empty module
    on its own path and only the two subpackages are imported. The Aligned-MTL
    class calls `torch.symeig`, which PyTorch 2 removed; that module alone
    gets a `torch` that maps it to `torch.linalg.eigh`.
    """
    spec = importlib.util.find_spec("LibMTL")
    if spec is None:
        return None
    if "LibMTL" not in sys.modules:
        package = types.ModuleType("LibMTL")
        package.__path__ = list(spec.submodule_search_locations)
        package.__spec__ = spec
        sys.modules["LibMTL"] = package
    weighting = importlib.import_module("LibMTL.weighting")
    hps = importlib.import_module("LibMTL.architecture.HPS").HPS
    aligned = sys.modules.get("LibMTL.weighting.Aligned_MTL")
    if aligned is not None:
        import torch

        try:
            torch.symeig(torch.eye(2), eigenvectors=True)
        except (AttributeError, RuntimeError):
            aligned.torch = _TorchWithSymeig()
    return weighting, hps


def torch_network(weights, num_tasks):
    """The trunk and the heads as torch modules, with the given Keras weights."""
    import torch

    def linear(name):
        kernel, bias = weights[name]
        layer = torch.nn.Linear(*kernel.shape)
        with torch.no_grad():
            layer.weight.copy_(torch.from_numpy(kernel.T.copy()))
            layer.bias.copy_(torch.from_numpy(bias))
        return layer

    trunk = torch.nn.Sequential(
        linear("trunk_1"), torch.nn.ReLU(), linear("trunk_2"), torch.nn.ReLU()
    )
    heads = {name: linear(name) for name in task_names(num_tasks)}
    return trunk, heads


def torch_batch(batch):
    import torch

    x, targets = batch
    return torch.from_numpy(x), {k: torch.from_numpy(v) for k, v in targets.items()}


def torchjd_runner(torchjd, reference, weights, batch, num_tasks):
    """Returns `run(steps)`: steps of `mtl_backward` with the TorchJD aggregator."""
    import torch
    import torch.nn.functional as F
    from torchjd.autojac import jac_to_grad
    from torchjd.autojac import mtl_backward

    aggregator_class = getattr(torchjd.aggregation, reference.torchjd)
    kwargs = dict(reference.torchjd_kwargs)
    if "n_tasks" in inspect.signature(aggregator_class).parameters:
        kwargs["n_tasks"] = num_tasks
    aggregator = aggregator_class(**kwargs)
    trunk, heads = torch_network(weights, num_tasks)
    head_modules = torch.nn.ModuleList(heads.values())
    optimizer = torch.optim.Adam(
        [*trunk.parameters(), *head_modules.parameters()], lr=LEARNING_RATE
    )
    x, targets = torch_batch(batch)
    ys = [targets[name] for name in heads]
    shared = list(trunk.parameters())

    def run(steps):
        for _ in range(steps):
            features = trunk(x)
            losses = [
                F.mse_loss(head(features), y) for head, y in zip(heads.values(), ys)
            ]
            mtl_backward(losses, features=features)
            jac_to_grad(shared, aggregator)
            optimizer.step()
            optimizer.zero_grad()

    return run


def libmtl_runner(libmtl, reference, weights, batch, num_tasks):
    """Returns `run(steps)`: steps of a LibMTL weighting class on the MLP.

    The model is the class composed with LibMTL's hard-parameter-sharing
    architecture, and a step is what LibMTL's trainer does for one batch:
    the per-task losses, `zero_grad(set_to_none=False)`, the method's
    `backward` and the optimizer step.
    """
    import torch
    import torch.nn.functional as F

    weighting, hps = libmtl
    weighting_class = getattr(weighting, reference.libmtl)
    trunk, heads = torch_network(weights, num_tasks)
    names = list(heads)

    class Model(hps, weighting_class):
        def __init__(self):
            super().__init__(
                task_name=names,
                encoder_class=lambda: trunk,
                decoders=torch.nn.ModuleDict(heads),
                rep_grad=reference.libmtl_rep_grad,
                multi_input=False,
                device=torch.device("cpu"),
            )
            self.init_param()

    model = Model()
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    x, targets = torch_batch(batch)

    def task_losses():
        predictions = model(x)
        return torch.stack([F.mse_loss(predictions[n], targets[n]) for n in names])

    # As after LibMTL's first epoch: GradNorm weighs the loss ratios to the
    # first epoch's losses and runs as equal weighting during that epoch.
    with torch.no_grad():
        first_losses = task_losses().numpy()
    model.epoch, model.epochs = 1, 2
    model.train_loss_buffer = np.stack([first_losses, first_losses], axis=1)

    def run(steps):
        for _ in range(steps):
            losses = task_losses()
            optimizer.zero_grad(set_to_none=False)
            model.backward(losses, **reference.libmtl_kwargs)
            optimizer.step()

    return run


# ---------------------------------------------------------------- measurement


def build_runners(factories, failures):
    """Calls each `label: factory()`; a failure is recorded and left out."""
    runners = {}
    for label, factory in factories.items():
        try:
            runners[label] = factory()
        except Exception:
            failures[label] = traceback.format_exc()
    return runners


def measure(runners, steps, rounds, failures, seed=SEED):
    """Median seconds per step of each runner, from interleaved rounds.

    Each runner first runs `steps` steps untimed. Each round then times
    `steps` steps of every runner, in a random order drawn per round. A
    runner that raises is recorded in `failures` and left out.
    """
    order = random.Random(seed)

    def call(label):
        try:
            runners[label](steps)
            return True
        except Exception:
            failures[label] = traceback.format_exc()
            return False

    labels = [label for label in runners if call(label)]
    times = {label: [] for label in labels}
    for _ in range(rounds):
        order.shuffle(labels)
        gc.collect()
        gc.disable()
        try:
            for label in labels:
                if label in failures:
                    continue
                start = time.perf_counter()
                if call(label):
                    times[label].append((time.perf_counter() - start) / steps)
        finally:
            gc.enable()
    return {
        label: statistics.median(samples)
        for label, samples in times.items()
        if samples and label not in failures
    }


def measure_tasks(num_tasks, methods, args, sizes, references, failures):
    """Builds every variant for `num_tasks` tasks and measures them together.

    Returns `{(side, method): median seconds per step}`, side being "ours",
    "torchjd" or "libmtl".
    """
    x, targets = synthetic_batch(num_tasks, sizes)
    batch = keras_batch(x, targets)
    factories = {
        ("ours", method): (
            lambda method=method: keras_runner(method, num_tasks, sizes, batch)
        )
        for method in methods
    }
    torchjd, libmtl = references
    if torchjd is not None or libmtl is not None:
        weights = dense_weights(build_keras_model("equal", num_tasks, sizes))
        for method, reference in REFERENCES.items():
            if args.methods and method not in methods:
                continue
            if torchjd is not None and reference.torchjd is not None:
                factories["torchjd", method] = lambda reference=reference: (
                    torchjd_runner(torchjd, reference, weights, (x, targets), num_tasks)
                )
            if libmtl is not None and hasattr(libmtl[0], reference.libmtl or "-"):
                factories["libmtl", method] = lambda reference=reference: libmtl_runner(
                    libmtl, reference, weights, (x, targets), num_tasks
                )
    failed = {}
    runners = build_runners(factories, failed)
    medians = measure(runners, args.steps, args.rounds, failed)
    for label, trace in failed.items():
        failures[(num_tasks, *label)] = trace
    return medians


# ---------------------------------------------------------------- reporting


def markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |"]
    lines.append("|" + "|".join("---" for _ in header) + "|")
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def cell(results, num_tasks, numerator, denominator=None, failures=()):
    """A ratio (or milliseconds without a denominator) as table text."""
    for label in filter(None, (numerator, denominator)):
        if (num_tasks, *label) in failures:
            return "error"
    value = results[num_tasks].get(numerator)
    if value is None:
        return "—"
    if denominator is None:
        return f"{1e3 * value:.2f}"
    base = results[num_tasks].get(denominator)
    return "—" if base is None else f"{value / base:.2f}"


def part_a(results, methods, tasks, failures):
    columns = [f"T={t}" for t in tasks]
    ratio_rows = [
        [m, method_level(m)]
        + [cell(results, t, ("ours", m), ("ours", "equal"), failures) for t in tasks]
        for m in methods
    ]
    ms_rows = [
        [m] + [cell(results, t, ("ours", m), failures=failures) for t in tasks]
        for m in methods
    ]
    return (
        "Step time with each method / step time with `equal` (medians):\n\n"
        + markdown_table(["method", "level", *columns], ratio_rows)
        + "\n\nMedian ms per step:\n\n"
        + markdown_table(["method", *columns], ms_rows)
    )


def part_b(results, methods, tasks, failures):
    sides = ("torchjd", "libmtl")
    names = {"torchjd": "TorchJD", "libmtl": "LibMTL"}
    measured = {label[1] for t in tasks for label in results[t]}
    measured |= {method for (_, _, method) in failures}
    rows = [m for m in REFERENCES if m in measured]
    ratio_rows, ms_rows = [], []
    for m in rows:
        reference = REFERENCES[m]
        ratio_rows.append(
            [m]
            + [
                cell(results, t, ("ours", m), (side, m), failures)
                for t in tasks
                for side in sides
            ]
        )
        ms_rows.append(
            [m, reference.torchjd or "—", reference.libmtl or "—"]
            + [
                " / ".join(
                    cell(results, t, (side, m), failures=failures)
                    for side in ("ours", *sides)
                )
                for t in tasks
            ]
        )
    ratio_header = ["method"] + [
        f"T={t} vs {names[side]}" for t in tasks for side in sides
    ]
    ms_header = ["method", "TorchJD", "LibMTL"] + [f"T={t}" for t in tasks]
    return (
        "Ours / theirs, step time (medians; below 1: ours is faster):\n\n"
        + markdown_table(ratio_header, ratio_rows)
        + "\n\nMedian ms per step, ours / TorchJD / LibMTL:\n\n"
        + markdown_table(ms_header, ms_rows)
    )


def main():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n", 1)[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--tasks",
        type=int,
        nargs="+",
        help="Numbers of tasks T (default: 2 4 8; 2 with --quick; 16 32 64 "
        "with --many).",
    )
    parser.add_argument(
        "--steps", type=int, help="Training steps per measurement (default: 5)."
    )
    parser.add_argument(
        "--rounds", type=int, help="Timed rounds over all variants (default: 15)."
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        help="Our identifiers to measure (default: every registered one); "
        "'equal' is always measured.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="Tiny network and batch (hidden 32, batch 32), T=2, 2 steps, "
        "3 rounds: a smoke test.",
    )
    parser.add_argument(
        "--many",
        action="store_true",
        help="Many tasks: T=16 32 64, the gradient-level methods but PCGrad "
        "and GradVac (and 'equal'), 2 steps, 7 rounds.",
    )
    parser.add_argument(
        "--hidden",
        type=int,
        help="Units of each trunk layer (default 256; 512 makes the network "
        "large enough that Keras's fixed cost per step does not decide).",
    )
    parser.add_argument("--json", metavar="PATH", help="Also write the medians here.")
    args = parser.parse_args()
    sizes = QUICK if args.quick else FULL
    if args.hidden is not None:
        if args.hidden < 1:
            parser.error("--hidden must be positive.")
        sizes = dataclasses.replace(sizes, hidden=args.hidden)
    if args.quick and args.many:
        parser.error("--quick and --many exclude each other.")
    default_tasks = [2] if args.quick else list(MANY_TASKS) if args.many else [2, 4, 8]
    args.tasks = args.tasks or default_tasks
    args.steps = args.steps or (2 if args.quick or args.many else 5)
    args.rounds = args.rounds or (3 if args.quick else 7 if args.many else 15)
    if min(args.tasks) < 2 or args.steps < 1 or args.rounds < 1:
        parser.error("--tasks must be at least 2, --steps and --rounds positive.")

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    # Both Nash-MTL implementations rebuild a cvxpy problem that warns once.
    warnings.filterwarnings("ignore", message=".*not DPP")
    import keras

    backend = keras.backend.backend()
    if backend == "torch":
        import torch

        torch.set_num_threads(1)
        # Each method and T compiles its combination once (`jit_compile`);
        # PyTorch keeps 8 compilations of a function per process by default
        # and runs the rest eagerly.
        torch._dynamo.config.recompile_limit = 1024
    print(
        f"keras {keras.__version__}, backend {backend} {backend_version(backend)}, "
        f"keras-dwo {package_version('keras-dwo')}, "
        f"torchjd {package_version('torchjd')}, LibMTL {package_version('LibMTL')}"
    )
    methods = registered_methods(args.methods and ["equal", *args.methods])
    if args.many and not args.methods:
        methods = many_task_methods(methods)
    references = (None, None)
    if backend == "torch":
        references = (import_torchjd(), import_libmtl())
        if references[1] is not None:
            available = [r.libmtl for r in REFERENCES.values() if r.libmtl]
            present = [
                n for n in dict.fromkeys(available) if hasattr(references[1][0], n)
            ]
            print(f"LibMTL weighting classes used: {', '.join(present)}")
    print(
        f"MLP {INPUT_DIM}-{sizes.hidden}-{sizes.hidden} with T mse heads, batch "
        f"{sizes.batch}, Adam; {args.steps} steps per measurement, "
        f"{args.rounds} interleaved rounds; methods: {', '.join(methods)}",
        flush=True,
    )

    results, failures = {}, {}
    for num_tasks in args.tasks:
        start = time.perf_counter()
        results[num_tasks] = measure_tasks(
            num_tasks, methods, args, sizes, references, failures
        )
        print(f"T={num_tasks}: {time.perf_counter() - start:.0f} s", flush=True)

    print("\n## Part A: keras-dwo on " + backend + "\n")
    print(part_a(results, methods, args.tasks, failures))
    if any(side != "ours" for t in results for side, _ in results[t]):
        print("\n## Part B: keras-dwo (torch backend) against TorchJD and LibMTL\n")
        print(part_b(results, methods, args.tasks, failures))
    for (num_tasks, side, method), trace in failures.items():
        print(f"\n### {side} {method}, T={num_tasks} failed\n\n```\n{trace}```")

    if args.json:
        report = {
            "backend": backend,
            "keras": keras.__version__,
            "sizes": dataclasses.asdict(sizes),
            "steps": args.steps,
            "rounds": args.rounds,
            "ms_per_step": {
                str(t): {f"{side}/{m}": 1e3 * v for (side, m), v in r.items()}
                for t, r in results.items()
            },
            "failures": {f"{t}/{s}/{m}": tb for (t, s, m), tb in failures.items()},
        }
        with open(args.json, "w") as file:
            json.dump(report, file, indent=2)


if __name__ == "__main__":
    main()
