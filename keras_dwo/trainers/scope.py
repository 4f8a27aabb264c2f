"""The enclosing `keras.StatelessScope`, which `value_and_jacobian` reads through."""

from keras.src.backend.common.stateless_scope import get_stateless_scope

__all__ = ["get_stateless_scope", "nested_mapping"]


def nested_mapping(pairs):
    """Returns the enclosing scope's mapping, by variable id, updated by `pairs`.

    A `keras.StatelessScope` opened inside another hides the outer one's
    values; a scope built on this mapping keeps them.
    """
    outer = get_stateless_scope()
    mapping = {} if outer is None else dict(outer.state_mapping)
    mapping.update((id(variable), value) for variable, value in pairs)
    return mapping
