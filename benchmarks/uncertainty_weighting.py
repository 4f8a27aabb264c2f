"""Uncertainty weighting recovers known noise variances (Kendall et al. 2018).

Kendall, Gal and Cipolla weigh each task loss by a learned homoscedastic
noise variance: for a regression task with a Gaussian likelihood the
negative log-likelihood is `L / (2 sigma^2) + log sigma`, with `L` the
squared error, and `s = log sigma^2` is learned with the network. At fixed
`L` the term `0.5 exp(-s) L + 0.5 s` is smallest at `s = log L`: with `L`
the mean squared error, `exp(s)` estimates the variance of the residuals,
that is the noise variance plus whatever error the network still makes on
the noise-free function. The paper states this on real data, where the
noise is unknown; here it is known, so the learned variances can be checked.

Data (numpy, fixed by `--seed`): inputs `x` in R^10, standard normal. A
fixed random teacher `h(x) = tanh(W x + b)` with 32 units is shared by all
tasks. Three regression tasks, `y_k = f_k(x) + sigma_k * noise`, with
`f_k = v_k . h(x)` scaled to unit variance and noise standard deviations
sigma = (0.1, 0.5, 2.0), so noise variances 0.01, 0.25 and 4: a factor 400
between the quietest and the noisiest task. One classification task with 3
classes, its label drawn from `softmax(u(x))` for another linear read-out
`u` of `h`, so that even the true probabilities have a cross-entropy (the
conditional entropy of the labels, reported as "Bayes") above zero. 20,000
training and 5,000 test samples.

Model: a trunk of two 64-unit ReLU layers, one linear head per task, mean
squared error for the regression tasks and sparse categorical cross-entropy
(from logits) for the classification task; Adam, learning rate 3e-3 with
cosine decay to 0 over the run (the decay lets the network fit the
noise-free functions closely, so the residual variance approaches the noise
variance), batch 64. Methods, all through `DynamicWeightedModel.fit`:

- `equal`: the sum of the task losses, the baseline.
- `uncertainty`: `weighting="uncertainty"`, the library's default form
  `sum_i exp(-s_i) L_i + s_i`. Its optimum is `s_i = log L_i` for every
  task: `exp(s_i)` converges to the mean squared error of a regression task
  (so to sigma_k^2) and to the cross-entropy of the classification task;
  the logged weight `exp(-s_i)` of a regression task tends to
  `1 / sigma_k^2`.
- `uncertainty_paper`: `weighting.Uncertainty(regression_tasks=...)`, the
  paper's factors: `0.5 exp(-s) L + 0.5 s` for regression, `exp(-s) L +
  0.5 s` for classification (a softmax with temperature `sigma^2`). The
  regression optimum is the same, `exp(s_k) -> sigma_k^2`, with weight
  `1 / (2 sigma_k^2)`; the classification optimum is `exp(s) -> 2 L`. The
  classification task has no "true" variance: the table compares its learned
  `exp(s)` with the value the optimum implies from its training loss.

The learned variance is `exp(s)` read from
`model.weighting.uncertainty.log_variances` after every epoch.

What the paper leads us to expect: the learned `sigma_k^2` of each
regression task approaches its noise variance, so the noisiest task gets the
smallest weight, 400 times smaller than the quietest's. The learned value
tracks the training loss, not sigma^2 itself: it sits above sigma^2 while the
network still errs on `f_k`, and may end slightly below it once the network
starts to fit the training noise; the table also gives the variance of the
noise actually drawn for the training set ("drawn var"). Held-out, the excess
error of each regression task (its mean squared error to the noise-free
`f_k`) shows whether learning the weights helped over equal weights.

    python benchmarks/uncertainty_weighting.py            # full: 60 epochs
    python benchmarks/uncertainty_weighting.py --quick    # 15 epochs

It writes `uncertainty_weighting.png` (the learned variances over training
against the true ones, and the weights) and `uncertainty_weighting.json`
(the numbers) into `--output`, and in `--quick` mode checks, for
`uncertainty`, that the learned variances of the regression tasks are
ordered like the true ones and each within a factor 2 of it, and that the
noisiest task has the smallest weight of all tasks.
"""

import argparse
import json
import pathlib
import sys
import time

import keras
import numpy as np
from keras import ops
from matplotlib.figure import Figure

import keras_dwo

