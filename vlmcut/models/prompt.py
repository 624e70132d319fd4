"""Prompt surgery every VLM family shares: pure functions on the processor's tensors.

When the vision stage keeps fewer tokens than the processor wrote placeholders for, the prompt must lose
the placeholders of the dropped tokens: the language model then sees exactly the sequence an unpruned
model fed only the kept tokens would see. These functions find which columns to drop, move the kept ones
together (re-padding rows on the side the caller padded) and renumber positions; the family attachments
(:mod:`vlmcut.models.base`) call them from their forward pre-hook and their wrapped ``generate``.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

IGNORE_INDEX = -100  # transformers' loss ignore index


def call_inputs(signature: inspect.Signature, args: tuple, kwargs: dict) -> dict[str, Any]:
    """A forward call's arguments by name (``**kwargs`` flattened in), as a forward pre-hook sees them."""
    inputs = dict(signature.bind_partial(*args, **kwargs).arguments)
    inputs.update(inputs.pop("kwargs", {}))
    return inputs


def check_feature_options(inputs: dict[str, Any], feature_layer: Any, strategy: str) -> None:
    """Refuse per-call ``vision_feature_layer`` / ``vision_feature_select_strategy`` that differ from the
    config values the pruning was set up for."""
    for name, value in (
        ("vision_feature_layer", feature_layer),
        ("vision_feature_select_strategy", strategy),
    ):
        given = inputs.get(name)
        if given is not None and given != value:
            raise ValueError(
                f"{name}={given!r} differs from the model config ({value!r}) that the pruning was set up "
                f"for; change model.config and prune again"
            )


def placeholder_drop_mask(
    input_ids: torch.Tensor, image_token_id: int, per_image: int, keep: int | torch.Tensor
) -> torch.Tensor:
    """Which placeholder columns to drop: all but the first ``keep`` of every image's block of ``per_image``.

    input_ids: ``(B, L)`` -> bool ``(B, L)``. Blocks may touch (``<image><image>``); they are told apart
    by counting, so every row must hold a whole number of blocks. ``keep`` is one count for every image,
    or a ``(num_images,)`` tensor of counts in reading order (row by row), when images keep their own.
    """
    is_img = input_ids == image_token_id
    counts = is_img.sum(dim=1)
    if bool((counts % per_image).any()):
        raise ValueError(
            f"each image must have exactly {per_image} placeholder tokens in input_ids (as the processor "
            f"expands them); found {counts.tolist()} per row. Pass the processor's output unchanged."
        )
    ordinal = is_img.long().cumsum(dim=1) - 1
    if isinstance(keep, int):
        return is_img & (ordinal % per_image >= keep)
    images = counts // per_image
    if int(images.sum()) != keep.numel():
        raise ValueError(
            f"{keep.numel()} per-image counts for {int(images.sum())} images in input_ids; give one per image"
        )
    first = images.cumsum(0) - images  # the index of every row's first image
    image = first.unsqueeze(1) + ordinal.clamp(min=0) // per_image
    limit = keep.to(input_ids.device)[image.clamp(max=max(keep.numel() - 1, 0))]
    return is_img & (ordinal % per_image >= limit)


def padding_side(attention_mask: torch.Tensor | None) -> str:
    """``"left"`` unless the caller's mask shows right padding (generation needs left padding)."""
    if attention_mask is None:
        return "left"
    if bool((attention_mask[:, -1] == 0).any()) and not bool((attention_mask[:, 0] == 0).any()):
        return "right"
    return "left"


def compact(
    x: torch.Tensor, keep: torch.Tensor, length: int, side: str, pad_value: int | float
) -> torch.Tensor:
    """Move the kept columns of ``x`` (B, L, ...) together into ``(B, length, ...)``, padding each row."""
    b = x.shape[0]
    n_keep = keep.sum(dim=1, keepdim=True)  # (B, 1)
    dest = keep.long().cumsum(dim=1) - 1
    if side == "left":
        dest = dest + (length - n_keep)
    out = x.new_full((b, length, *x.shape[2:]), pad_value)
    rows = torch.arange(b, device=x.device).unsqueeze(1).expand_as(keep)
    out[rows[keep], dest[keep]] = x[keep]
    return out


def compact_prompt(
    inputs: dict[str, Any], drop: torch.Tensor, pad_token_id: int
) -> tuple[dict[str, Any], int]:
    """Drop the ``drop`` columns from the prompt tensors in ``inputs``; return the new inputs and length.

    Handles ``input_ids``, ``attention_mask``, ``labels``, ``position_ids`` (renumbered so positions stay
    contiguous, as for a prompt that only ever had the kept placeholders) and ``cache_position``. Padding
    columns of the caller (``attention_mask == 0``) are dropped as well and rows are padded again to the
    longest row, so the result is what the processor would have produced for the compact prompt.
    """
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    side = padding_side(mask)
    # The caller's padding goes too: rows are packed tightly and padded again on the same side.
    keep = ~drop if mask is None else ~drop & mask.bool()
    lengths = keep.sum(dim=1)
    new_len = int(lengths.max())
    out = dict(inputs)
    out["input_ids"] = compact(ids, keep, new_len, side, pad_token_id)
    if mask is None and bool((lengths != new_len).any()):
        mask = torch.ones_like(ids)  # rows now differ in length: padding must be masked
    if mask is not None:
        out["attention_mask"] = compact(mask, keep, new_len, side, 0)
    if inputs.get("labels") is not None:
        out["labels"] = compact(inputs["labels"], keep, new_len, side, IGNORE_INDEX)
    pos = inputs.get("position_ids")
    if pos is not None:
        if pos.dim() != 2:
            raise ValueError(f"position_ids of shape {tuple(pos.shape)} are not supported; expected (B, L)")
        shifted = pos - drop.long().cumsum(dim=1)
        out["position_ids"] = compact(shifted.expand_as(ids), keep, new_len, side, 1)
    if inputs.get("cache_position") is not None:
        out["cache_position"] = torch.arange(new_len, device=ids.device)
    return out, new_len


def unchanged_hint(kind: str = "image") -> str:
    """The end of every placeholder-count error: what the caller should pass instead."""
    return f"Pass the processor's output unchanged: one <{kind}> per {kind} in the text, and the processor expands each."


def pad_token_id(config: Any) -> int:
    """The id that pads a compacted prompt: the model config's ``pad_token_id``, else its text config's, else 0
    (padding columns are masked, so any valid id gives the same result)."""
    pad = getattr(config, "pad_token_id", None)
    if pad is None:
        pad = getattr(getattr(config, "text_config", None), "pad_token_id", None)
    return 0 if pad is None else int(pad)


def last_prompt_index(valid: torch.Tensor, prompt_len: int | None = None) -> torch.Tensor:
    """``(B,)``: the column of every row's last real prompt token, the query of the language-model stage.

    valid: ``(B, L)`` bool, the real tokens. ``prompt_len``: the columns that belong to the prompt
    (generation without a cache re-feeds prompt + new tokens; the query is still the prompt's last token);
    ``None``: all of them.
    """
    cols = torch.arange(valid.shape[1], device=valid.device).expand_as(valid)
    in_prompt = valid if prompt_len is None else valid & (cols < prompt_len)
    return torch.where(in_prompt, cols, torch.full_like(cols, -1)).max(dim=1).values
