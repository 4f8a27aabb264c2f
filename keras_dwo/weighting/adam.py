"""Adam for the parameters that a weighting method learns itself."""

from keras import ops


class AdamMoments:
    """Adam's moment estimates for one parameter of a weighting method.

    FAMO's logits and GradNorm's loss weights learn with their own learning
    rate, outside the model's optimizer; their moments are non-trainable
    variables of the method, so they save and restore with the model.

    Args:
        method: The `keras.layers.Layer` that owns the parameter; the moments
            are created as its weights.
        shape: Shape of the parameter.
        name: Prefix of the moments' variable names.
        beta_1: Decay of the first moment.
        beta_2: Decay of the second moment.
        epsilon: Added to the root of the second moment.
    """

    def __init__(self, method, shape, name, beta_1=0.9, beta_2=0.999, epsilon=1e-8):
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon

        def state(suffix, state_shape):
            return method.add_weight(
                shape=state_shape,
                initializer="zeros",
                trainable=False,
                name=f"{name}_{suffix}",
            )

        self.momentum = state("momentum", shape)
        self.velocity = state("velocity", shape)
        self.count = state("count", ())

    def step(self, gradient):
        """Records `gradient` and returns the bias-corrected Adam step."""
        count = self.count + 1.0
        momentum = self.beta_1 * self.momentum + (1 - self.beta_1) * gradient
        velocity = self.beta_2 * self.velocity + (1 - self.beta_2) * ops.square(
            gradient
        )
        self.momentum.assign(momentum)
        self.velocity.assign(velocity)
        self.count.assign(count)
        return (momentum / (1 - self.beta_1**count)) / (
            ops.sqrt(velocity / (1 - self.beta_2**count)) + self.epsilon
        )
