"""Elements exchanged between replicas per training step, by method.

Data-parallel training exchanges, each step, what makes every replica take
the step that one device would take on the whole batch. This script counts
the elements (floats and integers) that one replica sends in one training
step of a two-replica run, for each method and number of tasks T, as the
ring algorithms send them among R replicas: an all-reduce of N elements
sends 2 N (R - 1) / R, a reduce-scatter of N elements or an all-gather
into N elements N (R - 1) / R (at R = 2: N, N / 2 and N / 2).

- torch: two processes of a gloo group on 127.0.0.1, each training on half
  of every batch; the script wraps the collectives of `torch.distributed`
  and counts the tensors handed to them during one step (after a first
  step, which also copies process 0's variables).
- TensorFlow: `tf.distribute.MirroredStrategy` over two logical CPUs; the
  script wraps `ReplicaContext.all_reduce` and counts, while the step is
  traced, the values one replica hands it (Keras's optimizer sums the
  gradients with the same call).
- JAX: `keras.distribution.DataParallel` over two virtual CPU devices; the
  script compiles the training step for a batch sharded over them and
  counts the collective operations of the compiled HLO by their results.

The model: 64 inputs, a shared trunk of two 128-unit ReLU layers (24,832
shared parameters), and T one-unit regression heads (129 parameters each);
batch 64; SGD. The table gives, per method, the elements per step and the
ratio to T x (shared parameters), the size of the per-task gradients that a
gradient-level method sums before it combines them.

Run it from the repository root:

    python benchmarks/communication.py
    python benchmarks/communication.py --backend torch --tasks 2 8
"""

import argparse
import datetime
import json
import os
import re
import socket
import subprocess
import sys

import numpy as np

BACKENDS = ("tensorflow", "jax", "torch")
COLLECTIVES = (
    "all-reduce",
    "all-gather",
    "reduce-scatter",
    "all-to-all",
    "collective-permute",
)
METHODS = (
    "equal",
    "uncertainty",
    "famo",
    "upgrad",
    "mgda",
    "pcgrad",
    "imtl_g",
    "graddrop",
)
INPUTS = 64
UNITS = 128
BATCH = 64


REPLICAS = 2


def sent_elements(collective, elements):
    """Elements one replica sends in a ring collective of R = REPLICAS.

    Args:
        collective: An HLO collective's name (`all-reduce`, `all-gather`,
            `reduce-scatter`, `all-to-all`, `collective-permute`).
        elements: The elements of its result.
    """
    share = (REPLICAS - 1) / REPLICAS
    factors = {
        "all-reduce": 2 * share,
        "all-gather": share,
        "reduce-scatter": REPLICAS - 1,
        "all-to-all": share,
        "collective-permute": 1,
    }
    return round(elements * factors[collective])


def build_model(method, tasks, inputs=INPUTS, units=UNITS):
    """The benchmark network: a two-layer ReLU trunk, T one-unit heads, SGD."""
    import keras

    import keras_dwo

    features = keras.Input(shape=(inputs,))
    hidden = keras.layers.Dense(units, activation="relu")(features)
    hidden = keras.layers.Dense(units, activation="relu")(hidden)
    outputs = {f"task_{i}": keras.layers.Dense(1)(hidden) for i in range(tasks)}
    model = keras_dwo.DynamicWeightedModel(features, outputs, weighting=method)
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    return model


def data(tasks, samples):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(samples, INPUTS)).astype("float32")
    y = {
        f"task_{i}": rng.normal(size=(samples, 1)).astype("float32")
        for i in range(tasks)
    }
    return x, y


def shared_parameters():
    return INPUTS * UNITS + UNITS + UNITS * UNITS + UNITS


