"""Video-LLaVA (``VideoLlavaForConditionalGeneration`` / ``VideoLlavaModel``): images and videos, wired on one
instance.

Video-LLaVA has two CLIP towers of the same shape: ``image_tower`` for images and ``video_tower`` for the frames
of a video (``pixel_values_videos``: ``(num_videos, frames, C, H, W)``, 8 frames in the released model). An
image becomes ``N`` features exactly as in LLaVA-1.5 (``vision_feature_select_strategy`` decides whether the
CLS token is one of them). A video becomes, per frame, the CLS token **and** the ``N`` patch tokens (upstream
ignores the strategy for videos: ``video_seq_length = 8 x 257``), all behind ``<video>`` placeholders.

Counting: for videos ``keep`` counts **patch tokens per video**, the paper's unit (Table 4: "2048 video tokens,
we retain 256" = 8 frames x 256 patches). Every frame's CLS token always reaches the language model on top
(it is the frame's global token, not a patch; like LLaVA-NeXT's newlines, it is never prunable). For images
``keep`` counts features per image, exactly as :mod:`vlmcut.models.llava`.

Video budgets (``vlmcut.prune(model, method, keep=K, video_budget=...)``):

* ``"per_frame"`` (default for vision-stage methods): every frame keeps ``keep // frames`` patches in the
  video tower (the paper: 256 of 2048 = 32 per frame). ``keep`` must be a multiple of the frame count
  (checked per forward, the frame count comes with the input) unless it keeps every patch anyway.
* ``"shared"``: the frames share the budget. The video tower keeps ``min(N, max(1, 2 * keep // frames))``
  patches per frame, then the method's language-model stage (FlowCut: :class:`FlowCutLLMSelector` at the
  output of decoder layer 1, SPEC "Two-stage") keeps the best ``keep`` patch tokens of the whole video
  jointly, in their original order and at their original positions; frames end up with different counts.
  Needs a method with a language-model stage (``flowcut``) and a decoder of at least 3 layers.
* Methods that prune only inside the language model (``fastv``, ``pdrop``, ``sparsevlm``) always work as
  ``"shared"`` (the default for them): each video's patch tokens are one visual block of ``keep``, each image
  one block of ``keep``; ``"per_frame"`` is refused (one selector cannot give frames and images different
  budgets).

Images and videos may be mixed in a batch (also in one row). The vision stage shortens the prompt as in
LLaVA: every image / video block keeps its first placeholders (they are all the same token) and positions
stay contiguous, which is exactly the prompt an unpruned model fed only the kept tokens would get. The
language-model stage (:class:`~vlmcut.models.llm.DecoderPruner`) keeps original positions.

The per-frame video budget is set from ``pixel_values_videos`` on every ``forward`` / ``generate`` call; a
direct call of ``get_video_features`` uses the budget of the last call (before any: 8 frames).

Kept indices (``VideoLlavaAttachment.pass_record``, a :class:`VideoLlavaPassRecord`):

* ``image_kept``: ``(num_images, K)`` patch indices on the image's grid, ascending (as LLaVA);
* ``video_kept``: ``(num_videos, frames, W)`` patch indices on each frame's grid, ascending, padded with
  ``-1`` (``W = keep // frames`` for ``"per_frame"``: no padding; ``"shared"``: the most any frame kept);
  ``frame_counts`` ``(num_videos, frames)``: patches each frame kept.

``handle.kept_indices`` is the same as one matrix: the image rows, then one row per frame (video by video),
padded with ``-1`` to the widest row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from ..compat import VIDEO_LLAVA_IMAGES_KWARG
from ..methods.base import LLMSelector, MethodSpec, VisionSelector
from .base import VLMAttachment
from .prompt import (
    check_feature_options,
    compact_prompt,
    last_prompt_index,
    placeholder_drop_mask,
    unchanged_hint,
)
from .registry import VIDEO_BUDGET, VIDEO_BUDGETS, ModelAdapter, register_adapter
from .vit import EncoderPassRecord, EncoderPruner, consumed_layer, tower_spec

VideoBudget = Literal["per_frame", "shared"]
DEFAULT_FRAMES = 8  # Video-LLaVA samples 8 frames per video (paper Sec. 4, Table 4)


def video_llava_parts(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """``(outer, inner)``: the module whose ``forward`` takes the prompt and the ``VideoLlavaModel`` holding the
    towers; ``None`` if ``model`` is not a Video-LLaVA."""
    try:
        from transformers import VideoLlavaForConditionalGeneration, VideoLlavaModel
    except ImportError:  # a transformers without Video-LLaVA: nothing here can be one
        return None
    if isinstance(model, VideoLlavaForConditionalGeneration):
        return model, model.model
    if isinstance(model, VideoLlavaModel):
        return model, model
    return None


# ------------------------------------------------------------------------------------------------------
# Pure functions
# ------------------------------------------------------------------------------------------------------


def frame_budget(keep: int, frames: int, num_patches: int, video_budget: VideoBudget) -> int:
    """Patch tokens every frame keeps in the video tower (capped at ``num_patches``).

    ``"per_frame"``: ``keep // frames``; ``keep`` must be a multiple of ``frames`` unless it keeps every patch.
    ``"shared"``: ``max(1, 2 * keep // frames)`` (SPEC "Two-stage": twice the target in the encoder).
    """
    if video_budget == "shared":
        return min(num_patches, max(1, 2 * keep // frames))
    if keep >= frames * num_patches:
        return num_patches  # every patch of every frame: the identity
    if keep % frames:
        lower, upper = keep // frames * frames, (keep // frames + 1) * frames
        options = f"keep={lower} or keep={upper}" if lower else f"keep={upper}"
        raise ValueError(
            f"video_budget='per_frame' splits keep={keep} evenly over the {frames} frames of each video, but "
            f"{keep} is not a multiple of {frames}; pass {options}, or video_budget='shared' to share "
            f"{keep} patch tokens across the frames"
        )
    return keep // frames


def av_layout(
    input_ids: torch.Tensor,
    *,
    image_token_id: int,
    video_token_id: int,
    image_block: int,
    frame_block: int,
    frames: int,
    video_cls: int,
    images_prunable: bool,
    attention_mask: torch.Tensor | None,
    prompt_len: int,
) -> dict[str, torch.Tensor]:
    """Where the images' and videos' tokens are in a (compacted) prompt ``input_ids`` (B, L).

    ``image_block``: placeholders per image; ``frame_block``: per frame (``video_cls`` of them, 0 or 1, the
    frame's CLS token first, then its patches); a video is ``frames`` frame blocks. Returns (B, L) tensors:
    ``visual`` (the tokens the language-model stage may drop: every video patch token, and every image
    placeholder if ``images_prunable``), ``image_index`` (the block's number *within its row*, counting only
    blocks with prunable tokens; -1 elsewhere), ``valid``, ``query_index`` (B,) (the last prompt token; see
    :func:`vlmcut.models.llava.visual_layout`), and for the records ``image_id`` / ``image_slot`` (global
    image number, placeholder index in it) and ``video_id`` / ``frame`` / ``slot`` (global video number,
    frame, index in the frame block), -1 elsewhere.
    """
    is_img = input_ids == image_token_id
    is_vid = input_ids == video_token_id
    video_block = frames * frame_block
    for name, mask, block in (("image", is_img, image_block), ("video", is_vid, video_block)):
        counts = mask.sum(dim=1)
        if bool(mask.any()) and (block < 1 or bool((counts % block).any())):
            raise ValueError(
                f"every row must hold whole {name} blocks of {block} placeholders; found {counts.tolist()} "
                f"per row. Pass the processor's output unchanged."
            )
    minus = torch.full_like(input_ids, -1)
    img_ord = is_img.flatten().long().cumsum(0).view_as(input_ids) - 1  # row-major: the scatter order
    vid_ord = is_vid.flatten().long().cumsum(0).view_as(input_ids) - 1
    ib, vb, fb = max(1, image_block), max(1, video_block), max(1, frame_block)
    image_slot = torch.where(is_img, img_ord % ib, minus)
    in_video = torch.where(is_vid, vid_ord % vb, minus)
    slot = torch.where(is_vid, in_video % fb, minus)
    video_patch = is_vid & (slot >= video_cls)
    image_visual = is_img & images_prunable
    visual = video_patch | image_visual
    starts = (is_vid & (in_video == 0)) | (image_visual & (image_slot == 0))
    group = starts.long().cumsum(dim=1) - 1
    valid = torch.ones_like(visual) if attention_mask is None else attention_mask.bool()
    return {
        "visual": visual,
        "valid": valid,
        "image_index": torch.where(visual, group, minus),
        "query_index": last_prompt_index(valid, prompt_len),
        "image_id": torch.where(is_img, img_ord // ib, minus),
        "image_slot": image_slot,
        "video_id": torch.where(is_vid, vid_ord // vb, minus),
        "frame": torch.where(is_vid, in_video // fb, minus),
        "slot": slot,
    }


def pad_rows(rows: list[torch.Tensor], width: int | None = None) -> torch.Tensor:
    """Stack 1-D long tensors into ``(len(rows), width)``, padding on the right with -1."""
    width = max((len(r) for r in rows), default=0) if width is None else width
    out = torch.full((len(rows), width), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r.cpu()
    return out.to(rows[0].device) if rows else out


# ------------------------------------------------------------------------------------------------------
# Records
# ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    """Placeholder counts of one call (from its pixel tensors)."""

    n_images: int = 0
    image_block: int = 0  # placeholders per image, unpruned
    image_kept: int = 0  # after the vision stage
    n_videos: int = 0
    frames: int = 0
    frame_block: int = 0  # placeholders per frame, unpruned (CLS + patches)
    frame_kept: int = 0  # after the vision stage (CLS + kept patches)
    num_patches: int = 0  # patches per image / frame


@dataclass
class VideoLlavaPassRecord:
    """What the last forward (or generate's prefill) kept; see the module docstring for the shapes."""

    image_kept: torch.Tensor | None = None  # (num_images, K)
    video_kept: torch.Tensor | None = None  # (num_videos, frames, W), -1 padded
    frame_counts: torch.Tensor | None = None  # (num_videos, frames)
    image_tokens_per_layer: list[int] | None = None
    video_tokens_per_layer: list[int] | None = None
    num_patches: int = 0


# ------------------------------------------------------------------------------------------------------
# Attachment
# ------------------------------------------------------------------------------------------------------


class VideoLlavaAttachment(VLMAttachment):
    """Pruning on a Video-LLaVA instance (see the module docstring).

    Args:
        model: ``VideoLlavaForConditionalGeneration`` or ``VideoLlavaModel``.
        make_selector: vision-encoder selector for a patch budget (``None``: no vision-stage pruning).
        keep: ``K``: features per image, patch tokens per video.
        video_budget: ``"per_frame"`` or ``"shared"``.
        make_llm_selector: the language-model selector for a target ``K`` (``None``: vision stage only). With
            a vision selector it is the second stage on the videos' patch tokens; without one it prunes
            images and videos (LLM-only methods).
    """

    title = "Video-LLaVA"

    def __init__(
        self,
        model: nn.Module,
        make_selector: Callable[[int], VisionSelector | None],
        keep: int,
        *,
        video_budget: VideoBudget = "per_frame",
        make_llm_selector: Callable[[int], LLMSelector | None] | None = None,
    ) -> None:
        if video_budget not in VIDEO_BUDGETS:
            raise ValueError(f"video_budget must be one of {VIDEO_BUDGETS}, got {video_budget!r}")
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep must be an int >= 1, got {keep!r}")
        super().__init__(model, video_llava_parts(model))
        cfg = self.config
        image_spec = tower_spec(self.inner.image_tower)
        video_spec = tower_spec(self.inner.video_tower)
        strategy = cfg.vision_feature_select_strategy
        if strategy not in ("default", "full"):
            raise ValueError(
                f"vision_feature_select_strategy={strategy!r} is not supported ('default' or 'full')"
            )
        self.strategy = strategy
        self.feature_layer = cfg.vision_feature_layer
        self.has_cls = int(image_spec.has_cls)
        self.video_cls = int(video_spec.has_cls)  # upstream keeps every token of a frame, CLS included
        self.drop_cls = int(strategy == "default")
        self.patch_size = int(cfg.vision_config.patch_size)
        self.keep = keep
        self.video_budget = video_budget
        self.image_token_id = int(cfg.image_token_id)
        self.video_token_id = int(cfg.video_token_id)

        # Images: patches to keep so that the language model receives exactly `keep` features per image.
        keep_patches = keep - self.has_cls + self.drop_cls
        if keep_patches < 1:
            raise ValueError(
                f"keep={keep} leaves no patch token: with vision_feature_select_strategy={strategy!r} one of "
                f"the features is the CLS token, so keep must be >= 2"
            )
        self._make_selector = make_selector
        self._video_selectors: dict[int, VisionSelector] = {}
        image_selector = make_selector(keep_patches)
        self.keep_patches: int | None = keep_patches if image_selector is not None else None
        self.image_encoder: EncoderPruner | None = None
        self.video_encoder: EncoderPruner | None = None
        self._last: _Plan | None = None  # counts of the last call that carried images / videos
        self._last_layout: dict[str, torch.Tensor] | None = None  # positions of the last LLM-stage prefill
        self._gen_plan: _Plan | None = None  # while generate runs: the counts its prefill needs
        try:
            if image_selector is not None:
                consume = consumed_layer(cfg.vision_feature_layer, image_spec.num_layers)
                self.image_encoder = self.own(EncoderPruner(image_spec, image_selector, consume))
                side = int(cfg.vision_config.image_size) // self.patch_size
                first = self._video_selector(self._frame_budget(DEFAULT_FRAMES, side * side, check=False))
                consume = consumed_layer(cfg.vision_feature_layer, video_spec.num_layers)
                self.video_encoder = self.own(EncoderPruner(video_spec, first, consume))
            self.own_decoder(make_llm_selector(keep) if make_llm_selector is not None else None)
        except BaseException:
            self.remove()
            raise
        if video_budget == "shared" and self.decoder is None:
            self.remove()
            raise ValueError(
                "video_budget='shared' needs a language-model stage to bring each video to keep tokens; "
                "pass make_llm_selector or use video_budget='per_frame'"
            )
        self.install()

    # -- budgets ---------------------------------------------------------------------------------------
    @property
    def images_prunable(self) -> bool:
        """Images are pruned in the language model only by LLM-only methods (no vision stage)."""
        return self.image_encoder is None

    def _frame_budget(self, frames: int, num_patches: int, check: bool = True) -> int:
        if self.video_encoder is None and check:
            return num_patches
        try:
            return frame_budget(self.keep, frames, num_patches, self.video_budget)
        except ValueError:
            if check:
                raise
            return max(1, min(num_patches, self.keep // frames))

    def _video_selector(self, budget: int) -> VisionSelector:
        if budget not in self._video_selectors:
            selector = self._make_selector(budget)
            assert selector is not None
            self._video_selectors[budget] = selector
        return self._video_selectors[budget]

    def _grid(self, pixels: torch.Tensor) -> int:
        return (pixels.shape[-2] // self.patch_size) * (pixels.shape[-1] // self.patch_size)

    def plan(self, inputs: dict[str, Any]) -> _Plan | None:
        """Placeholder counts for this call's images / videos (``None`` without either); also points the video
        tower at this call's per-frame budget."""
        images = inputs.get("pixel_values")
        if images is None:  # the name before transformers 5.23 (compat.VIDEO_LLAVA_IMAGES_KWARG)
            images = inputs.get("pixel_values_images")
        videos = inputs.get("pixel_values_videos")
        if images is None and videos is None:
            return None
        fields: dict[str, int] = {}
        if images is not None:
            if not isinstance(images, torch.Tensor) or images.dim() != 4:
                raise ValueError(
                    "pixel_values must be a (num_images, C, H, W) tensor as the Video-LLaVA processor makes it"
                )
            n = self._grid(images)
            block = n + self.has_cls - self.drop_cls
            kept = (
                block
                if self.keep_patches is None
                else min(self.keep_patches, n) + self.has_cls - self.drop_cls
            )
            fields.update(n_images=images.shape[0], image_block=block, image_kept=kept, num_patches=n)
        if videos is not None:
            if not isinstance(videos, torch.Tensor) or videos.dim() != 5:
                raise ValueError(
                    "pixel_values_videos must be a (num_videos, frames, C, H, W) tensor as the Video-LLaVA "
                    "processor makes it"
                )
            n = self._grid(videos)
            frames = videos.shape[1]
            budget = self._frame_budget(frames, n)
            if self.video_encoder is not None:
                self.video_encoder.selector = self._video_selector(budget)
            fields.update(
                n_videos=videos.shape[0],
                frames=frames,
                frame_block=n + self.video_cls,
                frame_kept=budget + self.video_cls,
                num_patches=n,
            )
        return _Plan(**fields)

    # -- prompt ----------------------------------------------------------------------------------------
    def compact_inputs(self, inputs: dict[str, Any], plan: _Plan) -> tuple[dict[str, Any], int] | None:
        """The prompt with every image / video block cut to its kept placeholders; ``None`` if unchanged."""
        ids = self.prompt_ids(inputs, "image / video")
        check_feature_options(inputs, self.feature_layer, self.strategy)
        drop = torch.zeros_like(ids, dtype=torch.bool)
        for kind, token, count, block, kept in (
            ("image", self.image_token_id, plan.n_images, plan.image_block, plan.image_kept),
            ("video", self.video_token_id, plan.n_videos, plan.frames * plan.frame_block,
             plan.frames * plan.frame_kept),
        ):  # fmt: skip
            if count == 0 or kept >= block:
                continue
            total = int((ids == token).sum())
            if total == count * kept and self.generating:
                continue  # already compact: a forward of our own generate (its prompt was cut once)
            if total != count * block:
                raise ValueError(
                    f"input_ids hold {total} {kind} placeholders for {count} {kind}(s); expected {block} per "
                    f"{kind}. {unchanged_hint(kind)}"
                )
            drop |= placeholder_drop_mask(ids, token, block, kept)
        if not bool(drop.any()):
            return None
        return compact_prompt(inputs, drop, self.pad_token_id)

    def compact_for_generate(self, kwargs: dict[str, Any]) -> tuple[dict[str, Any], int, _Plan] | None:
        plan = self.plan(kwargs)
        if plan is None:
            return None
        self._last = plan
        result = self.compact_inputs(kwargs, plan)
        return None if result is None else (*result, plan)

    # -- hooks ----------------------------------------------------------------------------------------
    def forward_inputs(self, inputs: dict[str, Any]) -> dict[str, Any] | None:
        renamed = inputs.get("pixel_values_images") is not None and inputs.get("pixel_values") is None
        if renamed:  # one name inside this hook; the release's own name goes back out (below)
            inputs["pixel_values"] = inputs.pop("pixel_values_images")
        plan = self.plan(inputs)
        final, changed = inputs, renamed
        if plan is not None:
            self._last = plan
            result = self.compact_inputs(inputs, plan)
            if result is not None:
                final, changed = result[0], True
        elif self._gen_plan is not None and inputs.get("mm_encoder_outputs"):
            plan = self._gen_plan  # generate's prefill: the images / videos were encoded beforehand
        # Decode steps carry neither pixels nor encoded features: nothing to announce.
        if self.decoder is not None and plan is not None:
            ids = final["input_ids"]
            prompt_len = ids.shape[1] if self.prompt_len is None else self.prompt_len
            layout = av_layout(
                ids,
                image_token_id=self.image_token_id,
                video_token_id=self.video_token_id,
                image_block=plan.image_kept,
                frame_block=plan.frame_kept,
                frames=plan.frames,
                video_cls=self.video_cls,
                images_prunable=self.images_prunable,
                attention_mask=final.get("attention_mask"),
                prompt_len=prompt_len,
            )
            if bool(layout["visual"].any()):
                self._last_layout = layout
                self.decoder.begin(
                    **{k: layout[k] for k in ("visual", "valid", "query_index", "image_index")}
                )
            else:
                self._last_layout = None
        if not changed:
            return None
        if VIDEO_LLAVA_IMAGES_KWARG != "pixel_values" and final.get("pixel_values") is not None:
            final = dict(final)
            final[VIDEO_LLAVA_IMAGES_KWARG] = final.pop("pixel_values")
        return final

    def begin_session(self, kwargs: dict[str, Any], result: tuple | None) -> None:
        """While generate runs: the counts its prefill (with pre-encoded features) needs."""
        self._gen_plan = result[2] if result is not None else self.plan(kwargs)

    def end_session(self) -> None:
        self._gen_plan = None

    # -- records ----------------------------------------------------------------------------------------
    def _alive(self) -> torch.Tensor | None:
        """(B, L) bool: the columns of the last LLM-stage prefill that survived it (``None``: no such stage)."""
        if self.decoder is None or self._last_layout is None:
            return None
        visual = self._last_layout["visual"]
        kept = self.decoder.record.kept_positions
        if not kept:
            return torch.ones_like(visual)
        cols = kept[-1]
        alive = torch.zeros(visual.shape[0], visual.shape[1] + 1, dtype=torch.bool, device=visual.device)
        alive.scatter_(1, torch.where(cols >= 0, cols, visual.shape[1]), True)
        return alive[:, :-1]

    def _image_kept(self, plan: _Plan) -> torch.Tensor | None:
        if plan.n_images == 0:
            return None
        if self.image_encoder is not None:
            kept = self.image_encoder.record.kept_indices
            return kept if kept is not None and kept.shape[0] == plan.n_images else None
        alive, layout = self._alive(), self._last_layout
        if alive is None or layout is None:
            return None
        rows = []
        for i in range(plan.n_images):
            here = (layout["image_id"] == i) & alive
            rows.append(layout["image_slot"][here].sort().values)
        return pad_rows(rows)

    def _video_kept(self, plan: _Plan) -> tuple[torch.Tensor, torch.Tensor] | None:
        if plan.n_videos == 0:
            return None
        v, f, n = plan.n_videos, plan.frames, plan.num_patches
        enc = self.video_encoder.record.kept_indices if self.video_encoder is not None else None
        if enc is None or enc.shape[0] != v * f:
            enc = torch.arange(n).expand(v * f, n)
        enc = enc.reshape(v, f, -1)  # (V, F, k) encoder survivors per frame, ascending
        alive, layout = self._alive(), self._last_layout
        if alive is None or layout is None:
            return enc, torch.full((v, f), enc.shape[-1], dtype=torch.long)
        mask = torch.zeros(enc.shape, dtype=torch.bool)
        here = alive & (layout["video_id"] >= 0) & (layout["slot"] >= self.video_cls)
        mask[
            layout["video_id"][here].cpu(),
            layout["frame"][here].cpu(),
            (layout["slot"][here] - self.video_cls).cpu(),
        ] = True
        counts = mask.sum(dim=-1)
        rows = [enc[a, b][mask[a, b].to(enc.device)] for a in range(v) for b in range(f)]
        return pad_rows(rows).view(v, f, int(counts.max())), counts

    @property
    def pass_record(self) -> VideoLlavaPassRecord:
        """The kept indices of the last call, images and videos apart (module docstring)."""
        plan = self._last
        if plan is None:
            return VideoLlavaPassRecord()
        video = self._video_kept(plan)
        return VideoLlavaPassRecord(
            image_kept=self._image_kept(plan),
            video_kept=video[0] if video is not None else None,
            frame_counts=video[1] if video is not None else None,
            image_tokens_per_layer=(
                list(self.image_encoder.record.tokens_per_layer)
                if self.image_encoder is not None and plan.n_images
                else None
            ),
            video_tokens_per_layer=(
                list(self.video_encoder.record.tokens_per_layer)
                if self.video_encoder is not None and plan.n_videos
                else None
            ),
            num_patches=plan.num_patches,
        )

    @property
    def record(self) -> EncoderPassRecord:
        """For the handle: ``kept_indices`` = image rows then one row per frame, ``-1`` padded; the tokens per
        layer of the image tower (of the video tower when the call had no image)."""
        rec = self.pass_record
        rows: list[torch.Tensor] = []
        if rec.image_kept is not None:
            rows += list(rec.image_kept)
        if rec.video_kept is not None:
            rows += list(rec.video_kept.flatten(0, 1))
        layers = rec.image_tokens_per_layer or rec.video_tokens_per_layer or []
        return EncoderPassRecord(
            kept_indices=pad_rows(rows) if rows else None,
            tokens_per_layer=list(layers),
            num_patches=rec.num_patches,
        )


class VideoLlavaAdapter(ModelAdapter):
    """Video-LLaVA: images and videos (module docstring, "Video budgets")."""

    name = "video_llava"
    title = "Video-LLaVA"
    classes = ("VideoLlavaForConditionalGeneration", "VideoLlavaModel")
    options = (VIDEO_BUDGET,)

    def why_not(self, spec: MethodSpec) -> tuple[type[Exception], str] | None:
        if spec.make_selector is not None and spec.make_llm_selector is not None:
            return (
                NotImplementedError,
                "prunes both in the vision tower and in the language model (not yet here)",
            )
        return None

    def check_options(self, spec: MethodSpec, options: dict[str, Any]) -> None:
        video_budget = options.get("video_budget")
        if video_budget is not None and video_budget not in VIDEO_BUDGETS:
            raise ValueError(f"video_budget must be one of {VIDEO_BUDGETS}, got {video_budget!r}")
        if spec.make_selector is None and video_budget == "per_frame":  # LLM-only: one block per video
            raise ValueError(
                f"{spec.name!r} prunes inside the language model, where each video is one block of keep patch "
                f"tokens; pass video_budget='shared' (or leave it out)"
            )
        if spec.make_selector is not None and video_budget == "shared" and spec.make_second_stage is None:
            raise ValueError(
                f"video_budget='shared' needs a language-model stage after the vision stage, which {spec.name!r} "
                f"does not have; use video_budget='per_frame' (or the 'flowcut' method)"
            )

    def attach(
        self, model: nn.Module, spec: MethodSpec, config: Any, options: dict[str, Any]
    ) -> VideoLlavaAttachment:
        keep = config.keep
        if spec.make_selector is None:
            return VideoLlavaAttachment(
                model,
                lambda k: None,
                keep,
                video_budget="shared",
                make_llm_selector=lambda k: spec.make_llm_selector(config, k),
            )
        budget = options.get("video_budget") or "per_frame"
        return VideoLlavaAttachment(
            model,
            lambda k: spec.make_selector(config, k),
            keep,
            video_budget=budget,
            make_llm_selector=(lambda k: spec.make_second_stage(config, k)) if budget == "shared" else None,
        )


register_adapter(VideoLlavaAdapter())
