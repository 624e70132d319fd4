"""The model a benchmark runs, its dtype, and the size of its example image."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..models.registry import ModelParts, adapter_for
from .flops import PAPER_NEXT_IMAGE_SIZE
from .presets import PRESETS, build_preset_model, default_image_size, get_preset, model_class_for


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        out = getattr(torch, dtype)
    except AttributeError:
        out = None
    if not isinstance(out, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r} (float32, bfloat16, float16)")
    return out


def load_model(
    model_or_preset: str | Path | nn.Module,
    layers: int | None,
    dtype: torch.dtype,
    device: torch.device,
    seed: int = 0,
) -> tuple[nn.Module, str, str | None]:
    """The model to benchmark, its display name, and a note when the LLM was shortened.

    ``model_or_preset``: a preset name (random weights from its config), a local Hugging Face LLaVA,
    LLaVA-NeXT or Qwen2-VL directory (the class is picked from its ``config.json``), or a ready
    ``LlavaForConditionalGeneration`` / ``LlavaNextForConditionalGeneration`` /
    ``Qwen2VLForConditionalGeneration`` (used as is; ``layers`` must be ``None``).
    """
    if isinstance(model_or_preset, nn.Module):
        if layers is not None:
            raise ValueError("layers can only shorten a preset or a model loaded from a directory")
        return model_or_preset, type(model_or_preset).__name__, None
    name = str(model_or_preset)
    if name in PRESETS:
        full = int(get_preset(name).build(None).text_config.num_hidden_layers)
        model = build_preset_model(
            name, num_llm_layers=layers, dtype=dtype, device=device, attn_implementation="sdpa", seed=seed
        )
        label = f"preset {name} (random weights)"
    else:
        path = Path(name)
        if not path.is_dir():
            raise ValueError(
                f"{name!r} is neither a preset ({', '.join(PRESETS)}) nor a local model directory"
            )
        from transformers import AutoConfig

        cls = model_class_for(AutoConfig.from_pretrained(path))
        model = cls.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
        model = model.to(device).eval()
        full = int(model.config.text_config.num_hidden_layers)
        if layers is not None:
            lm = bench_parts(model).llm
            if not 1 <= layers <= len(lm.layers):
                raise ValueError(f"layers must be in 1..{len(lm.layers)}, got {layers}")
            lm.layers = nn.ModuleList(list(lm.layers)[:layers])
            model.config.text_config.num_hidden_layers = layers
        label = f"{path.name} ({path})"
    note = None
    if layers is not None and layers != full:
        note = (
            f"LLM shortened to {layers} of {full} decoder layers (FLOPs and times cover the shortened model; "
            f"the vision tower and projector are full size)"
        )
    return model, label, note


def bench_parts(model: nn.Module) -> ModelParts:
    """The modules of ``model`` the benchmark times and counts (its family adapter's
    :meth:`~vlmcut.models.registry.ModelAdapter.parts`); a ``TypeError`` for a model it cannot run."""
    adapter = adapter_for(model)
    parts = adapter.parts(model)
    if parts is None:
        raise TypeError(
            f"the benchmark cannot run {type(model).__name__}: it times and counts the vision tower, the "
            f"language model and lm_head of a ...ForConditionalGeneration model, and the {adapter.title} "
            f"adapter names none for this class"
        )
    return parts


def bench_image_size(config: Any, image_size: Sequence[int] | None = None) -> tuple[int, int]:
    """``(height, width)`` of the benchmark's image: ``image_size`` if given; LLaVA-NeXT: the paper's
    640x427 POPE image (:data:`~vlmcut.bench.flops.PAPER_NEXT_IMAGE_SIZE`) scaled by the crop size / 336
    (so a toy tower gets the same 2x2-grid-plus-unpadding geometry); otherwise the tower's square size
    (LLaVA-1.5: fixed; Qwen2-VL: 448x448, 256 merged tokens)."""
    if image_size is not None:
        h, w = (int(x) for x in image_size)
        if h < 1 or w < 1:
            raise ValueError(f"image_size must be two positive ints (height, width), got {image_size!r}")
        return h, w
    if config.model_type == "llava_next":
        scale = int(config.vision_config.image_size) / 336
        return round(PAPER_NEXT_IMAGE_SIZE[0] * scale), round(PAPER_NEXT_IMAGE_SIZE[1] * scale)
    return default_image_size(config)


__all__ = ["bench_image_size", "bench_parts", "load_model", "resolve_dtype"]
