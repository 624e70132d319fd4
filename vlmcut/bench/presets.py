"""Named model-shape presets for the efficiency benchmark: configs only, no weights, nothing downloaded.

Each preset builds a real ``transformers`` config (``LlavaConfig``, ``LlavaNextConfig``, ``Qwen2VLConfig``)
with the shapes of a published checkpoint, so that

* :mod:`vlmcut.bench.flops` can read the shapes it needs for the analytic FLOPs model, and
* :func:`build_preset_model` can instantiate the real ``transformers`` class with random weights, to time
  the prefill of a full-size architecture without its checkpoint (optionally with a shortened language
  model, ``num_llm_layers``, for CPU runs).

Presets (shapes from the ``config.json`` of the named Hugging Face checkpoints):

* ``llava-1.5-7b`` (``llava-hf/llava-1.5-7b-hf``): CLIP ViT-L/14-336 (24 layers, hidden 1024, 16 heads,
  MLP 4096, 577 tokens = CLS + 24x24 patches; the model reads ``hidden_states[-2]``), 2-layer GELU
  projector 1024 -> 4096 -> 4096, Vicuna-7B v1.5 = Llama-2-7B (32 layers, hidden 4096, 32 heads, MLP
  11008). The HF port's vocabulary is 32064 (the original 32000 + ``<image>``/``<pad>``, padded to a
  multiple of 64; ``<image>`` = 32000 must be a valid id); the original LLaVA release had 32000, a 0.2 %
  difference on the ``lm_head`` only.
* ``llava-next-7b`` (``llava-hf/llava-v1.6-vicuna-7b-hf``): the same tower / projector / LLM; "anyres" with
  the grid pinpoints 336x672, 672x336, 672x672, 1008x336, 336x1008: at most 4 crops + 1 base image =
  5 x 576 = 2880 visual tokens before unpadding and row-end (newline) tokens; see
  :func:`llava_next_num_image_tokens` for the exact count of an image size (640x427 -> 2144).
* ``qwen2-vl-7b`` (``Qwen/Qwen2-VL-7B-Instruct``): ViT with 32 layers, hidden 1280, 16 heads, MLP 5120,
  patch 14 (temporal patch 2), no CLS token, 2x2 patch merger 4*1280 -> 5120 -> 3584; Qwen2-7B LM:
  28 layers, hidden 3584, 28 heads, 4 KV heads, MLP 18944, vocab 152064, M-RoPE (16, 24, 24).
* ``tiny``: a LLaVA-1.5-shaped toy for CI (CLIP 6 layers, hidden 32, on 112x112 images: 64 patches + CLS;
  Llama 4 layers, hidden 64, GQA 4/2 heads, vocab 256). Builds and runs a forward in milliseconds.
* ``tiny-llava-next``: the same toy with LLaVA-NeXT anyres (crop 112, pinpoints scaled from the 7B ones).
* ``tiny-qwen2-vl``: a Qwen2-VL-shaped toy (ViT 4 layers, hidden 32; LM 4 layers, hidden 64, GQA 4/2).

:func:`example_inputs` makes well-formed random inputs for any preset (the image-token count follows the
same geometry as the ``transformers`` processors: :func:`num_image_tokens`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaNextConfig,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2VLConfig,
)

Family = Literal["llava", "llava_next", "qwen2_vl"]

# ---------------------------------------------------------------------------------------------------------
# Published shapes (config.json of the checkpoints named in the module docstring)
# ---------------------------------------------------------------------------------------------------------

# CLIP ViT-L/14-336 (openai/clip-vit-large-patch14-336), the tower of LLaVA-1.5 and LLaVA-NeXT.
CLIP_L336: dict[str, Any] = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 336,
    "patch_size": 14,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}

# Vicuna-7B v1.5 (Llama-2-7B shapes), the LLM of llava-1.5-7b and llava-v1.6-vicuna-7b. The llava-hf ports
# use a 32064-token vocabulary (32000 + <image> + <pad>, padded to a multiple of 64).
VICUNA_7B: dict[str, Any] = {
    "vocab_size": 32064,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
LLAVA_IMAGE_TOKEN_ID = 32000  # llava-hf: <image> = 32000, <pad> = 32001

# LLaVA-NeXT "anyres" grid pinpoints, (height, width) in pixels (llava-v1.6 config.json).
LLAVA_NEXT_PINPOINTS: list[list[int]] = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]

# Qwen2-VL-7B-Instruct vision tower (config.json "vision_config").
QWEN2_VL_7B_VISION: dict[str, Any] = {
    "depth": 32,
    "embed_dim": 1280,
    "hidden_size": 3584,  # merger output = LLM hidden size
    "mlp_ratio": 4,  # MLP 5120
    "num_heads": 16,
    "in_channels": 3,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "hidden_act": "quick_gelu",
}
# Qwen2-7B language model inside Qwen2-VL-7B-Instruct.
QWEN2_VL_7B_TEXT: dict[str, Any] = {
    "vocab_size": 152064,
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [16, 24, 24]},
    "bos_token_id": 151643,
    "eos_token_id": 151645,
}
QWEN2_VL_TOKEN_IDS: dict[str, int] = {
    "image_token_id": 151655,
    "video_token_id": 151656,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
}

# Toy shapes for CI.
TINY_CLIP: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 6,
    "num_attention_heads": 2,
    "image_size": 112,  # 8 x 8 = 64 patches + CLS
    "patch_size": 14,
    "projection_dim": 32,
    "hidden_act": "quick_gelu",
}
TINY_LLAMA: dict[str, Any] = {
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
TINY_IMAGE_TOKEN_ID = 255
TINY_NEXT_PINPOINTS: list[list[int]] = [[112, 224], [224, 112], [224, 224], [336, 112], [112, 336]]
TINY_QWEN2_VL_VISION: dict[str, Any] = {
    "depth": 4,
    "embed_dim": 32,
    "hidden_size": 64,
    "mlp_ratio": 2,
    "num_heads": 2,
    "in_channels": 3,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
}
TINY_QWEN2_VL_TEXT: dict[str, Any] = {
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    # head_dim 16 -> 8 rotary frequencies split over (temporal, height, width)
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
    "bos_token_id": 1,
    "eos_token_id": 2,
}
TINY_QWEN2_VL_TOKEN_IDS: dict[str, int] = {
    "image_token_id": 250,
    "video_token_id": 251,
    "vision_start_token_id": 252,
    "vision_end_token_id": 253,
}


# ---------------------------------------------------------------------------------------------------------
# Config builders
# ---------------------------------------------------------------------------------------------------------


def _text_kwargs(base: dict[str, Any], num_llm_layers: int | None) -> dict[str, Any]:
    kwargs = dict(base)
    if "rope_parameters" in kwargs:
        kwargs["rope_parameters"] = dict(kwargs["rope_parameters"])
    if num_llm_layers is not None:
        if isinstance(num_llm_layers, bool) or not isinstance(num_llm_layers, int) or num_llm_layers < 1:
            raise ValueError(f"num_llm_layers must be a positive int, got {num_llm_layers!r}")
        kwargs["num_hidden_layers"] = num_llm_layers
    return kwargs


def _llava(
    vision: dict[str, Any], text: dict[str, Any], image_token_id: int, num_llm_layers: int | None
) -> LlavaConfig:
    vision_config = CLIPVisionConfig(**vision)
    patches = (vision["image_size"] // vision["patch_size"]) ** 2
    return LlavaConfig(
        vision_config=vision_config,
        text_config=LlamaConfig(**_text_kwargs(text, num_llm_layers)),
        image_token_index=image_token_id,
        image_seq_length=patches,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )


def _llava_next(
    vision: dict[str, Any],
    text: dict[str, Any],
    image_token_id: int,
    pinpoints: list[list[int]],
    num_llm_layers: int | None,
) -> LlavaNextConfig:
    patches = (vision["image_size"] // vision["patch_size"]) ** 2
    return LlavaNextConfig(
        vision_config=CLIPVisionConfig(**vision),
        text_config=LlamaConfig(**_text_kwargs(text, num_llm_layers)),
        image_token_index=image_token_id,
        image_seq_length=patches,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        image_grid_pinpoints=[list(p) for p in pinpoints],
    )


def _qwen2_vl(
    vision: dict[str, Any], text: dict[str, Any], token_ids: dict[str, int], num_llm_layers: int | None
) -> Qwen2VLConfig:
    text_kwargs = _text_kwargs(text, num_llm_layers)
    # Sliding window is off in Qwen2-VL; max_window_layers only matters when it is on.
    text_kwargs["max_window_layers"] = text_kwargs["num_hidden_layers"]
    return Qwen2VLConfig(vision_config=dict(vision), text_config=text_kwargs, **token_ids)


@dataclass(frozen=True)
class Preset:
    """A named model shape.

    Attributes:
        name: the preset's name (key of :data:`PRESETS`).
        family: ``"llava"``, ``"llava_next"`` or ``"qwen2_vl"`` (selects the ``transformers`` class).
        source: the Hugging Face checkpoint whose ``config.json`` the shapes follow (nothing is downloaded).
        description: one line for listings.
        build: ``build(num_llm_layers) -> config``.
        tiny: whether the preset is a CPU-sized toy (its models default to float32).
    """

    name: str
    family: Family
    source: str
    description: str
    build: Callable[[int | None], PretrainedConfig]
    tiny: bool = False


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "llava-1.5-7b",
            "llava",
            "llava-hf/llava-1.5-7b-hf",
            "CLIP ViT-L/14-336 + 2-layer MLP projector + Vicuna-7B; 576 visual tokens",
            lambda n: _llava(CLIP_L336, VICUNA_7B, LLAVA_IMAGE_TOKEN_ID, n),
        ),
        Preset(
            "llava-next-7b",
            "llava_next",
            "llava-hf/llava-v1.6-vicuna-7b-hf",
            "LLaVA-1.5 shapes with anyres: up to 5 crops x 576 = 2880 visual tokens (before unpadding)",
            lambda n: _llava_next(CLIP_L336, VICUNA_7B, LLAVA_IMAGE_TOKEN_ID, LLAVA_NEXT_PINPOINTS, n),
        ),
        Preset(
            "qwen2-vl-7b",
            "qwen2_vl",
            "Qwen/Qwen2-VL-7B-Instruct",
            "Qwen2-VL ViT (32 x 1280) + 2x2 merger + Qwen2-7B (28 x 3584, GQA 28/4)",
            lambda n: _qwen2_vl(QWEN2_VL_7B_VISION, QWEN2_VL_7B_TEXT, QWEN2_VL_TOKEN_IDS, n),
        ),
        Preset(
            "tiny",
            "llava",
            "(toy)",
            "LLaVA-shaped toy for CI: CLIP 6 x 32 on 112 px (64 patches), Llama 4 x 64",
            lambda n: _llava(TINY_CLIP, TINY_LLAMA, TINY_IMAGE_TOKEN_ID, n),
            tiny=True,
        ),
        Preset(
            "tiny-llava-next",
            "llava_next",
            "(toy)",
            "LLaVA-NeXT-shaped toy for CI: anyres with 112 px crops",
            lambda n: _llava_next(TINY_CLIP, TINY_LLAMA, TINY_IMAGE_TOKEN_ID, TINY_NEXT_PINPOINTS, n),
            tiny=True,
        ),
        Preset(
            "tiny-qwen2-vl",
            "qwen2_vl",
            "(toy)",
            "Qwen2-VL-shaped toy for CI: ViT 4 x 32, 2x2 merger, LM 4 x 64",
            lambda n: _qwen2_vl(TINY_QWEN2_VL_VISION, TINY_QWEN2_VL_TEXT, TINY_QWEN2_VL_TOKEN_IDS, n),
            tiny=True,
        ),
    )
}


def list_presets() -> list[str]:
    """Names of all presets, in definition order."""
    return list(PRESETS)


def get_preset(name: str) -> Preset:
    """The :class:`Preset` called ``name``; a ``KeyError`` naming the known presets otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}") from None


