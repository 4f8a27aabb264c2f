"""What the tasks share, read from a functional model's graph.

A layer that feeds two or more outputs is shared; its variables get the
combined direction of a gradient-level method. The tensors that shared layers
hand to task-specific layers are the shared representation.
"""

import keras


def _producer(tensor):
    operation, node_index, _ = tensor._keras_history
    return operation, operation._inbound_nodes[node_index]


def _upstream(output):
    """Returns the operations that `output` depends on, and their nodes."""
    operations, nodes = {}, []
    seen_nodes = set()
    pending = [output]
    while pending:
        operation, node = _producer(pending.pop())
        if id(node) in seen_nodes:
            continue
        seen_nodes.add(id(node))
        operations[id(operation)] = operation
        nodes.append((operation, node))
        pending.extend(node.input_tensors)
    return operations, nodes


def shared_operations(outputs):
    """Returns the operations that feed two or more of `outputs`, by id."""
    counts, operations = {}, {}
    for output in outputs:
        upstream, _ = _upstream(output)
        operations.update(upstream)
        for key in upstream:
            counts[key] = counts.get(key, 0) + 1
    return {key: operations[key] for key, count in counts.items() if count > 1}


def shared_representation(outputs):
    """Returns the tensors that shared layers hand to task-specific layers.

    Raises:
        ValueError: If a task-specific layer reads a model input directly,
            so that the tasks share no computed representation.
    """
    shared = shared_operations(outputs)
    representation = {}
    for output in outputs:
        _, nodes = _upstream(output)
        for operation, node in nodes:
            if id(operation) in shared:
                continue
            for tensor in node.input_tensors:
                producer, _ = _producer(tensor)
                if id(producer) not in shared:
                    continue
                if isinstance(producer, keras.layers.InputLayer):
                    raise ValueError(
                        f"The layer {operation.name!r} of a task reads a model "
                        "input directly; gradients with respect to the shared "
                        "representation need task layers that read only "
                        "tensors computed by shared layers."
                    )
                representation[id(tensor)] = tensor
    return list(representation.values())


def layer_outputs(outputs, name):
    """Returns the output tensors of the layer called `name` upstream of `outputs`.

    Raises:
        ValueError: If no layer of that name feeds the outputs, or it was
            called more than once.
    """
    found = {}
    for output in outputs:
        _, nodes = _upstream(output)
        for operation, node in nodes:
            if operation.name == name:
                found[id(node)] = node
    if len(found) != 1:
        problem = "no layer" if not found else f"{len(found)} calls of the layer"
        raise ValueError(
            f"`representation` names {name!r}, but the tasks' graph holds "
            f"{problem} of that name; name a layer called once, whose output "
            "every head reads."
        )
    (node,) = found.values()
    return list(node.output_tensors)
