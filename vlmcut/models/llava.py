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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..methods.base import LLMSelector, MethodSpec, VisionSelector
from .base import VLMAttachment
from .instance import replace_method
from .prompt import (
    check_feature_options,
    compact_prompt,
    last_prompt_index,
    placeholder_drop_mask,
    unchanged_hint,
)
from .registry import UNBOUNDED_KEEP, ModelAdapter, ModelParts, register_adapter, tower_parts
from .vit import EncoderPassRecord, EncoderPruner, consumed_layer, tower_spec


def llava_parts(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """``(outer, inner)`` for a LLaVA model: the module whose ``forward`` takes the prompt, and the
    ``LlavaModel`` holding ``vision_tower``; ``None`` if ``model`` is not a LLaVA."""
    from transformers import LlavaForConditionalGeneration, LlavaModel

    if isinstance(model, LlavaForConditionalGeneration):
        return model, model.model
    if isinstance(model, LlavaModel):
        return model, model
    return None


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
    query_index = last_prompt_index(valid, prompt_len)
    return {"visual": visual, "valid": valid, "image_index": image_index, "query_index": query_index}


class LlavaAttachment(VLMAttachment):
    """Pruning on a LLaVA instance: an :class:`EncoderPruner` on its tower plus prompt surgery (vision stage)
    and/or a :class:`DecoderPruner` on its language model (LLM stage)."""

    title = "LLaVA"

    def __init__(
        self,
        model: nn.Module,
        make_selector: Callable[[int], VisionSelector | None],
        keep: int,
        make_llm_selector: Callable[[int], LLMSelector | None] | None = None,
        auto: bool = False,
    ) -> None:
        super().__init__(model, llava_parts(model))
        cfg = self.config
        spec = tower_spec(self.inner.vision_tower)
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
        self.keep_patches: int | None = keep_patches
        self.image_token_id = int(cfg.image_token_id)
        self.feature_layer = cfg.vision_feature_layer
        self.strategy = strategy
        self._gen_kept: int | None = None  # kept placeholders per image, while generate() runs
        self._last_layout: tuple[dict[str, torch.Tensor], int] | None = None
        # keep="auto": every image keeps its own count (``keep`` is then the upper bound); the images are
        # encoded before the prompt is cut, and that encoding is handed to the model's own call.
        self.auto = auto
        self.image_counts: list[int] = []  # auto: visual tokens each image kept, in order
        self._encoded: tuple[tuple, Any] | None = None  # (pixel key, image features) awaiting the model
        try:
            consume = consumed_layer(cfg.vision_feature_layer, spec.num_layers)
            selector = make_selector(keep_patches)
            self.encoder = self.own(EncoderPruner(spec, selector, consume)) if selector is not None else None
            if self.encoder is None:
                self.keep_patches = None  # the prompt keeps every placeholder; the LLM stage prunes
            self.own_decoder(make_llm_selector(keep) if make_llm_selector is not None else None)
            if auto:
                if self.encoder is None or self.decoder is not None:
                    raise ValueError(
                        "keep='auto' needs a method that prunes in the vision tower only (flowcut)"
                    )
                self.own(_Restore(replace_method(self.inner, "get_image_features", self._image_features())))
        except BaseException:
            self.remove()
            raise
        self.install()

    # -- keep="auto" ------------------------------------------------------------------------------------
    def _image_features(self) -> Callable[..., Any]:
        """``get_image_features`` for this instance under ``keep="auto"``: the tower pads its per-image
        outputs to the longest, so every image's features are cut to the count it kept; the call the
        prompt surgery made is reused by the model's own call on the same pixels."""
        original = self.inner.get_image_features

        def get_image_features(*args: Any, **kwargs: Any) -> Any:
            pixels = args[0] if args else kwargs.get("pixel_values")
            key = _tensor_key(pixels)
            if self._encoded is not None and self._encoded[0] == key:
                out, self._encoded = self._encoded[1], None
                return out
            out = original(*args, **kwargs)
            kept = self.encoder.record.kept_indices if self.encoder is not None else None
            feats = out.pooler_output if hasattr(out, "pooler_output") else None
            if kept is None or feats is None:
                return out
            extra = self.layout.has_cls - self.layout.has_cls_dropped
            counts = ((kept >= 0).sum(dim=1) + extra).tolist()
            out.pooler_output = [f[:c] for f, c in zip(feats, counts, strict=True)]
            return out

        # generate() picks the arguments it encodes images with from this signature
        get_image_features.__signature__ = inspect.signature(original)  # type: ignore[attr-defined]
        return get_image_features

    def _auto_counts(self, pixel_values: torch.Tensor) -> list[int]:
        """Encode the images now (the count of each is known only after its tower pass); the features wait
        for the model's own ``get_image_features`` call on the same pixels."""
        out = self.inner.get_image_features(
            pixel_values=pixel_values,
            vision_feature_layer=self.feature_layer,
            vision_feature_select_strategy=self.strategy,
        )
        self._encoded = (_tensor_key(pixel_values), out)
        counts = [int(f.shape[0]) for f in out.pooler_output]
        self.image_counts += counts
        return counts

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
        ids = self.prompt_ids(inputs)
        check_feature_options(inputs, self.feature_layer, self.strategy)
        per_image, kept = self.placeholders(pixel_values)
        n_images = pixel_values.shape[0]
        total = int((ids == self.image_token_id).sum())
        if not self.auto and kept >= per_image:
            return None
        # already compact: a forward of our own generate (its prompt was cut once)
        cut_once = total < n_images * per_image if self.auto else total == n_images * kept
        if cut_once and self.generating:
            return None
        if total != n_images * per_image:
            raise ValueError(
                f"input_ids hold {total} image placeholders for {n_images} image(s); expected "
                f"{per_image} per image. {unchanged_hint()}"
            )
        keep: int | torch.Tensor = kept
        if self.auto:  # every image's own count, known once its tower pass has run
            keep = torch.tensor(self._auto_counts(pixel_values), device=ids.device)
            if bool((keep >= per_image).all()):
                return None
        drop = placeholder_drop_mask(ids, self.image_token_id, per_image, keep)
        return compact_prompt(inputs, drop, self.pad_token_id)

    # -- the language-model stage ---------------------------------------------------------------------------
    def announce(self, final: dict[str, Any], result: tuple | None, inputs: dict[str, Any]) -> None:
        # A forward that inserts images (a prefill) carries pixel_values, or, inside generate(), the images
        # encoded beforehand (`mm_encoder_outputs`); the per-image placeholder count then comes from the
        # wrapped generate call. Decode steps carry neither, even if a generated token is the image token.
        pixel_values = inputs.get("pixel_values")
        encoded = inputs.get("mm_encoder_outputs") is not None and self._gen_kept is not None
        if self.decoder is None or (pixel_values is None and not encoded):
            return
        ids = final["input_ids"]
        kept = self.placeholders(pixel_values)[1] if pixel_values is not None else self._gen_kept
        prompt_len = ids.shape[1] if self.prompt_len is None else self.prompt_len
        layout = visual_layout(ids, self.image_token_id, kept, final.get("attention_mask"), prompt_len)
        self._last_layout = (layout, kept)
        self.decoder.begin(**layout)

    def begin_session(self, kwargs: dict[str, Any], result: tuple | None) -> None:
        """generate's forwards carry encoded images, not pixel_values: remember the kept count per image."""
        pixel_values = kwargs.get("pixel_values")
        self._gen_kept = self.placeholders(pixel_values)[1] if pixel_values is not None else None

    def end_session(self) -> None:
        self._gen_kept = None

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


class _Restore:
    """Something :meth:`VLMAttachment.own` can ``remove()``: runs an undo function once."""

    def __init__(self, undo: Callable[[], None]) -> None:
        self._undo: Callable[[], None] | None = undo

    def remove(self) -> None:
        if self._undo is not None:
            self._undo, undo = None, self._undo
            undo()


def _tensor_key(x: Any) -> tuple:
    """Identifies one pixel tensor, unchanged (same storage, same in-place version)."""
    if not isinstance(x, torch.Tensor):
        return (id(x),)
    return (id(x), x.data_ptr(), x._version, tuple(x.shape), x.dtype, x.device)


class LlavaAdapter(ModelAdapter):
    """LLaVA-1.5 and every ``LlavaForConditionalGeneration`` (CLIP or SigLIP tower): all methods."""

    name = "llava"
    title = "LLaVA-1.5"
    classes = ("LlavaForConditionalGeneration", "LlavaModel")
    auto_keep = True

    def attach(
        self, model: nn.Module, spec: MethodSpec, config: Any, options: dict[str, Any]
    ) -> LlavaAttachment:
        make_encoder = (
            (lambda k: spec.make_selector(config, k)) if spec.make_selector is not None else (lambda k: None)
        )
        make_llm = (
            (lambda k: spec.make_llm_selector(config, k)) if spec.make_llm_selector is not None else None
        )
        if config.keep == "auto":  # the bound: max_keep, or every patch (the selector caps it per image)
            bound = UNBOUNDED_KEEP if config.max_keep is None else config.max_keep
            return LlavaAttachment(model, make_encoder, bound, None, auto=True)
        return LlavaAttachment(model, make_encoder, config.keep, make_llm)

    def parts(self, model: nn.Module) -> ModelParts | None:
        from transformers import LlavaForConditionalGeneration

        if not isinstance(model, LlavaForConditionalGeneration):
            return None
        return tower_parts(model.model, model.model.vision_tower)


register_adapter(LlavaAdapter())
