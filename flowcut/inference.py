"""Load a local LLaVA, ask it a question, and compare unpruned with pruned answers (``flowcut run``)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .analysis.overlay import kept_patch_overlay, processed_image
from .api import prune
from .bench.timing import StageTimer, StageTimes

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_llava(model_dir: str | Path, dtype: str = "float32", attn: str = "sdpa") -> tuple[Any, Any]:
    """``(model, processor)`` from a local Hugging Face LLaVA directory; never touches the network."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a Hugging Face model directory (no config.json)")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    model = LlavaForConditionalGeneration.from_pretrained(
        path, local_files_only=True, dtype=DTYPES[dtype], attn_implementation=attn
    )
    return model.eval(), processor


def build_prompt(processor: Any, question: str) -> str:
    """The processor's chat template with one image, or LLaVA-1.5's plain format; a prompt that already
    contains ``<image>`` is used as given."""
    token = getattr(processor, "image_token", "<image>")
    if token in question:
        return question
    if getattr(processor, "chat_template", None):
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return processor.apply_chat_template(conversation, add_generation_prompt=True)
    return f"USER: {token}\n{question} ASSISTANT:"


@dataclass
class Answer:
    """One generation: decoded answer, visual tokens given to the language model, timings."""

    text: str
    visual_tokens: int
    times: StageTimes
    total_s: float
    kept_indices: torch.Tensor | None = None
    tokens_per_layer: list[int] = field(default_factory=list)


def _inner(model: Any) -> Any:
    return model.model if hasattr(model, "model") and hasattr(model.model, "vision_tower") else model


def ask(
    model: Any, processor: Any, image: Image.Image, prompt: str, max_new_tokens: int = 32
) -> tuple[str, StageTimes, float]:
    """Greedy answer to ``prompt`` about ``image`` with its stage timings."""
    inputs = processor(images=[image], text=[prompt], return_tensors="pt")
    inputs = {k: v.to(model.device) for k, v in inputs.items()}
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    inner = _inner(model)
    with torch.no_grad(), StageTimer(inner.vision_tower, inner.language_model) as timer:
        t0 = time.perf_counter()
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        total = time.perf_counter() - t0
    text = processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0]
    return text.strip(), timer.times, total


def compare(
    model: Any,
    processor: Any,
    image: Image.Image,
    question: str,
    keep: int,
    method: str = "flowcut",
    max_new_tokens: int = 32,
    **options: Any,
) -> tuple[Answer, Answer]:
    """Answer unpruned, then with ``method`` at ``keep`` tokens; the model is restored afterwards."""
    prompt = build_prompt(processor, question)
    text, times, total = ask(model, processor, image, prompt, max_new_tokens)
    patches = _num_patches(model, processor, image)
    strategy = _inner(model).config.vision_feature_select_strategy
    n_full = patches + (1 if strategy == "full" else 0)
    base = Answer(text, n_full, times, total)
    with prune(model, method, keep=keep, **options) as handle:
        p_text, p_times, p_total = ask(model, processor, image, prompt, max_new_tokens)
    pruned = Answer(
        p_text,
        min(keep, n_full),
        p_times,
        p_total,
        kept_indices=handle.kept_indices,
        tokens_per_layer=handle.tokens_per_layer,
    )
    return base, pruned


def _num_patches(model: Any, processor: Any, image: Image.Image) -> int:
    pv = processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
    ps = _inner(model).config.vision_config.patch_size
    return (pv.shape[-2] // ps) * (pv.shape[-1] // ps)


def save_overlay(
    processor: Any, model: Any, image: Image.Image, kept: torch.Tensor, path: str | Path
) -> Path:
    """Write the model's view of ``image`` with the kept patches highlighted."""
    ip = processor.image_processor
    pv = ip(images=[image], return_tensors="pt")["pixel_values"][0]
    ps = _inner(model).config.vision_config.patch_size
    grid = (pv.shape[-2] // ps, pv.shape[-1] // ps)
    view = processed_image(pv, ip.image_mean, ip.image_std)
    out = kept_patch_overlay(view, kept, grid)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out.save(path)
    return path