def preset_config(name: str, num_llm_layers: int | None = None) -> PretrainedConfig:
    """A fresh ``transformers`` config with the shapes of preset ``name``.

    Args:
        name: a key of :data:`PRESETS`.
        num_llm_layers: if given, the language model keeps only its first ``num_llm_layers`` decoder layers
            (for CPU runs; FLOPs and timings then cover the shortened model).

    Returns:
        ``LlavaConfig``, ``LlavaNextConfig`` or ``Qwen2VLConfig``.
    """
    return get_preset(name).build(num_llm_layers)


def model_class_for(config: PretrainedConfig) -> type[PreTrainedModel]:
    """The ``*ForConditionalGeneration`` class of a LLaVA / LLaVA-NeXT / Qwen2-VL config."""
    from transformers import (
        LlavaForConditionalGeneration,
        LlavaNextForConditionalGeneration,
        Qwen2VLForConditionalGeneration,
    )

    classes: dict[str, type[PreTrainedModel]] = {
        "llava": LlavaForConditionalGeneration,
        "llava_next": LlavaNextForConditionalGeneration,
        "qwen2_vl": Qwen2VLForConditionalGeneration,
    }
    try:
        return classes[config.model_type]
    except KeyError:
        raise ValueError(f"no preset model class for model_type {config.model_type!r}") from None


