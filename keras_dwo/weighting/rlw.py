"""Random loss weighting, RLW (Lin et al. 2022)."""

import keras
from keras import ops

from keras_dwo.weighting.base import LossWeighting
from keras_dwo.weighting.base import linear_objective
from keras_dwo.weighting.base import presence
from keras_dwo.weighting.random_state import RandomState


@keras.saving.register_keras_serializable(package="keras_dwo")
class RLW(RandomState, LossWeighting):
    """Random loss weighting: fresh random weights at every training step.

    At each step the weights are `softmax(z)` with `z ~ N(0, I)`, so they are
    positive and sum to 1, as in the paper. Evaluation uses their expectation
    under symmetry, `1/T` each. The random state is a
    `keras.random.SeedGenerator`, saved with the model, so a resumed run draws
    the same weights as an uninterrupted one.

    Args:
        seed: Optional integer seed.
        **kwargs: Passed to `LossWeighting`.

    References:
        - Lin, Ye, Xu, Shi and Zhang, "Reasonable Effectiveness of Random
          Weighting: A Litmus Test for Multi-Task Learning", TMLR 2022.
    """

    def __init__(self, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.seed = seed

    def call(self, losses, training=False, present=None):
        present = presence(present, losses)
        if training:
            logits = keras.random.normal(
                (self.num_tasks,), seed=self.seed_generator, dtype=losses.dtype
            )
            # The softmax over the tasks present.
            weights = present * ops.exp(logits - ops.amax(logits))
        else:
            weights = present
        return linear_objective(weights / ops.sum(weights), losses)

    def get_config(self):
        return {**super().get_config(), "seed": self.seed}
