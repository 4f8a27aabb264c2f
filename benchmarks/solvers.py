"""Time of the combination rules alone, and of the two exact min-norm solvers.

Part C (every backend, the one `KERAS_BACKEND` picks): the median time of one
call of `method.aggregate` on a `(T, P)` Jacobian, P = 82,432 being the size
of the trunk of the network of `benchmarks/gradient_methods.py`, for T = 2, 4,
8, 16, 32, 40 and 64 and MGDA, UPGrad and CAGrad (`--methods` adds other
gradient-level methods whose rule is a function of the Jacobian alone, such as
imtl_g, aligned_mtl or nash_mtl). The call is compiled as the model's training
step compiles it: `jax.jit` on JAX, `tf.function` with the model's
`jit_compile` on TensorFlow, eager on PyTorch. It includes the Gram matrix
`J J^T` (`T^2 P` products) and the weighted sum of the rows (`T P`), which the
rule needs whatever solves it. The same table gives the solver alone, on the
`(T, T)` Gram matrix (`min_norm.simplex_min_norm` for MGDA,
`min_norm.lower_bounded_min_norm` for UPGrad's T problems,
`cagrad.worst_case_weights` for CAGrad's dual with c = 0.5), and, as the cost
of one backward pass, the training step of that network with
`weighting="equal"` (forward, one backward pass of the summed loss and Adam's
update: an upper bound of the backward pass). Target: at T = 40 the rule costs
less than one backward pass on JAX.

Part D: the crossover of the two exact solvers of
`keras_dwo.weighting.min_norm`, face enumeration (`2^T` batched solves) and
the active-set method (`nonnegative_min`, a loop of single solves), for the
three solvers above and T = 2 to 12. Each path is forced by replacing
`min_norm.enumeration_max_tasks` (64 for the enumeration, 0 for the active
set) around every call, which on JAX and TensorFlow is when the call is
traced. The table gives both times and the first T from which the active set
is faster at every larger T measured: `min_norm.ENUMERATION_MAX_TASKS` (op
by op: torch, TensorFlow without XLA) and `min_norm.XLA_ENUMERATION_MAX_TASKS`
(JAX, TensorFlow with `--jit-compile true`) come from it.

Part E (JAX, and TensorFlow with `--jit-compile true`): what the threshold
does to a whole training step. The step of the network of
`benchmarks/gradient_methods.py` (default sizes) with MGDA, UPGrad and CAGrad
at T = 4, 6, 8 and 10, traced once with the solvers enumerating up to
`min_norm.ENUMERATION_MAX_TASKS` tasks (the op-by-op limit) and once with the
backend's own (`min_norm.enumeration_max_tasks()`), measured side by side.
At T = 4 both enumerate: its ratios are the noise of the run.

The Jacobian has rows `(s_i (-1)^i c + n_i) / sqrt(P)`, with `c` and the
`n_i` standard normal and the scales `s_i` uniform in [0.5, 2]: gradients of
different sizes that conflict in pairs, so that the solutions have zero and
positive coefficients and the active set takes several steps.

Timing as in `benchmarks/gradient_methods.py` (its `measure`): every variant
runs once untimed, then `--rounds` rounds each time `--steps` consecutive
calls of every variant, in a new random order each round; the tables give
medians over the rounds, and each T is measured in its own block of rounds.
A call waits for its result (`jax.block_until_ready`, or a copy to numpy).
On the PyTorch backend the script calls `torch.set_num_threads(1)`, as the
other benchmarks do.

A variant that fails to build or to run is left out of the tables ("error")
and its traceback is printed after them.

Run it from the repository root, once per backend:

    KERAS_BACKEND=jax python benchmarks/solvers.py
    KERAS_BACKEND=torch python benchmarks/solvers.py
    KERAS_BACKEND=tensorflow python benchmarks/solvers.py --part C
    KERAS_BACKEND=jax python benchmarks/solvers.py --part D --steps 50
    KERAS_BACKEND=tensorflow python benchmarks/solvers.py --part D --jit-compile true
    KERAS_BACKEND=jax python benchmarks/solvers.py --part E --steps 10 --rounds 15

A run of both parts takes about 5 minutes per backend on a 2-core machine.
"""

