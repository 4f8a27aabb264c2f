"""The two-task toy landscape of CAGrad, Nash-MTL and FAMO.

Liu et al. (CAGrad, 2021) built a two-dimensional problem, `theta = (t1, t2)`,
whose two losses have conflicting, badly scaled gradients; Navon et al.
(Nash-MTL, 2022) and Liu et al. (FAMO, 2023) reused it with the first loss
scaled by 0.1. As their published code defines it:

    f1 = log(max(|0.5 (-t1 - 7) - tanh(-t2)|, 5e-6)) + 6
    f2 = log(max(|0.5 (-t1 + 3) + tanh(-t2) + 2|, 5e-6)) + 6
    g1 = ((-t1 + 7)^2 + 0.1 (-t2 - 8)^2) / 10 - 20
    g2 = ((-t1 - 7)^2 + 0.1 (-t2 - 8)^2) / 10 - 20
    c1 = max(tanh(0.5 t2), 0),  c2 = max(tanh(-0.5 t2), 0)
    L1 = 0.1 (c1 f1 + c2 g1),  L2 = c1 f2 + c2 g2

Above `t2 = 0` the losses are logarithmic valleys; below, two quadratic
bowls whose minima are 14 apart. The Pareto front is the segment
`t2 = -8.3552`, `t1` in [-7, 7]. From five starts, Adam with learning rate
1e-3 runs 35,000 steps. The papers report that equal weights get stuck from
some starts, that MGDA reaches the front but near one end, and that Nash-MTL
and FAMO reach it from every start, well spread.

Here `theta` is a Keras variable in a layer whose two outputs are the losses,
and every method of the library trains it through `DynamicWeightedModel.fit`
(one step per batch of one dummy sample). The losses are lowered by their
bounds (-2.1, -21), as FAMO's code does for FAMO: this changes no gradient,
and it keeps the losses positive for the methods that take their logarithm
(FAMO, GLS, scale-invariant, IMTL-L) or their ratios (DWA, GradNorm,
uncertainty weighting). FAMO runs with `gamma = 0`, as its code sets for
this problem; every other method runs with the library's defaults. MGDA-UB
is left out: the losses read `theta` directly, so there is no shared
representation to take gradients at.

    python benchmarks/toy_landscape.py            # full: every method
    python benchmarks/toy_landscape.py --quick    # equal, Nash-MTL, FAMO

It writes `toy_landscape.png` (one panel per method: the trajectories over
the contours of L1 + L2) and `toy_landscape.json` (the end points) into
`--output`. `--quick` runs 12,000 steps at learning rate 3e-3 (about the
same distance; at 1e-2 FAMO's path does not settle on the front in time)
and checks the papers' claims: Nash-MTL and FAMO reach the front from all
five starts, equal weights do not from at least one.
"""

import argparse
import json
import pathlib
import sys

import keras
import numpy as np
from keras import ops
from matplotlib.figure import Figure

import keras_dwo

STARTS = ((-8.5, 7.5), (0.0, 0.0), (9.0, 9.0), (-7.5, -0.5), (9.0, -1.0))
LOSS_BOUNDS = (-2.1, -21.0)
FRONT_T2 = -8.3552
FRONT_T1 = (-7.0, 7.0)
# A start has reached the front when its end point is this close to it.
FRONT_TOLERANCE = 0.25
STEPS_PER_EPOCH = 500
RECORD_EVERY = 50
METHODS = {
    "equal": "equal",
    "uncertainty": "uncertainty",
    "rlw": "rlw",
    "dwa": "equal",
    "gls": "gls",
    "scale_invariant": "scale_invariant",
    "imtl_l": "imtl_l",
    "famo": keras_dwo.weighting.FAMO(gamma=0.0),
    "famo_next_batch": keras_dwo.weighting.FAMO(gamma=0.0, update="next_batch"),
    "stch": "stch",
    "gradnorm": "gradnorm",
    "mgda": "mgda",
    "pcgrad": "pcgrad",
    "cagrad": "cagrad",
    "imtl_g": "imtl_g",
    "graddrop": "graddrop",
    "gradvac": "gradvac",
    "nash_mtl": "nash_mtl",
    "aligned_mtl": "aligned_mtl",
    "upgrad": "upgrad",
    "dualproj": "dualproj",
    "config": "config",
    "fairgrad": "fairgrad",
    "db_mtl": "db_mtl",
    "moco": "moco",
    "excess_mtl": "excess_mtl",
    "modo": "modo",
    "sdmgrad": "sdmgrad",
}
QUICK_METHODS = ("equal", "nash_mtl", "famo")


