"""Load a local LLaVA, ask it a question, and compare unpruned with pruned answers (``vlmcut run``)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .api import prune
from .models.registry import ModelParts, adapter_for
from .overlay import kept_patch_overlay, processed_image
from .timing import StageTimer, StageTimes

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_image(path: str | Path) -> Image.Image:
    """The RGB image in ``path``, fully decoded; a clear error for a missing, directory or unreadable file."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; pass an image file")
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; pass an image file (PNG, JPEG, ...)")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")  # decodes every pixel: a truncated file fails here, not later
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        detail = " ".join(str(err).split()) or type(err).__name__
        raise ValueError(
            f"{path} is not a readable image ({detail}); pass a PNG, JPEG or other image file"
        ) from None


def model_config(model_dir: str | Path, model_types: tuple[str, ...] | None = None) -> dict[str, Any]:
    """The parsed ``config.json`` of a local Hugging Face model directory, checked before anything is loaded.

    ``model_types``: the accepted ``model_type`` values (``None``: any). Raises ``FileNotFoundError`` /
    ``NotADirectoryError`` for a path that is not a model directory and ``ValueError`` for a config that is
    unreadable or of another model type, each naming the path and what to pass instead.
    """
    path = Path(model_dir)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; pass a local Hugging Face model directory")
    if not path.is_dir():
        raise NotADirectoryError(f"{path} is not a directory; pass a local Hugging Face model directory")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{path} is not a Hugging Face model directory (no config.json); pass the directory that "
            f"save_pretrained wrote"
        )
    try:
        config = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        detail = " ".join(str(err).split())
        raise ValueError(f"{config_file} is not valid JSON ({detail}); re-save the model") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_file} does not hold a JSON object; re-save the model")
    model_type = config.get("model_type")
    if model_types is not None and model_type not in model_types:
        raise ValueError(
            f"{path} holds a {model_type!r} model; pass a {' / '.join(model_types)} model directory "
            f"(config.json model_type)"
        )
    return config


def load_llava(model_dir: str | Path, dtype: str = "float32", attn: str = "sdpa") -> tuple[Any, Any]:
    """``(model, processor)`` from a local Hugging Face LLaVA directory; never touches the network."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    path = Path(model_dir)
    model_config(path, ("llava",))
    if not any(path.glob("*.safetensors")) and not any(path.glob("pytorch_model*.bin")):
        raise FileNotFoundError(
            f"{path} holds no weights (*.safetensors or pytorch_model*.bin); pass the directory that "
            f"model.save_pretrained wrote"
        )
    if not any((path / name).is_file() for name in ("processor_config.json", "preprocessor_config.json")):
        raise FileNotFoundError(
            f"{path} holds no processor (processor_config.json or preprocessor_config.json); save it there "
            f"too: processor.save_pretrained({str(path)!r})"
        )
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


def _parts(model: Any) -> ModelParts:
    """The vision stage and the language model of a model with a language-model head."""
    parts = adapter_for(model).parts(model)
    if parts is None:
        raise TypeError(
            f"{type(model).__name__} has no language-model head to answer with; load the "
            f"...ForConditionalGeneration class (e.g. LlavaForConditionalGeneration)"
        )
    return parts


@torch.no_grad()
def generate_answers(
    model: Any, processor: Any, images: list[Image.Image], prompts: list[str], max_new_tokens: int
) -> list[str]:
    """Greedy answers, one per ``(image, prompt)``; the prompts are padded on the tokenizer's side."""
    inputs = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    inputs = {k: v.to(model.device) for k, v in inputs.items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def ask(
    model: Any, processor: Any, image: Image.Image, prompt: str, max_new_tokens: int = 32
) -> tuple[str, StageTimes, float]:
    """Greedy answer to ``prompt`` about ``image`` with its stage timings."""
    parts = _parts(model)
    with StageTimer(parts.vision, parts.llm) as timer:
        t0 = time.perf_counter()
        text = generate_answers(model, processor, [image], [prompt], max_new_tokens)[0]
        total = time.perf_counter() - t0
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
    with prune(model, method, keep=keep, **options) as handle:
        p_text, p_times, p_total = ask(model, processor, image, prompt, max_new_tokens)
    # Visual tokens the language model reads: the patches the tower saw, plus CLS with the "full" strategy.
    n_full = handle.num_patches + int(model.config.vision_feature_select_strategy == "full")
    base = Answer(text, n_full, times, total)
    pruned = Answer(
        p_text,
        min(keep, n_full),
        p_times,
        p_total,
        kept_indices=handle.kept_indices,
        tokens_per_layer=handle.tokens_per_layer,
    )
    return base, pruned


def save_overlay(
    processor: Any, model: Any, image: Image.Image, kept: torch.Tensor, path: str | Path
) -> Path:
    """Write the model's view of ``image`` with the kept patches highlighted."""
    ip = processor.image_processor
    pv = ip(images=[image], return_tensors="pt")["pixel_values"][0]
    ps = model.config.vision_config.patch_size
    grid = (pv.shape[-2] // ps, pv.shape[-1] // ps)
    view = processed_image(pv, ip.image_mean, ip.image_std)
    out = kept_patch_overlay(view, kept, grid)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out.save(path)
    return path
