"""vLLM plugin: serve LLaVA-1.5 models with vlmcut's vision-stage pruning.

Installed as the ``vllm.general_plugins`` entry point ``vlmcut`` (``register`` below), which vLLM runs in
every process it starts. It registers one **new** architecture, ``FlowCutLlavaForConditionalGeneration``;
a model uses it only when asked::

    from vllm import LLM
    from vlmcut.integrations.vllm import engine_overrides

    llm = LLM(model_dir, hf_overrides=engine_overrides("flowcut", keep=64))
    llm.generate({"prompt": ..., "multi_modal_data": {"image": img},
                  "mm_processor_kwargs": {"vlmcut_keep": 32}})  # per request, <= the engine's keep

This package imports neither vLLM nor torch until the model class is loaded.
"""

from __future__ import annotations

import importlib
import sys

from .settings import ARCHITECTURE, REQUEST_KEEP, build_settings, engine_overrides, vision_methods

__all__ = ["ARCHITECTURE", "REQUEST_KEEP", "build_settings", "engine_overrides", "register", "vision_methods"]

_PIXTRAL = "transformers.models.pixtral.image_processing_pixtral"
_PIXTRAL_PIL = "transformers.models.pixtral.image_processing_pil_pixtral"


def ensure_pixtral_import() -> None:
    """Make vLLM's ``llava`` module importable without torchvision.

    vLLM's ``llava`` imports its ``pixtral`` module, which imports one helper from transformers' Pixtral
    image processor; that module needs torchvision, which a CPU install of vLLM must not have (pip's
    torchvision build is linked against CUDA torch). When that import fails, the PIL twin of the module
    (same helper, no torchvision) stands in for it under the same module name, for this process.
    """
    if _PIXTRAL in sys.modules:
        return
    try:
        importlib.import_module(_PIXTRAL)
    except ImportError:
        sys.modules[_PIXTRAL] = importlib.import_module(_PIXTRAL_PIL)


def register() -> None:
    """The ``vllm.general_plugins`` entry point: registers the pruned LLaVA (lazily: vLLM imports it only
    when a model asks for the architecture). Safe to call more than once."""
    from vllm import ModelRegistry

    ensure_pixtral_import()
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, f"{__name__}.llava:{ARCHITECTURE}")
