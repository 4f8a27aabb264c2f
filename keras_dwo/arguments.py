"""Checks of the numeric arguments of methods and callbacks."""

import math


def checked_number(name, value, low=None, high=None, low_open=False, high_open=False):
    """Returns `value` as a float, or raises a `ValueError` naming `name`.

    NaN is refused whatever the range: a comparison with NaN is false, so a
    check written as `value < 0` would let it through, and a NaN
    hyper-parameter makes every training step non-finite, hence skipped.

    Args:
        name: The argument's name, for the message.
        value: The number given.
        low: The lowest value allowed, or None for no lower bound.
        high: The highest value allowed, or None for no upper bound.
        low_open: Whether `low` itself is refused.
        high_open: Whether `high` itself is refused.

    Returns:
        `float(value)`.

    Raises:
        ValueError: If `value` is not a number, is NaN or is out of range.
    """
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"`{name}` must be a number; received {value!r}.") from None
    too_low = low is not None and (number <= low if low_open else number < low)
    too_high = high is not None and (number >= high if high_open else number > high)
    if math.isnan(number) or too_low or too_high:
        raise ValueError(
            f"`{name}` must be {_describe(low, high, low_open, high_open)}; "
            f"received {value!r}."
        )
    return number


def _describe(low, high, low_open, high_open):
    if low is None and high is None:
        return "a number, not NaN"
    if high is None:
        if low == 0:
            return "positive" if low_open else "non-negative"
        return f"{'>' if low_open else '>='} {low}"
    if low is None:
        return f"{'<' if high_open else '<='} {high}"
    return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