def landscape(t1, t2):
    """Returns the two losses at `theta = (t1, t2)` (any shapes alike)."""
    f1 = ops.log(ops.maximum(ops.abs(0.5 * (-t1 - 7.0) - ops.tanh(-t2)), 5e-6)) + 6.0
    f2 = (
        ops.log(ops.maximum(ops.abs(0.5 * (-t1 + 3.0) + ops.tanh(-t2) + 2.0), 5e-6))
        + 6.0
    )
    g1 = (ops.square(-t1 + 7.0) + 0.1 * ops.square(-t2 - 8.0)) / 10.0 - 20.0
    g2 = (ops.square(-t1 - 7.0) + 0.1 * ops.square(-t2 - 8.0)) / 10.0 - 20.0
    c1 = ops.maximum(ops.tanh(0.5 * t2), 0.0)
    c2 = ops.maximum(ops.tanh(-0.5 * t2), 0.0)
    return 0.1 * (c1 * f1 + c2 * g1), c1 * f2 + c2 * g2


class ToyLandscape(keras.layers.Layer):
    """Holds `theta` and returns each sample's two losses, lowered by their bounds."""

    def __init__(self, start, **kwargs):
        super().__init__(**kwargs)
        self.start = tuple(start)

    def build(self, input_shape):
        self.theta = self.add_weight(
            shape=(2,),
            initializer=keras.initializers.Constant(self.start),
            name="theta",
        )

    def call(self, inputs):
        losses = landscape(self.theta[0], self.theta[1])
        ones = ops.ones_like(inputs)
        return [ones * (loss - bound) for loss, bound in zip(losses, LOSS_BOUNDS)]


def loss_value(y_true, y_pred):
    """The model's output is the loss itself."""
    del y_true
    return ops.mean(y_pred, axis=-1)


def build_model(start, weighting):
    inputs = keras.Input(shape=(1,))
    first, second = ToyLandscape(start)(inputs)
    outputs = {
        "L1": keras.layers.Identity(name="L1")(first),
        "L2": keras.layers.Identity(name="L2")(second),
    }
    return keras_dwo.DynamicWeightedModel(inputs, outputs, weighting=weighting)


class ThetaRecorder(keras.callbacks.Callback):
    """Records `theta` every RECORD_EVERY steps."""

    def __init__(self, theta):
        super().__init__()
        self.theta = theta
        self.path = [keras.ops.convert_to_numpy(theta).tolist()]

    def on_train_batch_end(self, batch, logs=None):
        if int(self.model.optimizer.iterations) % RECORD_EVERY == 0:
            self.path.append(keras.ops.convert_to_numpy(self.theta).tolist())


def run(method, start, steps, learning_rate):
    """Returns the path of `theta` (every RECORD_EVERY steps) from one start."""
    weighting = METHODS[method]
    if isinstance(weighting, keras_dwo.weighting.LossWeighting):
        weighting = weighting.__class__.from_config(weighting.get_config())
    keras.utils.set_random_seed(0)
    model = build_model(start, weighting)
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss={"L1": loss_value, "L2": loss_value},
        # torch trains one step per call.
        steps_per_execution=1 if keras.backend.backend() == "torch" else RECORD_EVERY,
    )
    theta = next(v for v in model.trainable_variables if v.path.endswith("theta"))
    recorder = ThetaRecorder(theta)
    callbacks = [recorder]
    if method == "dwa":
        callbacks.append(keras_dwo.callbacks.DynamicWeightAverage())
    dummy = np.zeros((STEPS_PER_EPOCH, 1), "float32")
    model.fit(
        dummy,
        {"L1": dummy, "L2": dummy},
        batch_size=1,
        epochs=steps // STEPS_PER_EPOCH,
        shuffle=False,
        callbacks=callbacks,
        verbose=0,
    )
    return np.array(recorder.path)


