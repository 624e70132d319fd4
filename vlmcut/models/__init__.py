"""The model side: one file per family, each registering its :class:`~vlmcut.models.registry.ModelAdapter`
when imported. Importing this package imports every module in it, so a new family file is registered
without editing anything else."""

import importlib
import pkgutil

from .registry import ADAPTERS, ModelAdapter, adapter_for, register_adapter, supported_models

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["ADAPTERS", "ModelAdapter", "adapter_for", "register_adapter", "supported_models"]
