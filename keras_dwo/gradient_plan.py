"""Where a gradient-level step takes its per-task gradients.

The plan splits the model's trainable variables into the shared ones, whose
per-task gradients the method combines, and the task-specific ones, which
get the gradient of their own task's weighted loss. It is read from the
model's functional graph: the model's own for a functional model, or a graph
traced by calling a subclassed model's `call` on symbolic inputs.
"""

import dataclasses
import math

import keras

from keras_dwo import task_graph


@dataclasses.dataclass
class GradientPlan:
    """Where a gradient-level step takes its per-task gradients.

    Attributes:
        shared_indices: Positions in `model.trainable_variables` of the
            shared variables. Empty when the tasks share no trainable
            variable (a frozen backbone): the step then trains each task's
            own variables on its weighted loss.
        other_indices: Positions of the other (task-specific) variables.
        trunk: With `wrt="representation"`, a model from the inputs to the
            shared representation, sharing the layers; else None.
        heads: With `wrt="representation"`, a model from the shared
            representation to the outputs (a list in task order); else None.
    """

    shared_indices: list
    other_indices: list
    trunk: keras.Model | None = None
    heads: keras.Model | None = None


def shared_names(shared):
    """Returns the layer names or variable paths in a user's `shared` argument."""
    if shared is None:
        return None
    names = []
    for item in shared:
        if isinstance(item, keras.layers.Layer):
            names.append(item.name)
        elif isinstance(item, keras.Variable):
            names.append(item.path)
        else:
            names.append(str(item))
    return names


def named_variables(model, names):
    """The variables of the layers or with the paths that `names` lists."""
    layers = {layer.name: layer for layer in model._flatten_layers(include_self=False)}
    paths = {variable.path: variable for variable in model.weights}
    unknown = [name for name in names if name not in layers and name not in paths]
    if unknown:
        raise ValueError(
            f"`shared` names unknown layer(s) {unknown}; the model's layers are "
            f"{sorted(layer.name for layer in model.layers)} (variables may be "
            "named by their path)."
        )
    variables = []
    for name in names:
        variables.extend(layers[name].weights if name in layers else [paths[name]])
    return variables


def trace(model, input_spec):
    """Calls a subclassed model's `call` on symbolic inputs, recording a graph.

    Args:
        model: A built model whose `call` is made of Keras layers and ops.
        input_spec: The structure of the model's inputs, as arrays or
            `keras.KerasTensor`s with a batch dimension.

    Returns:
        `(inputs, outputs)`: the symbolic inputs and the outputs they give.
    """

    def symbolic_input(value):
        return keras.Input(
            shape=tuple(value.shape[1:]),
            dtype=keras.backend.standardize_dtype(value.dtype),
        )

    inputs = keras.tree.map_structure(symbolic_input, input_spec)
    return inputs, model.call(inputs)


def make_plan(model, graph, wrt, shared=None, representation=None):
    """Returns the `GradientPlan` of a gradient-level method.

    Args:
        model: The model whose trainable variables are split.
        graph: `(inputs, outputs)` of the model's functional graph, the
            outputs in task order; None where the model has no graph (shared
            variables must then be named).
        wrt: `"parameters"` or `"representation"`.
        shared: Optional names of shared layers or variable paths.
        representation: Optional name of the layer whose output is the
            representation, for `wrt="representation"`; by default the
            tensors that shared layers hand to the heads.

    Raises:
        ValueError: If the shared variables or representation cannot be
            found, saying what to do instead.
    """
    trunk = heads = None
    if wrt == "representation":
        if graph is None:
            raise ValueError(
                "wrt='representation' needs the model's graph to find the "
                "representation that the heads read, but the model's `call` "
                "could not be traced on symbolic inputs. Build the model with "
                "the functional API, or use wrt='parameters'."
            )
        inputs, outputs = graph
        if representation is None:
            representation = task_graph.shared_representation(outputs)
        else:
            representation = task_graph.layer_outputs(outputs, representation)
        trunk = keras.Model(inputs, representation)
        heads = keras.Model(representation, outputs)
        shared_variables = trunk.weights
    elif shared is not None:
        shared_variables = named_variables(model, shared)
    elif graph is None:
        raise ValueError(
            "A gradient-level method needs to know which variables the tasks "
            "share, but the model's `call` could not be traced on symbolic "
            "inputs. Name the shared layers with `shared=`."
        )
    else:
        # Operations that are not layers (`x / 255`, `keras.ops.relu`) hold
        # no variables.
        shared_variables = [
            variable
            for operation in task_graph.shared_operations(graph[1]).values()
            for variable in getattr(operation, "weights", ())
        ]
    shared_ids = {id(variable) for variable in shared_variables}
    shared_indices, other_indices = [], []
    for index, variable in enumerate(model.trainable_variables):
        (shared_indices if id(variable) in shared_ids else other_indices).append(index)
    return GradientPlan(shared_indices, other_indices, trunk, heads)


def layer_sizes(variables):
    """The number of parameters of each layer among `variables`, in order.

    Consecutive variables of one layer (its kernel and bias) form one group:
    the groups of columns of a Jacobian with respect to `variables`.
    """
    sizes, layers = [], []
    for variable in variables:
        layer = variable.path.rpartition("/")[0]
        size = math.prod(variable.shape)
        if layers and layers[-1] == layer:
            sizes[-1] += size
        else:
            layers.append(layer)
            sizes.append(size)
    return sizes