def build_preset_model(
    name: str,
    num_llm_layers: int | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    attn_implementation: str | None = None,
    seed: int | None = 0,
) -> PreTrainedModel:
    """Instantiate the real ``transformers`` model of a preset with random weights (no download).

    Args:
        name: a key of :data:`PRESETS`.
        num_llm_layers: shorten the language model to this many decoder layers (see :func:`preset_config`).
        dtype: parameter dtype; default float32 for the ``tiny*`` presets and bfloat16 for full-size ones
            (a float32 7B model needs ~30 GB).
        device: where the parameters are created. ``"meta"`` builds the module tree without memory (for
            shape inspection and parameter counts); ``"cuda"`` initialises directly on the GPU.
        attn_implementation: e.g. ``"sdpa"`` or ``"eager"``; ``None`` keeps the ``transformers`` default.
        seed: seed for the random initialisation (``None`` leaves the global RNG alone).

    Returns:
        ``LlavaForConditionalGeneration``, ``LlavaNextForConditionalGeneration`` or
        ``Qwen2VLForConditionalGeneration`` in eval mode.
    """
    preset = get_preset(name)
    config = preset.build(num_llm_layers)
    if dtype is None:
        dtype = torch.float32 if preset.tiny else torch.bfloat16
    cls = model_class_for(config)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if seed is not None:
        torch.manual_seed(seed)
    with torch.device(device):
        model = cls._from_config(config, **kwargs)
    return model.eval()