import argparse
import contextlib
import json
import os
import time
import warnings

import numpy as np
from gradient_methods import FULL
from gradient_methods import INPUT_DIM
from gradient_methods import SEED
from gradient_methods import backend_version
from gradient_methods import build_runners
from gradient_methods import keras_batch
from gradient_methods import keras_runner
from gradient_methods import markdown_table
from gradient_methods import measure
from gradient_methods import package_version
from gradient_methods import synthetic_batch
from gradient_methods import task_names

SOLVE_TASKS = (2, 4, 8, 16, 32, 40, 64)
SOLVE_METHODS = ("mgda", "upgrad", "cagrad")
CROSSOVER_TASKS = tuple(range(2, 13))
TARGET_TASKS = 40
# The most tasks enumerated that forces each path.
PATHS = {"enumeration": 64, "active set": 0}
STEP_TASKS = (4, 6, 8, 10)
# The columns of Part E: the solvers' op-by-op limit, the backend's own.
STEP_LIMITS = ("op-by-op limit", "own limit")
CAGRAD_C = 0.5
# The solver of each method, on the `(T, T)` Gram matrix.
SOLVER_OF = {
    "mgda": "simplex_min_norm",
    "upgrad": "lower_bounded_min_norm",
    "cagrad": "worst_case_weights",
}


def trunk_size(sizes=FULL):
    """Number of shared parameters of the benchmark network: P."""
    return (INPUT_DIM + 1) * sizes.hidden + (sizes.hidden + 1) * sizes.hidden


def synthetic_jacobian(num_tasks, size, seed=SEED):
    """A `(T, P)` float32 Jacobian whose rows conflict in pairs (see above)."""
    rng = np.random.default_rng(seed)
    common = rng.normal(size=size)
    scales = rng.uniform(0.5, 2.0, size=num_tasks)
    signs = (-1.0) ** np.arange(num_tasks)
    rows = (scales * signs)[:, None] * common + rng.normal(size=(num_tasks, size))
    return (rows / np.sqrt(size)).astype("float32")


# ---------------------------------------------------------------- compiled calls


def step_jit_compile():
    """The `jit_compile` that `compile` resolves for the benchmark network."""
    from gradient_methods import QUICK
    from gradient_methods import build_keras_model

    return build_keras_model("equal", 2, QUICK).jit_compile


def compiled(function, jit_compile):
    """`function` compiled as the backend's training step is."""
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return jax.jit(function)
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.function(function, jit_compile=bool(jit_compile))
    return function


def wait(result):
    """Blocks until `result` is computed."""
    import keras

    if keras.backend.backend() == "jax":
        import jax

        jax.block_until_ready(result)
    else:
        keras.tree.map_structure(keras.ops.convert_to_numpy, result)


@contextlib.contextmanager
def enumeration_limit(limit):
    """Makes the solvers enumerate up to `limit` tasks (None: unchanged)."""
    from keras_dwo.weighting import min_norm

    saved = min_norm.enumeration_max_tasks
    if limit is not None:
        min_norm.enumeration_max_tasks = lambda: limit
    try:
        yield
    finally:
        min_norm.enumeration_max_tasks = saved


def call_runner(function, arguments, limit=None):
    """Returns `run(steps)`: calls `function(*arguments)` `steps` times, waits."""

    def run(steps):
        with enumeration_limit(limit):
            for _ in range(steps):
                result = function(*arguments)
            wait(result)

    return run


# ---------------------------------------------------------------- variants


