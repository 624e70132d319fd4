"""``--model_args`` for the ``vlmcut`` lmms-eval model: raw strings converted to the method config's types.

Only the *type* is converted here (``"64"`` -> ``64`` for an ``int`` field); every range and choice is left to
the method's own config class, so a user sees vlmcut's messages. Needs neither lmms-eval nor a model.
"""

from __future__ import annotations

import json
import types
import typing
from typing import Any

import vlmcut

NO_PRUNING = "none"  # method=none: the unpruned baseline
_NONE_WORDS = ("none", "null")
_TRUE_WORDS = ("true", "yes", "1")
_FALSE_WORDS = ("false", "no", "0")


def method_names() -> list[str]:
    """What ``method=`` accepts: :func:`vlmcut.available_methods` and ``none``."""
    return [NO_PRUNING, *vlmcut.available_methods()]


def config_class(method: str) -> type | None:
    """The config class ``method`` is registered with (``FlowCutConfig`` for ``flowcut``); ``None`` for an
    unknown name (``vlmcut.prune`` then says which names exist)."""
    from vlmcut.methods import METHODS

    spec = METHODS.get(method)
    return spec.config_cls if spec is not None else None


def _parse_scalar(text: str) -> Any:
    """A value whose field type is unknown: int, float, bool or the text itself."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _convert(text: str, hint: Any) -> Any:
    """``text`` as a value of type ``hint``; the text unchanged when it is not one (the config then raises
    its own error naming the field and what it accepts)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        members = typing.get_args(hint)
        if type(None) in members and text.strip().lower() in _NONE_WORDS:
            return None
        # ``int | float`` (keep): an int when the text is one, else a float ratio.
        for member in (m for m in members if m is not type(None)):
            value = _convert(text, member)
            if not isinstance(value, str) or member is str:
                return value
        return text
    if origin is typing.Literal or hint is str:
        return text
    if hint is bool:
        low = text.strip().lower()
        return True if low in _TRUE_WORDS else False if low in _FALSE_WORDS else text
    if hint is int:
        try:
            return int(text)
        except ValueError:
            return text
    if hint is float:
        try:
            return float(text)
        except ValueError:
            return text
    if origin is tuple:
        # layers=8;16;24 (commas separate --model_args) or a JSON list: layers=[8,16,24]
        body = text.strip()
        try:
            items = json.loads(body) if body.startswith("[") else body.replace(";", " ").split()
        except ValueError:
            return text
        args = typing.get_args(hint)
        item = args[0] if args else str
        return tuple(_convert(str(v), item) for v in items)
    return text


def convert_option(value: Any, hint: Any) -> Any:
    """A ``--model_args`` value (a string, or an int / float / bool that lmms-eval already parsed) as a
    value of the field type ``hint``."""
    if isinstance(value, str):
        return _convert(value, hint)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and float in typing.get_args(hint):
        if int not in typing.get_args(hint) and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
    return value


def prune_options(method: str, keep: Any, options: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """``(keep, options)`` converted to ``method``'s config field types. Unknown option names pass through
    so that :func:`vlmcut.prune` reports them with the list of valid ones."""
    cls = config_class(method)
    if cls is None:
        conv = {k: _parse_scalar(v) if isinstance(v, str) else v for k, v in options.items()}
        return (_parse_scalar(keep) if isinstance(keep, str) else keep), conv
    hints = typing.get_type_hints(cls)
    keep = convert_option(keep, hints.get("keep", int | float))
    out = {}
    for name, value in options.items():
        out[name] = convert_option(value, hints[name]) if name in hints else value
    return keep, out


def check_method(method: Any) -> str:
    """``method`` as given, or the error :func:`vlmcut.prune` would raise, with ``none`` listed too."""
    if not isinstance(method, str) or method not in method_names():
        raise ValueError(f"unknown method {method!r}; available: {method_names()} (none: the unpruned model)")
    return method
