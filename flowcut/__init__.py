"""flowcut: visual token pruning for Hugging Face vision-language models.

handle = flowcut.prune(model, "flowcut", keep=64)   # this instance only
...                                                 # model(**inputs), model.generate(**inputs)
handle.remove()                                     # exactly as before
"""

from __future__ import annotations

from .api import PruneHandle, available_methods, prune
from .methods.flowcut import FlowCutConfig
from .methods.reference import GridConfig, RandomConfig

__all__ = ["FlowCutConfig", "GridConfig", "PruneHandle", "RandomConfig", "available_methods", "prune"]
__version__ = "0.1.0"