def solver_functions():
    """`{name: function of a (T, T) Gram matrix}`: the solvers of `SOLVER_OF`."""
    from keras import ops

    from keras_dwo.weighting import cagrad
    from keras_dwo.weighting import min_norm

    def upgrad_problems(gram):
        return min_norm.lower_bounded_min_norm(gram, ops.eye(ops.shape(gram)[0]))

    def cagrad_dual(gram):
        # As `CAGrad.aggregate` with c = 0.5 and every task present.
        gram = min_norm.regularized_gram(gram)
        num_tasks = ops.shape(gram)[0]
        mean = ops.ones((num_tasks,)) / num_tasks
        radius = CAGRAD_C * ops.sqrt(ops.sum(mean * ops.matmul(gram, mean)))
        return cagrad.worst_case_weights(gram, mean, radius)

    return {
        "simplex_min_norm": min_norm.simplex_min_norm,
        "lower_bounded_min_norm": upgrad_problems,
        "worst_case_weights": cagrad_dual,
    }


def aggregate_runner(method, jacobian, losses, jit_compile):
    """Returns `run(steps)`: calls of `method.aggregate`, compiled."""
    import keras_dwo

    instance = keras_dwo.weighting.get(method)
    instance.build(task_names(jacobian.shape[0]))
    function = compiled(instance.aggregate, jit_compile)
    return call_runner(function, (jacobian, losses))


def gram_of(jacobian):
    """`J J^T` of a numpy Jacobian, as a backend tensor."""
    from keras import ops

    return ops.convert_to_tensor(jacobian @ jacobian.T)


def measure_solves(num_tasks, args, jit_compile, failures):
    """Part C for `num_tasks` tasks: `{label: median seconds per call}`."""
    from keras import ops

    jacobian = synthetic_jacobian(num_tasks, trunk_size())
    losses = ops.ones((num_tasks,))
    jacobian_tensor = ops.convert_to_tensor(jacobian)
    gram = gram_of(jacobian)
    solvers = solver_functions()
    factories = {
        ("step", "equal"): lambda: keras_runner(
            "equal", num_tasks, FULL, keras_batch(*synthetic_batch(num_tasks, FULL))
        )
    }
    for method in args.methods:
        factories["aggregate", method] = lambda method=method: aggregate_runner(
            method, jacobian_tensor, losses, jit_compile
        )
    for method, solver in SOLVER_OF.items():
        factories["solver", method] = lambda solver=solver: call_runner(
            compiled(solvers[solver], jit_compile), (gram,)
        )
    return measure_block(num_tasks, factories, args, failures)


def measure_crossover(num_tasks, args, jit_compile, failures):
    """Part D for `num_tasks` tasks: `{(path, solver): median seconds per call}`."""
    gram = gram_of(synthetic_jacobian(num_tasks, trunk_size()))

    def traced_apart(function):
        # The path is chosen when the call is traced, and `jax.jit` shares
        # the traces of one Python function among its wrappers: each path
        # compiles a function of its own.
        return lambda *arguments: function(*arguments)

    factories = {
        (path, name): lambda function=function, limit=limit: call_runner(
            compiled(traced_apart(function), jit_compile), (gram,), limit
        )
        for name, function in solver_functions().items()
        for path, limit in PATHS.items()
    }
    return measure_block(num_tasks, factories, args, failures)


def measure_steps(num_tasks, args, jit_compile, failures):
    """Part E for `num_tasks` tasks: `{(limit, method): median seconds per step}`."""
    from gradient_methods import FULL
    from gradient_methods import build_keras_model
    from gradient_methods import keras_batch
    from gradient_methods import synthetic_batch
    from overhead import step_runner

    from keras_dwo.weighting import min_norm

    batch = keras_batch(*synthetic_batch(num_tasks, FULL))

    def traced_with(limit, method):
        model = build_keras_model(method, num_tasks, FULL)
        model.jit_compile = jit_compile
        with enumeration_limit(limit):
            # The runner traces the step as it warms up.
            return step_runner(model, batch)

    limits = dict(zip(STEP_LIMITS, (min_norm.ENUMERATION_MAX_TASKS, None)))
    factories = {
        (label, method): lambda limit=limit, method=method: traced_with(limit, method)
        for method in SOLVER_OF
        for label, limit in limits.items()
    }
    return measure_block(num_tasks, factories, args, failures)


