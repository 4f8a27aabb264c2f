"""The random state of weighting methods that draw random numbers."""

import keras
from keras import ops

from keras_dwo import trainers


class RandomState:
    """Mixin of weighting methods whose random state is `self.seed_generator`.

    Keras does not save seed generators with a model; this mixin saves the
    generator's state beside the method's variables, so a reloaded model
    continues the same sequence of draws. The class that mixes it in sets
    `self.seed` in its constructor; `build` creates `self.seed_generator`, a
    `keras.random.SeedGenerator` (a layer attribute, so the model tracks its
    state like a non-trainable variable).
    """

    def build(self, task_names):
        super().build(task_names)
        # Created with the model's variables, so that under a distribution
        # strategy the state is mirrored like theirs.
        self.seed_generator = keras.random.SeedGenerator(
            self.seed, name=f"{self.name}_seed"
        )

    def save_own_variables(self, store):
        super().save_own_variables(store)
        store["seed_state"] = self.seed_generator.state

    def load_own_variables(self, store):
        variables = {key: store[key] for key in store.keys() if key != "seed_state"}
        super().load_own_variables(variables)
        self.seed_generator.state.assign(store["seed_state"])

    def uniform(self, shape, training):
        """Returns float32 draws from U[0, 1) (`keras_dwo.trainers.uniform`).

        Outside training the generator is left where it was, so the draws
        preview those of the next training step and the state is unchanged.
        """
        # A copy: some backends assign variables in place.
        state = ops.copy(self.seed_generator.state.value)
        draws = trainers.uniform(self.seed_generator, shape)
        if not training:
            self.seed_generator.state.assign(state)
        return draws

    def other_tasks_in_random_order(self, training):
        """Returns a `(T, T - 1, T)` one-hot tensor of random task orders.

        Entry `[i, k]` is the one-hot vector of the k-th task that task i
        visits; each task visits every other task once, in an order drawn
        independently for each task. With two tasks there is no order to
        draw, and the generator is left where it was.
        """
        num_tasks = self.num_tasks
        if num_tasks == 2:
            return ops.one_hot(ops.convert_to_tensor([[1], [0]]), 2, dtype="float32")
        scores = self.uniform((num_tasks, num_tasks), training)
        # Scores below 1, except on the diagonal: each task sorts itself last.
        scores = scores + 2.0 * ops.eye(num_tasks)
        order = ops.argsort(scores, axis=1)[:, : num_tasks - 1]
        return ops.one_hot(order, num_tasks, dtype="float32")
