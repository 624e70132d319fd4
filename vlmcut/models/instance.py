"""Replacing a method on one module instance (never its class), with the function that undoes it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn


def replace_method(module: nn.Module, name: str, new: Callable[..., Any]) -> Callable[[], None]:
    """Set ``module.<name> = new`` on this instance (the class and other instances are untouched); ``new``
    gets the original's docstring. Returns the function that restores the instance exactly (an attribute the
    instance had before is put back, otherwise the instance attribute is deleted)."""
    had_attr = name in vars(module)
    original = getattr(module, name)
    new.__doc__ = getattr(original, "__doc__", None)
    setattr(module, name, new)

    def restore() -> None:
        if had_attr:
            setattr(module, name, original)
        else:
            delattr(module, name)

    return restore
