"""vlmcut: visual token pruning for Hugging Face vision-language models.

handle = vlmcut.prune(model, "flowcut", keep=64)   # this instance only
...                                                 # model(**inputs), model.generate(**inputs)
handle.remove()                                     # exactly as before
"""

from __future__ import annotations

from .api import PruneHandle, available_methods, prune, supported
from .methods.fastervlm import FasterVLMConfig
from .methods.fastv import FastVConfig
from .methods.flowcut import FlowCutConfig
from .methods.pdrop import PDropConfig
from .methods.reference import GridConfig, RandomConfig
from .methods.sparsevlm import SparseVLMConfig
from .methods.visionzip import VisionZipConfig

__all__ = [
    "FastVConfig",
    "FasterVLMConfig",
    "FlowCutConfig",
    "GridConfig",
    "PDropConfig",
    "PruneHandle",
    "RandomConfig",
    "SparseVLMConfig",
    "VisionZipConfig",
    "available_methods",
    "prune",
    "supported",
]
__version__ = "0.1.0"