def measure_block(num_tasks, factories, args, failures):
    """Builds and measures `factories` together; failures keyed by T."""
    failed = {}
    runners = build_runners(factories, failed)
    medians = measure(runners, args.steps, args.rounds, failed)
    for label, trace in failed.items():
        failures[(num_tasks, *label)] = trace
    return medians


# ---------------------------------------------------------------- reporting


def milliseconds(results, num_tasks, label, failures):
    if (num_tasks, *label) in failures:
        return "error"
    value = results[num_tasks].get(label)
    return "—" if value is None else f"{1e3 * value:.3f}"


def ratio(results, num_tasks, numerator, denominator):
    top = results[num_tasks].get(numerator)
    bottom = results[num_tasks].get(denominator)
    return "—" if top is None or bottom is None else f"{top / bottom:.2f}"


def part_c(results, tasks, methods, failures):
    step = ("step", "equal")
    columns = [f"T={t}" for t in tasks]
    labels = [("aggregate", m) for m in methods]
    labels += [("solver", m) for m in SOLVER_OF]
    names = {("aggregate", m): f"{m}.aggregate" for m in methods} | {
        ("solver", m): f"{SOLVER_OF[m]} ({m})" for m in SOLVER_OF
    }
    ms_rows = [
        [names[label]] + [milliseconds(results, t, label, failures) for t in tasks]
        for label in labels
    ]
    ms_rows.append(
        ["equal step"] + [milliseconds(results, t, step, failures) for t in tasks]
    )
    ratio_rows = [
        [names[label]] + [ratio(results, t, label, step) for t in tasks]
        for label in labels
    ]
    text = (
        "Median ms per call (the rule on a (T, P) Jacobian, the solver on the "
        "(T, T) Gram matrix) and per equal-weighting training step:\n\n"
        + markdown_table(["call", *columns], ms_rows)
        + "\n\nCall / equal-weighting step (below 1: cheaper than one backward "
        "pass and the optimizer step):\n\n"
        + markdown_table(["call", *columns], ratio_rows)
    )
    if TARGET_TASKS in tasks:
        below = [
            names[label]
            for label in labels
            if label in results[TARGET_TASKS]
            and step in results[TARGET_TASKS]
            and results[TARGET_TASKS][label] < results[TARGET_TASKS][step]
        ]
        text += f"\n\nAt T={TARGET_TASKS}, cheaper than the equal-weighting step: " + (
            ", ".join(below) or "none"
        )
    return text


def crossover(results, tasks, solver):
    """First T of `tasks` from which the active set is faster at every T after."""
    first = None
    for t in tasks:
        times = [results[t].get((path, solver)) for path in PATHS]
        if None in times:
            continue
        enumeration, active = times
        if active < enumeration:
            first = t if first is None else first
        else:
            first = None
    return first


def part_d(results, tasks, failures):
    sections = []
    for solver in solver_functions():
        rows = [
            [t]
            + [milliseconds(results, t, (path, solver), failures) for path in PATHS]
            + [ratio(results, t, ("active set", solver), ("enumeration", solver))]
            for t in tasks
        ]
        first = crossover(results, tasks, solver)
        sections.append(
            f"`{solver}`, median ms per call:\n\n"
            + markdown_table(["T", *PATHS, "active set / enumeration"], rows)
            + "\n\nActive set faster from T="
            + (str(first) if first is not None else "— (not within the range)")
        )
    return "\n\n".join(sections)


def part_e(results, tasks, failures):
    rows = [
        [t, method]
        + [milliseconds(results, t, (label, method), failures) for label in STEP_LIMITS]
        + [ratio(results, t, *[(label, method) for label in reversed(STEP_LIMITS)])]
        for t in tasks
        for method in SOLVER_OF
    ]
    return "Median ms per step:\n\n" + markdown_table(
        ["T", "method", *STEP_LIMITS, "own / op-by-op"], rows
    )