def count_torch(rank, port, methods, task_counts):
    """Elements this process sends per step; run in each of two processes."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=REPLICAS,
        timeout=datetime.timedelta(seconds=300),
    )
    sent = [0]
    # Each wrapped function, the HLO collective it is, and where its result is.
    collectives = {
        "all_reduce": ("all-reduce", 0),
        "reduce_scatter_tensor": ("reduce-scatter", 0),
        "all_gather_into_tensor": ("all-gather", 0),
        "all_gather": ("all-gather", None),
        "broadcast": ("collective-permute", 0),
    }

    def counting(name):
        original = getattr(dist, name)
        collective, result = collectives[name]

        def wrapper(*args, **kwargs):
            if result is None:
                elements = sum(tensor.numel() for tensor in args[0])
            else:
                elements = args[result].numel()
            sent[0] += sent_elements(collective, elements)
            return original(*args, **kwargs)

        return wrapper

    for name in collectives:
        setattr(dist, name, counting(name))
    results = {}
    for tasks in task_counts:
        x, y = data(tasks, 4 * BATCH)
        shard = BATCH // REPLICAS
        x = x.reshape(-1, BATCH, INPUTS)[:, rank * shard : (rank + 1) * shard]
        x = x.reshape(-1, INPUTS)
        y = {
            name: v.reshape(-1, BATCH, 1)[:, rank * shard : (rank + 1) * shard].reshape(
                -1, 1
            )
            for name, v in y.items()
        }
        for method in methods:
            model = build_model(method, tasks)
            # The first step also copies process 0's variables.
            model.fit(x[:shard], {k: v[:shard] for k, v in y.items()}, verbose=0)
            sent[0] = 0
            step = slice(shard, 2 * shard)
            model.train_on_batch(x[step], {k: v[step] for k, v in y.items()})
            results[f"{method}/{tasks}"] = sent[0]
    dist.destroy_process_group()
    return results


def count_tensorflow(methods, task_counts):
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * REPLICAS
    )
    from tensorflow.python.distribute import distribute_lib

    sent = [0]
    original = distribute_lib.ReplicaContext.all_reduce

    def counting(self, reduce_op, value, options=None):
        for tensor in tf.nest.flatten(value):
            sent[0] += sent_elements("all-reduce", int(np.prod(tensor.shape)))
        return original(self, reduce_op, value, options)

    distribute_lib.ReplicaContext.all_reduce = counting
    strategy = tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(REPLICAS)])
    results = {}
    for tasks in task_counts:
        x, y = data(tasks, BATCH)
        for method in methods:
            with strategy.scope():
                model = build_model(method, tasks)
            sent[0] = 0
            model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
            # Traced once for every replica: what one replica sends.
            results[f"{method}/{tasks}"] = sent[0] // REPLICAS
    return results


def hlo_collective_elements(hlo):
    """Elements one device sends in the collective operations of compiled HLO."""
    total = 0
    for line in hlo.splitlines():
        match = re.search(r"= (.+?) (" + "|".join(COLLECTIVES) + r")(-start)?\(", line)
        if match is None:
            continue
        elements = 0
        for dims in re.findall(r"[a-z]+\d*\[([\d,]*)\]", match.group(1)):
            elements += int(np.prod([int(d) for d in dims.split(",") if d]))
        total += sent_elements(match.group(2), elements)
    return total


def count_jax(methods, task_counts):
    import jax
    import keras

    devices = keras.distribution.list_devices("cpu")
    keras.distribution.set_distribution(
        keras.distribution.DataParallel(devices=devices)
    )
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("batch",))
    by_batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch"))
    results = {}
    for tasks in task_counts:
        x, y = data(tasks, BATCH)
        for method in methods:
            model = build_model(method, tasks)
            model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
            state = (
                [v.value for v in model.trainable_variables],
                [v.value for v in model.non_trainable_variables],
                [v.value for v in model.optimizer.variables],
                [v.value for v in model.metrics_variables],
            )
            batch = jax.device_put((x, y, None), by_batch)
            compiled = jax.jit(model.train_step).lower(state, batch).compile()
            results[f"{method}/{tasks}"] = hlo_collective_elements(compiled.as_text())
    return results


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_backend(backend, methods, task_counts):
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
    common = ["--methods", *methods, "--tasks", *map(str, task_counts)]
    if backend in ("tensorflow", "jax"):
        commands = [[sys.executable, __file__, "--worker", backend, *common]]
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={REPLICAS}"
    else:
        port = str(_free_port())
        env["GLOO_SOCKET_IFNAME"] = "lo"
        commands = [
            [sys.executable, __file__, "--worker", f"torch:{rank}:{port}", *common]
            for rank in range(REPLICAS)
        ]
    processes = [
        subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
        for command in commands
    ]
    outputs = [process.communicate(timeout=1800)[0] for process in processes]
    for process in processes:
        if process.returncode:
            raise SystemExit(f"{backend} worker failed ({process.returncode})")
    return json.loads(outputs[0].strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=BACKENDS, action="append")
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--tasks", nargs="+", type=int, default=[2, 8])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.worker == "tensorflow":
        print(json.dumps(count_tensorflow(arguments.methods, arguments.tasks)))
        return
    if arguments.worker == "jax":
        print(json.dumps(count_jax(arguments.methods, arguments.tasks)))
        return
    if arguments.worker:
        _, rank, port = arguments.worker.split(":")
        counts = count_torch(int(rank), int(port), arguments.methods, arguments.tasks)
        print(json.dumps(counts))
        return
    shared = shared_parameters()
    print(f"shared parameters P = {shared:,}; elements sent per step by one replica")
    print(f"{'backend':<11} {'method':<12} {'T':>3} {'elements':>10} {'/ (T P)':>8}")
    for backend in arguments.backend or BACKENDS:
        counts = run_backend(backend, arguments.methods, arguments.tasks)
        for tasks in arguments.tasks:
            for method in arguments.methods:
                sent = counts[f"{method}/{tasks}"]
                ratio = sent / (tasks * shared)
                print(
                    f"{backend:<11} {method:<12} {tasks:>3} {sent:>10,} {ratio:>8.2f}"
                )


if __name__ == "__main__":
    main()
