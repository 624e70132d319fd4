"""The pruning methods. Each module registers its :class:`~vlmcut.methods.base.MethodSpec` when imported;
importing this package imports every module in it, so :data:`~vlmcut.methods.base.METHODS` is complete and a
new method file needs no edit elsewhere."""

import importlib
import pkgutil

from .base import METHODS, MethodSpec, available_methods, get_method, register_method

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["METHODS", "MethodSpec", "available_methods", "get_method", "register_method"]