# ---------------------------------------------------------------------------------------------------------
# Image geometry: how many visual tokens an image of a given size becomes
# ---------------------------------------------------------------------------------------------------------

ImageSize = tuple[int, int]  # (height, width) in pixels


def resolve_config(preset_or_config: str | PretrainedConfig) -> PretrainedConfig:
    """A preset name or a ready config -> the config (a fresh one for names)."""
    if isinstance(preset_or_config, str):
        return preset_config(preset_or_config)
    return preset_or_config


def _patches_per_side(config: PretrainedConfig) -> int:
    vision = config.vision_config
    return int(vision.image_size) // int(vision.patch_size)


def llava_next_crop_grid(config: PretrainedConfig, image_size: ImageSize) -> tuple[int, int]:
    """(rows, cols) of high-resolution crops LLaVA-NeXT "anyres" cuts an image of ``(height, width)`` into.

    The best grid pinpoint is chosen as in ``transformers`` (most effective pixels, then least waste); the
    model also encodes one base (resized whole-image) crop, so it runs ``rows * cols + 1`` crops.
    """
    from transformers.image_processing_utils import select_best_resolution

    crop = int(config.vision_config.image_size)
    best_h, best_w = select_best_resolution(tuple(image_size), config.image_grid_pinpoints)
    return best_h // crop, best_w // crop


def llava_next_num_crops(config: PretrainedConfig, image_size: ImageSize) -> int:
    """Number of encoder passes (crops incl. the base image) of LLaVA-NeXT for an image ``(height, width)``."""
    rows, cols = llava_next_crop_grid(config, image_size)
    return rows * cols + 1