def distance_to_front(theta):
    t1 = np.clip(theta[0], *FRONT_T1)
    return float(np.hypot(theta[0] - t1, theta[1] - FRONT_T2))


def plot(paths, path):
    grid = np.linspace(-10.0, 10.0, 300)
    t1, t2 = np.meshgrid(grid, grid)
    first, second = landscape(ops.convert_to_tensor(t1), ops.convert_to_tensor(t2))
    total = ops.convert_to_numpy(first + second)
    columns = min(len(paths), 6)
    rows = -(-len(paths) // columns)
    figure = Figure(figsize=(3.2 * columns, 3.2 * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for axis in axes[len(paths) :]:
        axis.set_axis_off()
    for axis, (method, by_start) in zip(axes, paths.items()):
        axis.contour(t1, t2, total, levels=20, linewidths=0.5, colors="0.7")
        axis.plot(FRONT_T1, [FRONT_T2] * 2, color="0.3", linewidth=4, alpha=0.5)
        for trajectory in by_start:
            axis.plot(trajectory[:, 0], trajectory[:, 1], linewidth=1.2)
            axis.plot(*trajectory[0], "ko", markersize=4)
            axis.plot(*trajectory[-1], "r*", markersize=7)
        axis.set(title=method, xlim=(-10, 10), ylim=(-10, 10), aspect="equal")
        axis.tick_params(labelsize="x-small")
    figure.savefig(path, dpi=90)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=35_000)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--methods", nargs="+", choices=sorted(METHODS))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--output", default=".", help="directory for PNG and JSON")
    args = parser.parse_args()
    steps, learning_rate = args.steps, args.learning_rate
    methods = args.methods or list(METHODS)
    if args.quick:
        steps, learning_rate = 12_000, 3e-3
        methods = args.methods or list(QUICK_METHODS)
    output = pathlib.Path(args.output)
    output.mkdir(parents=True, exist_ok=True)

    paths, summary = {}, {}
    print(f"{steps} steps of Adam at learning rate {learning_rate}")
    print(f"{'method':<16} reached  end points (t1, t2) from each start")
    for method in methods:
        paths[method] = [run(method, start, steps, learning_rate) for start in STARTS]
        ends = [trajectory[-1] for trajectory in paths[method]]
        reached = [distance_to_front(end) <= FRONT_TOLERANCE for end in ends]
        summary[method] = {
            "end_points": [end.tolist() for end in ends],
            "end_losses": [
                [float(ops.convert_to_numpy(loss)) for loss in landscape(*end)]
                for end in ends
            ],
            "reached_front": reached,
        }
        print(
            f"{method:<16} {sum(reached)}/{len(STARTS)}     "
            + "  ".join(
                f"({t1:+.2f}, {t2:+.2f}){'' if ok else '!'}"
                for (t1, t2), ok in zip(ends, reached)
            ),
            flush=True,
        )
    plot(paths, output / "toy_landscape.png")
    (output / "toy_landscape.json").write_text(
        json.dumps(
            {
                "backend": keras.backend.backend(),
                "steps": steps,
                "learning_rate": learning_rate,
                "starts": STARTS,
                "front": {"t2": FRONT_T2, "t1": FRONT_T1},
                "tolerance": FRONT_TOLERANCE,
                "results": summary,
            },
            indent=1,
        )
    )
    print(f"\nWrote {output / 'toy_landscape.png'} and .json ('!': front not reached)")

    if args.quick:
        failures = [
            f"{method} does not reach the front from every start"
            for method in ("nash_mtl", "famo")
            if not all(summary[method]["reached_front"])
        ]
        if all(summary["equal"]["reached_front"]):
            failures.append("equal weights reach the front from every start")
        if failures:
            print("Quick check FAILED:", *failures, sep="\n  ", file=sys.stderr)
            sys.exit(1)
        print(
            "Quick check passed: Nash-MTL and FAMO reach the front from every "
            "start, equal weights do not."
        )


if __name__ == "__main__":
    main()
