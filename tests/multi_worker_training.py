"""Trains the two-task model as one worker of a TensorFlow cluster.

`python multi_worker_training.py`, with TF_CONFIG naming the cluster's
workers and this one's index: trains the model with uncertainty weighting
for a few steps under `tf.distribute.MultiWorkerMirroredStrategy`, every
worker on the same data, which the strategy shards among them. Prints a line
with a JSON object: the worker's index and its history. An error ends the
process with its full traceback on stderr: Keras' traceback filtering is
off, so that the traceback names the Keras functions it passed through.
"""

import json
import os

os.environ["KERAS_BACKEND"] = "tensorflow"

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from conftest import TWO_TASK_LOSSES  # noqa: E402
from conftest import two_task_data  # noqa: E402
from conftest import two_task_model  # noqa: E402

if __name__ == "__main__":
    keras.config.disable_traceback_filtering()
    # Created first: the strategy connects the workers before any other
    # TensorFlow operation runs.
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = two_task_model("uncertainty")
        model.compile(optimizer=keras.optimizers.Adam(0.01), loss=TWO_TASK_LOSSES)
    x, y = two_task_data(128)
    history = model.fit(x, y, epochs=1, batch_size=32, shuffle=False, verbose=0)
    worker = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    print(json.dumps({"worker": worker, "history": history.history}), flush=True)