def llava_next_num_image_tokens(config: PretrainedConfig, image_size: ImageSize) -> int:
    """Visual tokens LLaVA-NeXT feeds its LLM for one image ``(height, width)`` (unpruned).

    Base crop ``p*p`` (``p`` = patches per side, 24 for 336/14) + the unpadded high-resolution grid
    ``h' * w'`` + one newline token per unpadded row ``h'``; same rounding as ``transformers``'
    ``unpad_image``. Example (7B): a 640x480 (w x h) COCO image -> 2x2 grid, 48x48 -> 36x48 unpadded:
    576 + 1728 + 36 = 2340; 640x427 -> 576 + 1536 + 32 = 2144; a square image -> 576 + 2304 + 48 = 2928.
    The nominal "2880" of the paper is 5 crops x 576 without unpadding or newlines.
    """
    p = _patches_per_side(config)
    rows, cols = llava_next_crop_grid(config, image_size)
    height, width = image_size
    cur_h, cur_w = rows * p, cols * p
    if width / height > cur_w / cur_h:
        new_h = int(round(height * (cur_w / width), 7))
        cur_h -= 2 * ((cur_h - new_h) // 2)
    else:
        new_w = int(round(width * (cur_h / height), 7))
        cur_w -= 2 * ((cur_w - new_w) // 2)
    return p * p + cur_h * cur_w + cur_h


def qwen2_vl_patch_grid(
    config: PretrainedConfig,
    image_size: ImageSize,
    min_pixels: int = 56 * 56,
    max_pixels: int = 28 * 28 * 1280,
) -> tuple[int, int, int]:
    """``(t, h, w)`` patch grid (``image_grid_thw``) of Qwen2-VL for one image ``(height, width)``.

    The image is resized to multiples of ``patch_size * spatial_merge_size`` (28) with the pixel budget of
    the ``transformers`` image processor defaults (``min_pixels``/``max_pixels``). The ViT runs on
    ``t*h*w`` patch tokens; the LLM receives ``t*h*w / merge**2`` tokens.
    """
    vision = config.vision_config
    factor = int(vision.patch_size) * int(vision.spatial_merge_size)
    height, width = image_size
    if min(height, width) < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    # Same resize rule as transformers' Qwen2-VL image processor (which needs torchvision to import):
    # round each side to a multiple of `factor`, then rescale into [min_pixels, max_pixels].
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return 1, h // int(vision.patch_size), w // int(vision.patch_size)


def default_image_size(config: PretrainedConfig) -> ImageSize:
    """The square image the tower was built for (336x336 for CLIP-L/336; 448x448 for Qwen2-VL)."""
    if config.model_type == "qwen2_vl":
        return 448, 448
    side = int(config.vision_config.image_size)
    return side, side


def num_image_tokens(preset_or_config: str | PretrainedConfig, image_size: ImageSize | None = None) -> int:
    """Visual tokens one unpruned image of ``(height, width)`` contributes to the LLM's input sequence.

    LLaVA-1.5: always ``(image_size / patch)**2`` (576); LLaVA-NeXT: see
    :func:`llava_next_num_image_tokens`; Qwen2-VL: merged patch tokens of :func:`qwen2_vl_patch_grid`.
    ``image_size=None`` uses :func:`default_image_size`.
    """
    config = resolve_config(preset_or_config)
    size = default_image_size(config) if image_size is None else image_size
    if config.model_type == "llava":
        return _patches_per_side(config) ** 2
    if config.model_type == "llava_next":
        return llava_next_num_image_tokens(config, size)
    if config.model_type == "qwen2_vl":
        t, h, w = qwen2_vl_patch_grid(config, size)
        return t * h * w // int(config.vision_config.spatial_merge_size) ** 2
    raise ValueError(f"unsupported model_type {config.model_type!r}")


def example_inputs(
    preset_or_config: str | PretrainedConfig,
    text_tokens: int = 16,
    image_size: ImageSize | None = None,
    batch_size: int = 1,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Random but well-formed model inputs: one image per sample, placed after the first text token.

    Args:
        preset_or_config: a preset name or a LLaVA / LLaVA-NeXT / Qwen2-VL config.
        text_tokens: number of text tokens around the image placeholder(s) (>= 1).
        image_size: ``(height, width)`` of the (virtual) image; decides the LLaVA-NeXT crop grid and the
            Qwen2-VL patch grid. Default :func:`default_image_size`.
        batch_size: ``B``.
        seed: seed of the random pixels and token ids.
        dtype: dtype of ``pixel_values``.

    Returns:
        ``input_ids`` / ``attention_mask`` ``(B, S)`` with ``S = text_tokens + num_image_tokens`` (+2
        vision start/end tokens for Qwen2-VL), and ``pixel_values`` of the family's layout: LLaVA
        ``(B, 3, H, W)``; LLaVA-NeXT ``(B, crops, 3, H, W)`` with ``image_sizes (B, 2)``; Qwen2-VL
        ``(B * t*h*w, 3 * 2 * 14 * 14)`` with ``image_grid_thw (B, 3)`` and ``mm_token_type_ids (B, S)``.
    """
    config = resolve_config(preset_or_config)
    if text_tokens < 1:
        raise ValueError(f"text_tokens must be >= 1, got {text_tokens}")
    size = default_image_size(config) if image_size is None else tuple(image_size)
    gen = torch.Generator().manual_seed(seed)
    vocab = int(config.text_config.vocab_size)
    n_img = num_image_tokens(config, size)
    out: dict[str, torch.Tensor] = {}
    if config.model_type == "qwen2_vl":
        image_id = int(config.image_token_id)
        special = [
            image_id,
            int(config.video_token_id),
            int(config.vision_start_token_id),
            int(config.vision_end_token_id),
        ]
        image_block = (
            [int(config.vision_start_token_id)] + [image_id] * n_img + [int(config.vision_end_token_id)]
        )
        block_types = [0] + [1] * n_img + [0]
    else:
        image_id = int(config.image_token_index)
        special = [image_id]
        image_block = [image_id] * n_img
        block_types = [1] * n_img
    low = 3  # skip pad / bos / eos
    text = torch.randint(low, vocab, (batch_size, text_tokens), generator=gen)
    for tok in special:  # no accidental placeholders in the text
        text[text == tok] = low
    block = torch.tensor(image_block).expand(batch_size, -1)
    input_ids = torch.cat([text[:, :1], block, text[:, 1:]], dim=1)
    out["input_ids"] = input_ids
    out["attention_mask"] = torch.ones_like(input_ids)
    vision = config.vision_config
    if config.model_type == "llava":
        side = int(vision.image_size)
        out["pixel_values"] = torch.randn(batch_size, 3, side, side, generator=gen).to(dtype)
    elif config.model_type == "llava_next":
        side = int(vision.image_size)
        crops = llava_next_num_crops(config, size)
        out["pixel_values"] = torch.randn(batch_size, crops, 3, side, side, generator=gen).to(dtype)
        out["image_sizes"] = torch.tensor([list(size)] * batch_size)
    else:
        t, h, w = qwen2_vl_patch_grid(config, size)
        patch_dim = int(vision.in_channels) * int(vision.temporal_patch_size) * int(vision.patch_size) ** 2
        out["pixel_values"] = torch.randn(batch_size * t * h * w, patch_dim, generator=gen).to(dtype)
        out["image_grid_thw"] = torch.tensor([[t, h, w]] * batch_size)
        types = torch.tensor([0] + block_types + [0] * (text_tokens - 1))
        out["mm_token_type_ids"] = types.expand(batch_size, -1).clone()
    return out


__all__ = [
    "PRESETS",
    "ImageSize",
    "default_image_size",
    "example_inputs",
    "llava_next_crop_grid",
    "llava_next_num_crops",
    "llava_next_num_image_tokens",
    "num_image_tokens",
    "qwen2_vl_patch_grid",
    "resolve_config",
    "Preset",
    "build_preset_model",
    "get_preset",
    "list_presets",
    "model_class_for",
    "preset_config",
]
