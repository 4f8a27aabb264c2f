"""Adam for the parameters that a weighting method learns itself."""

from keras import ops


class AdamMoments:
    """Adam's moment estimates for one parameter of a weighting method.

    FAMO's logits and GradNorm's loss weights learn with their own learning
    rate, outside the model's optimizer; their moments are non-trainable
    variables of the method, so they save and restore with the model. Each
    entry keeps its own step count, so an entry left out of some steps (a
    task without labels in the batch) continues as if those steps had not
    happened.

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

        def state(suffix):
            return method.add_weight(
                shape=shape,
                initializer="zeros",
                trainable=False,
                name=f"{name}_{suffix}",
            )

        self.momentum = state("momentum")
        self.velocity = state("velocity")
        self.count = state("count")

    def step(self, gradient, taken=None):
        """Records `gradient` and returns the bias-corrected Adam step.

        Args:
            gradient: Gradient of the parameter.
            taken: Optional mask of the parameter's shape: where it is 0, the
                moments and count stay exactly as they were and the step is 0.

        Returns:
            The step, of the parameter's shape.
        """
        # As tensors: `ops.where` rejects variables on JAX.
        old = [
            ops.convert_to_tensor(v) for v in (self.momentum, self.velocity, self.count)
        ]
        momentum = self.beta_1 * old[0] + (1 - self.beta_1) * gradient
        velocity = self.beta_2 * old[1] + (1 - self.beta_2) * ops.square(gradient)
        count = old[2] + 1.0
        if taken is not None:
            taken = taken > 0
            momentum, velocity, count = (
                ops.where(taken, new, previous)
                for new, previous in zip((momentum, velocity, count), old)
            )
        self.momentum.assign(momentum)
        self.velocity.assign(velocity)
        self.count.assign(count)
        step = (momentum / (1 - self.beta_1**count)) / (
            ops.sqrt(velocity / (1 - self.beta_2**count)) + self.epsilon
        )
        # An entry never taken has count 0, whose bias correction is 0 / 0.
        return step if taken is None else ops.where(taken, step, 0.0)