SEED = 0
INPUT_DIM = 10
TEACHER_UNITS = 32
HIDDEN_UNITS = 64
NUM_CLASSES = 3
NUM_TRAIN = 20_000
NUM_TEST = 5_000
BATCH_SIZE = 64
LEARNING_RATE = 3e-3
NOISE_STDS = {"regression_1": 0.1, "regression_2": 0.5, "regression_3": 2.0}
REGRESSION_TASKS = list(NOISE_STDS)
CLASSIFICATION_TASK = "classification"
TASKS = REGRESSION_TASKS + [CLASSIFICATION_TASK]
# Scale of the class logits: large enough that the classes are learnable,
# small enough that the labels stay noisy.
LOGIT_SCALE = 2.0
# The factor QUICK_TOLERANCE bounds learned / true variance in --quick mode.
QUICK_TOLERANCE = 2.0
QUICK_EPOCHS = 15
METHODS = ("equal", "uncertainty", "uncertainty_paper")
QUICK_METHODS = ("equal", "uncertainty")


def make_tasks(rng):
    """Returns the train and test data and the noise-free test quantities."""
    count = NUM_TRAIN + NUM_TEST
    teacher_weights = rng.normal(size=(INPUT_DIM, TEACHER_UNITS)) / np.sqrt(INPUT_DIM)
    teacher_bias = rng.normal(scale=0.5, size=TEACHER_UNITS)
    regression_readout = rng.normal(size=(TEACHER_UNITS, len(REGRESSION_TASKS)))
    class_readout = rng.normal(size=(TEACHER_UNITS, NUM_CLASSES))

    x = rng.normal(size=(count, INPUT_DIM))
    features = np.tanh(x @ teacher_weights + teacher_bias)
    clean = features @ regression_readout
    clean /= clean.std(axis=0)
    logits = features @ class_readout
    logits *= LOGIT_SCALE / logits.std()
    probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    uniform = rng.uniform(size=(count, 1))
    labels = np.minimum(
        (uniform > probabilities.cumsum(axis=1)).sum(axis=1), NUM_CLASSES - 1
    )

    targets = {
        task: (clean[:, k] + NOISE_STDS[task] * rng.normal(size=count))
        .astype("float32")
        .reshape(-1, 1)
        for k, task in enumerate(REGRESSION_TASKS)
    }
    targets[CLASSIFICATION_TASK] = labels.astype("int32")
    x = x.astype("float32")

    def split(part):
        return x[part], {task: values[part] for task, values in targets.items()}

    train, test = split(slice(0, NUM_TRAIN)), split(slice(NUM_TRAIN, None))
    test_probabilities = probabilities[NUM_TRAIN:]
    reference = {
        "clean": {
            task: clean[NUM_TRAIN:, k] for k, task in enumerate(REGRESSION_TASKS)
        },
        # The variance of the noise actually drawn for the training set, which
        # differs from sigma^2 by sampling error (standard error 1 per cent).
        "train_noise_variance": {
            task: float(np.var(train[1][task][:, 0] - clean[:NUM_TRAIN, k]))
            for k, task in enumerate(REGRESSION_TASKS)
        },
        "bayes_cross_entropy": float(
            -np.mean(np.sum(test_probabilities * np.log(test_probabilities), axis=1))
        ),
        "bayes_accuracy": float(
            np.mean(
                np.take_along_axis(
                    test_probabilities,
                    test_probabilities.argmax(axis=1)[:, None],
                    axis=1,
                )
            )
        ),
    }
    return train, test, reference


def make_weighting(method):
    if method == "uncertainty_paper":
        return keras_dwo.weighting.Uncertainty(regression_tasks=REGRESSION_TASKS)
    return method


def build_model(method):
    inputs = keras.Input(shape=(INPUT_DIM,))
    hidden = inputs
    for _ in range(2):
        hidden = keras.layers.Dense(HIDDEN_UNITS, activation="relu")(hidden)
    outputs = {task: keras.layers.Dense(1, name=task)(hidden) for task in NOISE_STDS}
    outputs[CLASSIFICATION_TASK] = keras.layers.Dense(
        NUM_CLASSES, name=CLASSIFICATION_TASK
    )(hidden)
    return keras_dwo.DynamicWeightedModel(
        inputs, outputs, weighting=make_weighting(method)
    )


class LogVarianceRecorder(keras.callbacks.Callback):
    """Records the learned log-variances before training and after each epoch."""

    def __init__(self):
        super().__init__()
        self.log_variances = []

    def record(self):
        uncertainty = self.model.weighting.uncertainty
        self.log_variances.append(
            ops.convert_to_numpy(uncertainty.log_variances).tolist()
        )

    def on_train_begin(self, logs=None):
        self.record()

    def on_epoch_end(self, epoch, logs=None):
        self.record()


def held_out_metrics(model, test, reference):
    x, targets = test
    predictions = model.predict(x, batch_size=1000, verbose=0)
    metrics = {}
    for task in REGRESSION_TASKS:
        prediction = predictions[task][:, 0]
        metrics[f"{task}_mse"] = float(np.mean((prediction - targets[task][:, 0]) ** 2))
        # The error on the noise-free function: what training can still reduce.
        metrics[f"{task}_excess_mse"] = float(
            np.mean((prediction - reference["clean"][task]) ** 2)
        )
    predicted_classes = predictions[CLASSIFICATION_TASK].argmax(axis=1)
    metrics["classification_accuracy"] = float(
        np.mean(predicted_classes == targets[CLASSIFICATION_TASK])
    )
    return metrics


