"""Validation of method options: every bad value is a ``TypeError`` (wrong kind) or ``ValueError`` (out of
range) whose message names the option, the accepted values and what was given.

Used by the methods' config classes in ``__post_init__``; each check returns the value unchanged (or, for
sequences, as a tuple) so a frozen dataclass can store it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

__all__ = [
    "check_bool",
    "check_choice",
    "check_feature_layer",
    "check_int",
    "check_keep",
    "check_layers",
    "check_ratio",
]


def _given(value: object) -> str:
    """``value`` for a message; a long repr is cut (a huge list must not make an unreadable error)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_int(name: str, value: object, minimum: int, maximum: int | None = None) -> int:
    """An int (not a bool) in ``[minimum, maximum]``."""
    rule = f"an int >= {minimum}" if maximum is None else f"an int in [{minimum}, {maximum}]"
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be {rule}, got {type(value).__name__} ({_given(value)})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def check_feature_layer(value: object) -> int | None:
    """``feature_layer`` of a bare vision tower: ``None`` or an int ``hidden_states`` index (the range is
    checked against the tower when the method is attached)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise TypeError(
            f"feature_layer must be None or an int hidden_states index (e.g. -1: the last layer, -2: the one "
            f"before), got {type(value).__name__} ({_given(value)})"
        )
    return value


def check_keep(value: object, name: str = "keep") -> int | float:
    """``keep``: an int >= 1 (visual tokens per image) or a float ratio in (0, 1] of each image's tokens.

    Ratios are resolved per image by the model adapters that support them (Qwen2-VL / Qwen2.5-VL:
    ``max(1, round(ratio * merged tokens))``); the others reject them.
    """
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(
                f"{name} must be an int >= 1 (visual tokens per image) or a float ratio in (0, 1], "
                f"got {name}={value!r}"
            )
        if value > 1.0:  # most likely a count given as a float
            count = f"{name}={int(value)}" if value < 1e9 else f"{name}=64"
            raise TypeError(
                f"{name} must be an int count or a float ratio in (0, 1] of each image's visual tokens, got "
                f"{name}={value!r}; pass the count as an int ({count}) or a ratio such as {name}=0.25"
            )
        if not value > 0.0:
            raise ValueError(
                f"{name}={value!r}: a float {name} is a ratio of each image's visual tokens and must be in "
                f"(0, 1]; pass e.g. {name}=0.25, or an int count such as {name}=64"
            )
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"{name} must be an int >= 1 (visual tokens per image) or a float ratio in (0, 1], "
            f"got {type(value).__name__} ({_given(value)})"
        )
    if value < 1:
        raise ValueError(
            f"{name} must be >= 1 (visual tokens per image) or a float ratio in (0, 1], got {value}"
        )
    return value


def check_ratio(
    name: str, value: object, low: float, high: float, *, low_open: bool = True, high_open: bool = True
) -> float:
    """A finite real number (not a bool) in the interval from ``low`` to ``high`` (open or closed ends)."""
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"{name} must be a number in {interval}, got {type(value).__name__} ({_given(value)})"
        )
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    if not (math.isfinite(value) and above and below):
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return float(value)


def check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} ({_given(value)})")
    return value


def check_choice(name: str, value: object, choices: Iterable[str], meaning: str = "") -> str:
    """One of ``choices`` (strings); ``meaning`` explains them in the message."""
    options = tuple(choices)
    if not isinstance(value, str) or value not in options:
        listed = " or ".join(repr(c) for c in options)
        raise ValueError(f"{name} must be {listed}{f' ({meaning})' if meaning else ''}, got {_given(value)}")
    return value


def check_layers(name: str, value: Any, minimum: int) -> tuple[int, ...]:
    """A non-empty, strictly increasing sequence of ints >= ``minimum`` (decoder layer indices), as a tuple."""
    rule = f"a non-empty, strictly increasing list of ints >= {minimum}, e.g. {name}=({minimum + 2}, {minimum + 6})"
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TypeError(f"{name} must be {rule}, got {type(value).__name__} ({_given(value)})")
    layers = tuple(value)
    if not layers:
        raise ValueError(f"{name} must be {rule}, got an empty {type(value).__name__}")
    bad = [x for x in layers if isinstance(x, bool) or not isinstance(x, int)]
    if bad:
        raise TypeError(f"{name} must be {rule}; {_given(bad[0])} is not an int (got {_given(value)})")
    if min(layers) < minimum:
        raise ValueError(f"{name} must be {rule}, got {_given(value)}")
    if list(layers) != sorted(set(layers)):
        raise ValueError(f"{name} must be strictly increasing ({rule}), got {_given(value)}")
    return layers
