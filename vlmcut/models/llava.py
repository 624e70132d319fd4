"""LLaVA (``LlavaForConditionalGeneration`` / ``LlavaModel``): vision-stage pruning, wired on one instance.

The processor expands every ``<image>`` into one placeholder per visual feature (576 for LLaVA-1.5). When
the tower keeps only ``K`` patches, the prompt must carry ``K`` placeholders per image, so:

* a forward pre-hook on the model rewrites the call's ``input_ids`` (and ``attention_mask``, ``labels``,
  ``position_ids``): per image it keeps the first ``K`` placeholders of its block and drops the rest.
  Rows whose length now differs (different image counts) are re-padded on the side the caller padded.
  The language model thus sees exactly the sequence an unpruned model fed only the kept tokens would see.
* ``generate`` is wrapped on the instance: the prompt is compacted once before generation and the
  returned sequences get the caller's own ``input_ids`` back in front, so
  ``out[:, inputs["input_ids"].shape[1]:]`` is still the answer.

Placeholders are all the same token, so which ones are dropped does not matter; the kept visual
features go into them in order (``masked_scatter``), exactly as upstream.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..methods.llm_base import LLMSelector
from .instance import replace_method
from .llm import DecoderPruner
from .vit import EncoderPassRecord, EncoderPruner, EncoderSelector, consumed_layer, tower_spec

IGNORE_INDEX = -100  # transformers' loss ignore index


def llava_parts(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """``(outer, inner)`` for a LLaVA model: the module whose ``forward`` takes the prompt, and the
    ``LlavaModel`` holding ``vision_tower``; ``None`` if ``model`` is not a LLaVA."""
    from transformers import LlavaForConditionalGeneration, LlavaModel

    if isinstance(model, LlavaForConditionalGeneration):
        return model, model.model
    if isinstance(model, LlavaModel):
        return model, model
    return None


# ------------------------------------------------------------------------------------------------------
# Pure sequence surgery
# ------------------------------------------------------------------------------------------------------


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
    input_ids: torch.Tensor, image_token_id: int, per_image: int, keep: int
) -> torch.Tensor:
    """Which placeholder columns to drop: all but the first ``keep`` of every image's block of ``per_image``.

    input_ids: ``(B, L)`` -> bool ``(B, L)``. Blocks may touch (``<image><image>``); they are told apart
    by counting, so every row must hold a whole number of blocks.
    """
    is_img = input_ids == image_token_id
    counts = is_img.sum(dim=1)
    if bool((counts % per_image).any()):
        raise ValueError(
            f"each image must have exactly {per_image} placeholder tokens in input_ids (as the processor "
            f"expands them); found {counts.tolist()} per row. Pass the processor's output unchanged."
        )
    ordinal = is_img.long().cumsum(dim=1) - 1
    return is_img & (ordinal % per_image >= keep)


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


def _shorten_lengths(kwargs: dict[str, Any], default_config: Any, removed: int) -> None:
    """``max_length`` / ``min_length`` count the prompt: shorten them by the ``removed`` placeholders, whether
    they come as keywords, in a ``generation_config`` argument or in the model's own generation config, so
    that the same number of new tokens is generated as without pruning (``max_new_tokens`` needs nothing)."""
    config = kwargs.get("generation_config") or default_config
    for name, new_tokens in (("max_length", "max_new_tokens"), ("min_length", "min_new_tokens")):
        if kwargs.get(name) is not None:
            kwargs[name] = kwargs[name] - removed
            continue
        if kwargs.get(new_tokens) is not None or getattr(config, new_tokens, None) is not None:
            continue
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            kwargs[name] = max(0, value - removed)


def wrap_generate(
    outer: nn.Module,
    compact: Callable[[dict[str, Any]], tuple | None],
    session: Callable[[dict[str, Any], tuple | None], AbstractContextManager],
) -> Callable[[], None]:
    """Wrap ``outer.generate`` on this instance; returns the function that puts the original back.

    ``compact(kwargs)`` returns ``(new_kwargs, new_len, ...)`` for a prompt it shortened, or ``None``. The
    prompt is compacted once; ``max_length`` / ``min_length`` (which count the prompt) are shortened by the
    same amount so the same number of new tokens is generated; ``session(kwargs, result)`` is entered around
    the original call (the attachment's per-generate state); the returned sequences get the caller's own
    ``input_ids`` back in front (each row repeated ``num_return_sequences`` times, as generate repeats it), so
    ``out[:, inputs["input_ids"].shape[1]:]`` is still the answer. A second concurrent call (another thread)
    on the same model is refused with a ``RuntimeError``: the attachment holds per-generate state.
    """
    if not hasattr(outer, "generate"):
        return lambda: None
    original = outer.generate
    # The attachment keeps per-generate state (prompt length, counts): one generate at a time per model.
    busy = threading.Lock()

    def generate(*args: Any, **kwargs: Any) -> Any:
        if not busy.acquire(blocking=False):
            raise RuntimeError(
                "this pruned model is already running generate() (in another thread, or from a callback of "
                "that call); a pruned model keeps per-call state, so generate with one model per thread or "
                "wait for the first call to return"
            )
        try:
            return _generate(*args, **kwargs)
        finally:
            busy.release()

    def _generate(*args: Any, **kwargs: Any) -> Any:
        if args and isinstance(args[0], torch.Tensor) and "input_ids" not in kwargs:
            kwargs["input_ids"], args = args[0], args[1:]
        elif isinstance(kwargs.get("inputs"), torch.Tensor) and "input_ids" not in kwargs:
            kwargs["input_ids"] = kwargs.pop("inputs")
        result = compact(kwargs)
        if result is None:
            with session(kwargs, None):
                return original(*args, **kwargs)
        new_kwargs, new_len = result[0], result[1]
        caller_ids = kwargs["input_ids"]
        _shorten_lengths(new_kwargs, getattr(outer, "generation_config", None), caller_ids.shape[1] - new_len)
        with session(kwargs, result):
            out = original(*args, **new_kwargs)
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        # num_return_sequences / beams: generate repeats each prompt row in place (repeat_interleave)
        rows = caller_ids.repeat_interleave(sequences.shape[0] // caller_ids.shape[0], dim=0)
        full = torch.cat([rows, sequences[:, new_len:]], dim=1)
        if isinstance(out, torch.Tensor):
            return full
        out.sequences = full
        return out

    return replace_method(outer, "generate", generate)


# ------------------------------------------------------------------------------------------------------
# Attachment
# ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Layout:
    has_cls_dropped: int  # 1 if the "default" strategy drops the first token of the tower output
    has_cls: int
    patch_size: int


def visual_layout(
    input_ids: torch.Tensor,
    image_token_id: int,
    per_image: int,
    attention_mask: torch.Tensor | None,
    prompt_len: int,
) -> dict[str, torch.Tensor]:
    """What the language-model stage needs about a prompt: visual/valid masks (B, T), the image each visual
    token belongs to (B, T; -1 elsewhere) and the index of the last prompt token of every row (B,).

    ``prompt_len``: columns that belong to the prompt (generation without a cache re-feeds the prompt plus
    the new tokens; the query is still the prompt's last token).
    """
    visual = input_ids == image_token_id
    valid = torch.ones_like(visual) if attention_mask is None else attention_mask.bool()
    ordinal = visual.long().cumsum(dim=1) - 1
    image_index = torch.where(visual, ordinal // per_image, torch.full_like(ordinal, -1))
    cols = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(visual)
    in_prompt = valid & (cols < prompt_len)
    query_index = torch.where(in_prompt, cols, torch.full_like(cols, -1)).max(dim=1).values
    return {"visual": visual, "valid": valid, "image_index": image_index, "query_index": query_index}


class LlavaAttachment:
    """Pruning on a LLaVA instance: an :class:`EncoderPruner` on its tower plus prompt surgery (vision stage)
    and/or a :class:`DecoderPruner` on its language model (LLM stage)."""

    def __init__(
        self,
        model: nn.Module,
        make_selector: Callable[[int], EncoderSelector | None],
        keep: int,
        make_llm_selector: Callable[[int], LLMSelector | None] | None = None,
    ) -> None:
        parts = llava_parts(model)
        if parts is None:
            raise TypeError(f"{type(model).__name__} is not a LLaVA model")
        self.outer, inner = parts
        cfg = inner.config
        self.config = cfg
        tower = inner.vision_tower
        spec = tower_spec(tower)
        strategy = cfg.vision_feature_select_strategy
        if strategy not in ("default", "full"):
            raise ValueError(
                f"vision_feature_select_strategy={strategy!r} is not supported ('default' or 'full')"
            )
        self.layout = _Layout(
            has_cls_dropped=int(strategy == "default"),
            has_cls=int(spec.has_cls),
            patch_size=int(cfg.vision_config.patch_size),
        )
        self.keep = keep
        # Patches to keep so that the language model receives exactly `keep` features per image.
        keep_patches = keep - self.layout.has_cls + self.layout.has_cls_dropped
        if keep_patches < 1:
            raise ValueError(
                f"keep={keep} leaves no patch token: with vision_feature_select_strategy={strategy!r} one of "
                f"the features is the CLS token, so keep must be >= 2"
            )
        self.keep_patches = keep_patches
        self.image_token_id = int(cfg.image_token_id)
        text_cfg = cfg.text_config
        pad = getattr(cfg, "pad_token_id", None)
        pad = getattr(text_cfg, "pad_token_id", None) if pad is None else pad
        self.pad_token_id = 0 if pad is None else int(pad)
        self.feature_layer = cfg.vision_feature_layer
        self.strategy = strategy

        consume = consumed_layer(cfg.vision_feature_layer, spec.num_layers)
        selector = make_selector(keep_patches)
        self.encoder = EncoderPruner(spec, selector, consume) if selector is not None else None
        if self.encoder is None:
            self.keep_patches = None  # the prompt keeps every placeholder; the LLM stage prunes
        llm_selector = make_llm_selector(keep) if make_llm_selector is not None else None
        self.decoder = DecoderPruner(inner.language_model, llm_selector) if llm_selector is not None else None
        self._prompt_len: int | None = None
        self._gen_kept: int | None = None  # kept placeholders per image, while generate() runs
        self._generating = False  # inside our generate(): its forwards see the prompt already cut
        self._last_layout: tuple[dict[str, torch.Tensor], int] | None = None
        self._signature = inspect.signature(self.outer.forward)
        self._handles: list[RemovableHandle] = [
            self.outer.register_forward_pre_hook(self._pre_forward, with_kwargs=True)
        ]
        self._restore_generate = wrap_generate(self.outer, self.compact_inputs, self._generate_session)

    # -- layout ---------------------------------------------------------------------------------------
    def placeholders(self, pixel_values: torch.Tensor) -> tuple[int, int]:
        """``(per_image, kept_per_image)`` placeholder counts for images of this size."""
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4:
            raise ValueError(
                "pixel_values must be a (num_images, C, H, W) tensor as the LLaVA processor makes it"
            )
        lay = self.layout
        height, width = pixel_values.shape[-2:]
        if height % lay.patch_size or width % lay.patch_size:
            raise ValueError(
                f"pixel_values are {height}x{width} pixels, not a multiple of the vision tower's patch size "
                f"{lay.patch_size}; prepare images with the model's processor"
            )
        n_patches = (height // lay.patch_size) * (width // lay.patch_size)
        per_image = n_patches + lay.has_cls - lay.has_cls_dropped
        if self.keep_patches is None:
            return per_image, per_image
        kept = min(self.keep_patches, n_patches) + lay.has_cls - lay.has_cls_dropped
        return per_image, kept

    def compact_inputs(self, inputs: dict[str, Any]) -> tuple[dict[str, Any], int] | None:
        """The prompt with ``kept_per_image`` placeholders per image, or ``None`` when nothing changes."""
        pixel_values = inputs.get("pixel_values")
        if pixel_values is None:
            return None
        ids = inputs.get("input_ids")
        if ids is None:
            raise ValueError(
                "pruned LLaVA needs input_ids with the image placeholders (inputs_embeds with pixel_values is "
                "not supported); pass the processor's output"
            )
        check_feature_options(inputs, self.feature_layer, self.strategy)
        per_image, kept = self.placeholders(pixel_values)
        if kept >= per_image:
            return None
        n_images = pixel_values.shape[0]
        total = int((ids == self.image_token_id).sum())
        if total == n_images * kept and self._generating:
            return None  # already compact: a forward of our own generate (its prompt was cut once)
        if total != n_images * per_image:
            raise ValueError(
                f"input_ids hold {total} image placeholders for {n_images} image(s); expected "
                f"{per_image} per image. {unchanged_hint()}"
            )
        drop = placeholder_drop_mask(ids, self.image_token_id, per_image, kept)
        return compact_prompt(inputs, drop, self.pad_token_id)

    # -- hooks ----------------------------------------------------------------------------------------
    def _pre_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        inputs = call_inputs(self._signature, args, kwargs)
        result = self.compact_inputs(inputs)
        # A forward that inserts images (a prefill) carries pixel_values, or, inside generate(), the images
        # encoded beforehand (`mm_encoder_outputs`); the per-image placeholder count then comes from the
        # wrapped generate call. Decode steps carry neither, even if a generated token is the image token.
        pixel_values = inputs.get("pixel_values")
        encoded = inputs.get("mm_encoder_outputs") is not None and self._gen_kept is not None
        if self.decoder is not None and (pixel_values is not None or encoded):
            final = result[0] if result is not None else inputs
            ids = final["input_ids"]
            kept = self.placeholders(pixel_values)[1] if pixel_values is not None else self._gen_kept
            prompt_len = ids.shape[1] if self._prompt_len is None else self._prompt_len
            layout = visual_layout(ids, self.image_token_id, kept, final.get("attention_mask"), prompt_len)
            self._last_layout = (layout, kept)
            self.decoder.begin(**layout)
        if result is None:
            return None
        return (), result[0]

    @contextmanager
    def _generate_session(self, kwargs: dict[str, Any], result: tuple | None) -> Iterator[None]:
        """While generate runs: the prompt length (the LLM stage's query is its last token) and the kept
        placeholders per image (generate's forwards carry encoded images, not pixel_values)."""
        pixel_values = kwargs.get("pixel_values")
        self._gen_kept = self.placeholders(pixel_values)[1] if pixel_values is not None else None
        if result is not None:
            self._prompt_len = result[1]
        else:
            ids = kwargs.get("input_ids")
            self._prompt_len = ids.shape[1] if isinstance(ids, torch.Tensor) else None
        self._generating = True
        try:
            yield
        finally:
            self._prompt_len = None
            self._gen_kept = None
            self._generating = False

    # -- handle interface -------------------------------------------------------------------------------
    @property
    def record(self) -> EncoderPassRecord:
        """The vision stage's record; for LLM-only methods, the visual tokens that survived the last stage
        (their index among the image's placeholders) in the same form."""
        if self.encoder is not None:
            return self.encoder.record
        return self._llm_record()

    def _llm_record(self) -> EncoderPassRecord:
        if self._last_layout is None or self.decoder is None:
            return EncoderPassRecord()
        layout, per_image = self._last_layout
        kept_cols = self.decoder.record.kept_positions
        visual = layout["visual"]
        rows = []
        for r in range(visual.shape[0]):
            cols = kept_cols[-1][r] if kept_cols else torch.arange(visual.shape[1], device=visual.device)
            cols = cols[cols >= 0]
            cols = cols[visual[r, cols]]
            ordinal = visual[r].long().cumsum(0)[cols] - 1
            for img in ordinal.div(per_image, rounding_mode="floor").unique(sorted=True):
                rows.append(ordinal[ordinal // per_image == img] % per_image)
        if not rows or len({len(x) for x in rows}) != 1:
            return EncoderPassRecord(num_patches=per_image)
        return EncoderPassRecord(kept_indices=torch.stack(rows), num_patches=per_image)

    @property
    def llm_record(self):  # noqa: ANN201 - LLMPassRecord | None
        return self.decoder.record if self.decoder is not None else None

    def remove(self) -> None:
        if self.encoder is not None:
            self.encoder.remove()
        if self.decoder is not None:
            self.decoder.remove()
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._restore_generate()
        self._restore_generate = lambda: None