def run(method, train, test, reference, epochs, seed):
    """Returns the history, learned variances and held-out metrics of a method."""
    keras.utils.set_random_seed(seed)
    model = build_model(method)
    steps = epochs * (NUM_TRAIN // BATCH_SIZE)
    model.compile(
        optimizer=keras.optimizers.Adam(
            keras.optimizers.schedules.CosineDecay(LEARNING_RATE, steps)
        ),
        loss={
            **{task: "mse" for task in REGRESSION_TASKS},
            CLASSIFICATION_TASK: keras.losses.SparseCategoricalCrossentropy(
                from_logits=True
            ),
        },
    )
    callbacks = []
    if method != "equal":
        recorder = LogVarianceRecorder()
        callbacks.append(recorder)
    start = time.perf_counter()
    history = model.fit(
        *train,
        batch_size=BATCH_SIZE,
        epochs=epochs,
        shuffle=True,
        callbacks=callbacks,
        verbose=0,
    ).history
    result = {
        "seconds": time.perf_counter() - start,
        "history": {
            key: [float(value) for value in values] for key, values in history.items()
        },
        "held_out": held_out_metrics(model, test, reference),
    }
    if method != "equal":
        # exp(s) is the variance sigma^2 in both forms (s = log sigma^2).
        result["learned_variances"] = {
            task: [float(np.exp(per_epoch[i])) for per_epoch in recorder.log_variances]
            for i, task in enumerate(TASKS)
        }
    return result


def expected_classification_variance(method, cross_entropy):
    """The `exp(s)` that minimises the method's term at the given loss."""
    return 2.0 * cross_entropy if method == "uncertainty_paper" else cross_entropy


def plot(results, path):
    learned = [method for method in results if method != "equal"]
    figure = Figure(figsize=(12, 4 * len(learned)), layout="constrained")
    axes = figure.subplots(len(learned), 2, squeeze=False)
    colours = {task: f"C{i}" for i, task in enumerate(TASKS)}
    for (variance_axis, weight_axis), method in zip(axes, learned):
        variances = results[method]["learned_variances"]
        for task in REGRESSION_TASKS:
            variance_axis.plot(
                variances[task],
                color=colours[task],
                label=f"{task} (sigma = {NOISE_STDS[task]})",
            )
            variance_axis.axhline(
                NOISE_STDS[task] ** 2, color=colours[task], linestyle="--"
            )
        variance_axis.set(
            title=f"{method}: learned sigma^2 = exp(s), dashed: true",
            xlabel="epoch",
            yscale="log",
        )
        variance_axis.legend(fontsize="small")
        history = results[method]["history"]
        epochs = range(1, len(history[f"{TASKS[0]}_weight"]) + 1)
        for task in TASKS:
            weight_axis.plot(
                epochs, history[f"{task}_weight"], color=colours[task], label=task
            )
        weight_axis.set(title=f"{method}: task weights", xlabel="epoch", yscale="log")
        weight_axis.legend(fontsize="small")
    figure.savefig(path)


def summarise(method, result, reference):
    """Returns the end-of-training numbers of a method and prints its table."""
    history = result["history"]
    summary = {
        "final_weights": {task: history[f"{task}_weight"][-1] for task in TASKS},
        "final_train_losses": {task: history[f"{task}_loss"][-1] for task in TASKS},
        "held_out": result["held_out"],
        "seconds": result["seconds"],
    }
    print(f"\n{method} ({result['seconds']:.0f} s)")
    if method == "equal":
        return summary
    variances = {
        task: values[-1] for task, values in result["learned_variances"].items()
    }
    summary["final_variances"] = variances
    summary["variance_ratios"] = {
        task: variances[task] / NOISE_STDS[task] ** 2 for task in REGRESSION_TASKS
    }
    print(
        f"{'task':<15} {'true var':>9} {'learned':>9} {'ratio':>6} "
        f"{'drawn var':>9} {'train loss':>10} {'weight':>8}"
    )
    for task in REGRESSION_TASKS:
        print(
            f"{task:<15} {NOISE_STDS[task] ** 2:>9.4f} {variances[task]:>9.4f} "
            f"{summary['variance_ratios'][task]:>6.2f} "
            f"{reference['train_noise_variance'][task]:>9.4f} "
            f"{summary['final_train_losses'][task]:>10.4f} "
            f"{summary['final_weights'][task]:>8.3f}"
        )
    cross_entropy = summary["final_train_losses"][CLASSIFICATION_TASK]
    expected = expected_classification_variance(method, cross_entropy)
    summary["classification_expected_variance"] = expected
    print(
        f"{CLASSIFICATION_TASK:<15} {'-':>9} {variances[CLASSIFICATION_TASK]:>9.4f} "
        f"{variances[CLASSIFICATION_TASK] / expected:>6.2f} {'-':>9} "
        f"{cross_entropy:>10.4f} {summary['final_weights'][CLASSIFICATION_TASK]:>8.3f}"
        f"  (ratio to the optimum {expected:.4f} at the training loss; "
        f"Bayes cross-entropy {reference['bayes_cross_entropy']:.4f})"
    )
    return summary


def print_held_out(summary, reference):
    print("\nHeld-out: MSE to the noisy targets (excess MSE to the noise-free f)")
    header = " ".join(
        f"{f'{task} (sd {NOISE_STDS[task]})':>21}" for task in REGRESSION_TASKS
    )
    print(f"{'method':<18} {header} {'accuracy':>9}")
    for method, numbers in summary.items():
        held_out = numbers["held_out"]
        cells = " ".join(
            f"{held_out[f'{task}_mse']:>12.4f} ({held_out[f'{task}_excess_mse']:.4f})"
            for task in REGRESSION_TASKS
        )
        print(f"{method:<18} {cells} {held_out['classification_accuracy']:>9.4f}")
    print(
        f"{'noise / Bayes':<18} "
        + " ".join(
            f"{NOISE_STDS[task] ** 2:>12.4f} {'(0)':<8}" for task in REGRESSION_TASKS
        )
        + f" {reference['bayes_accuracy']:>9.4f}"
    )


def quick_check(uncertainty):
    """Returns the failures of the qualitative outcome, if any."""
    failures = []
    variances = uncertainty["final_variances"]
    by_true_variance = sorted(REGRESSION_TASKS, key=lambda task: NOISE_STDS[task])
    by_learned_variance = sorted(REGRESSION_TASKS, key=lambda task: variances[task])
    if by_learned_variance != by_true_variance:
        failures.append(
            f"learned variances order the tasks {by_learned_variance}, the true "
            f"ones {by_true_variance}"
        )
    for task, ratio in uncertainty["variance_ratios"].items():
        if not 1 / QUICK_TOLERANCE <= ratio <= QUICK_TOLERANCE:
            failures.append(
                f"{task}: learned variance {variances[task]:.4f} is not within a "
                f"factor {QUICK_TOLERANCE} of {NOISE_STDS[task] ** 2:g}"
            )
    weights = uncertainty["final_weights"]
    noisiest = max(REGRESSION_TASKS, key=lambda task: NOISE_STDS[task])
    if min(weights, key=weights.get) != noisiest:
        failures.append(f"{noisiest} does not have the smallest weight: {weights}")
    return failures


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--output", default=".", help="directory for PNG and JSON")
    args = parser.parse_args()
    epochs = QUICK_EPOCHS if args.quick else args.epochs
    methods = QUICK_METHODS if args.quick else METHODS
    output = pathlib.Path(args.output)
    output.mkdir(parents=True, exist_ok=True)

    train, test, reference = make_tasks(np.random.default_rng(args.seed))
    print(
        f"Noise standard deviations {NOISE_STDS}, {epochs} epochs, "
        f"{NUM_TRAIN} training samples, seed {args.seed}"
    )
    results = {
        method: run(method, train, test, reference, epochs, args.seed)
        for method in methods
    }
    summary = {
        method: summarise(method, result, reference)
        for method, result in results.items()
    }
    print_held_out(summary, reference)

    plot(results, output / "uncertainty_weighting.png")
    (output / "uncertainty_weighting.json").write_text(
        json.dumps(
            {
                "backend": keras.backend.backend(),
                "epochs": epochs,
                "seed": args.seed,
                "noise_stds": NOISE_STDS,
                "bayes_cross_entropy": reference["bayes_cross_entropy"],
                "bayes_accuracy": reference["bayes_accuracy"],
                "train_noise_variance": reference["train_noise_variance"],
                "results": summary,
                "learned_variances": {
                    method: result["learned_variances"]
                    for method, result in results.items()
                    if "learned_variances" in result
                },
                "weights": {
                    method: {
                        task: result["history"][f"{task}_weight"] for task in TASKS
                    }
                    for method, result in results.items()
                },
            },
            indent=1,
        )
    )
    print(f"\nWrote {output / 'uncertainty_weighting.png'} and .json")

    if args.quick:
        failures = quick_check(summary["uncertainty"])
        if failures:
            print("Quick check FAILED:", *failures, sep="\n  ", file=sys.stderr)
            sys.exit(1)
        print(
            "Quick check passed: the learned variances are ordered like the noise "
            f"variances, each within a factor {QUICK_TOLERANCE} of it, and the "
            "noisiest task has the smallest weight."
        )


if __name__ == "__main__":
    main()