def main():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n", 1)[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--part",
        choices=("C", "D", "E", "both"),
        default="both",
        help="Which part to run (default: both, C and D).",
    )
    for option, part, default in (
        ("--solve-tasks", "C", SOLVE_TASKS),
        ("--crossover-tasks", "D", CROSSOVER_TASKS),
        ("--step-tasks", "E", STEP_TASKS),
    ):
        parser.add_argument(
            option,
            type=int,
            nargs="+",
            default=list(default),
            help=f"Numbers of tasks of Part {part} (default: "
            f"{' '.join(map(str, default))}).",
        )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=list(SOLVE_METHODS),
        help="Methods of Part C (default: mgda upgrad cagrad).",
    )
    parser.add_argument(
        "--steps", type=int, default=5, help="Calls per measurement (default: 5)."
    )
    parser.add_argument(
        "--rounds", type=int, default=9, help="Timed rounds (default: 9)."
    )
    parser.add_argument(
        "--jit-compile",
        choices=("auto", "true", "false"),
        default="auto",
        help="TensorFlow: compile with XLA or not (default: auto, what the "
        "model's `compile` resolves: off on a CPU-only machine).",
    )
    parser.add_argument("--json", metavar="PATH", help="Also write the medians here.")
    args = parser.parse_args()
    tasks = args.solve_tasks + args.crossover_tasks + args.step_tasks
    if min(tasks) < 2 or args.steps < 1 or args.rounds < 1:
        parser.error(
            "Numbers of tasks must be at least 2, --steps and --rounds positive."
        )

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    warnings.filterwarnings("ignore", message=".*not DPP")
    import keras

    backend = keras.backend.backend()
    if backend == "torch":
        import torch

        torch.set_num_threads(1)
    jit_compile = (
        step_jit_compile() if args.jit_compile == "auto" else args.jit_compile == "true"
    )
    print(
        f"keras {keras.__version__}, backend {backend} {backend_version(backend)}, "
        f"keras-dwo {package_version('keras-dwo')}; P={trunk_size()}, "
        f"jit_compile={jit_compile}; {args.steps} calls per measurement, "
        f"{args.rounds} interleaved rounds",
        flush=True,
    )

    parts = {
        "C": (measure_solves, args.solve_tasks),
        "D": (measure_crossover, args.crossover_tasks),
        "E": (measure_steps, args.step_tasks),
    }
    selected = ("C", "D") if args.part == "both" else (args.part,)
    results, failures = {}, {}
    for part in selected:
        function, part_tasks = parts[part]
        results[part] = {}
        for num_tasks in part_tasks:
            start = time.perf_counter()
            results[part][num_tasks] = function(num_tasks, args, jit_compile, failures)
            print(
                f"Part {part}, T={num_tasks}: {time.perf_counter() - start:.0f} s",
                flush=True,
            )

    if "C" in results:
        print(f"\n## Part C: combination rules and solvers on {backend}\n")
        print(part_c(results["C"], args.solve_tasks, args.methods, failures))
    if "D" in results:
        print(f"\n## Part D: enumeration against active set on {backend}\n")
        print(part_d(results["D"], args.crossover_tasks, failures))
    if "E" in results:
        print(f"\n## Part E: training step with each threshold on {backend}\n")
        print(part_e(results["E"], args.step_tasks, failures))
    for (num_tasks, *label), trace in failures.items():
        print(f"\n### {' '.join(label)}, T={num_tasks} failed\n\n```\n{trace}```")

    if args.json:
        report = {
            "backend": backend,
            "keras": keras.__version__,
            "trunk_size": trunk_size(),
            "steps": args.steps,
            "rounds": args.rounds,
            "ms_per_call": {
                part: {
                    str(t): {"/".join(label): 1e3 * v for label, v in r.items()}
                    for t, r in part_results.items()
                }
                for part, part_results in results.items()
            },
            "failures": {
                f"{t}/{'/'.join(label)}": tb for (t, *label), tb in failures.items()
            },
        }
        with open(args.json, "w") as file:
            json.dump(report, file, indent=2)


if __name__ == "__main__":
    main()
