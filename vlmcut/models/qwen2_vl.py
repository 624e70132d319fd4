"""Qwen2-VL and Qwen2.5-VL (``Qwen2VLForConditionalGeneration`` / ``Qwen2_5_VLForConditionalGeneration`` and
their ``...Model`` inner classes): both pruning stages and the M-RoPE layout, wired on one instance.

The Qwen vision tower has no CLS token and no fixed grid: every image (or video) of a call is cut into
``t x h x w`` patches of its own size, all images are packed into one sequence, and attention is kept
inside each frame by ``cu_seqlens`` (Qwen2.5-VL: inside windows of merge units in most blocks,
``cu_window_seqlens``, the sequence itself permuted window by window). After the last block a *patch merger*
concatenates every run of ``m x m`` (2 x 2) consecutive tokens, a *merge unit* of spatial neighbours, into one
language-model token. The language model places visual tokens with 3-D M-RoPE positions (time, row, column).

What this module does:

* **Vision stage** (:class:`QwenVisionPruner`, hooks on the tower instance). The tower runs unchanged on
  the packed sequence; after every block a selector (FlowCut) scores the tokens of each *scoring group*
  (an image, a video, or a video frame; see ``video_budget``) with its own global token, the mean of the
  group's queries / values (SPEC "No CLS"), over *all* the group's tokens (not per attention window), and
  keeps whole merge units (a unit scores the mean of its ``m*m`` tokens). A block pre-hook hands the next
  blocks ``cu_seqlens`` / ``cu_window_seqlens`` / ``max_seqlen`` and the rotary ``position_embeddings`` of
  the surviving tokens, so every block attends exactly within the surviving part of its frame / window.
  The merger therefore still merges 2 x 2 spatial neighbours; a hook on it scatters its output back to the
  unpruned unit count (zeros at dropped units) so the tower's own window un-permutation (Qwen2.5-VL) stays
  valid, and the attachment then takes the kept units in raster order.
* **Prompt.** The processor writes one placeholder per merged token. The forward pre-hook runs the vision
  stage itself, computes the *unpruned* model's M-RoPE positions (transformers' ``get_rope_index`` on the
  caller's prompt), deletes the placeholders of dropped units together with their position columns, and
  calls the model with the kept features (``mm_encoder_outputs``) and explicit ``position_ids``: every kept
  visual token keeps its original (t, h, w) position and text tokens keep theirs. ``rope_deltas`` is set
  so that a continuation is numbered as the unpruned model would number it. ``generate`` is wrapped on the
  instance (prompt compacted once; ``position_ids`` given in generate's 4-row form, which generate then
  continues by +1 per step: the unpruned numbering) and returns the caller's ``input_ids`` in front.
* **Language-model stage.** A :class:`~vlmcut.models.llm.DecoderPruner` brings every scoring group to its
  target ``K`` (FlowCut: at the output of decoder layer 1; FastV / PDrop / SparseVLM: their own layers).
  Groups may have different targets (ratio ``keep``, video frames); :class:`PerTargetSelector` runs one
  selector per distinct target.

Budgets (``K`` = ``keep`` resolved per visual item: an int is a count of merged tokens, capped at the
item's count, so ``keep >=`` the count keeps the item whole; a float ratio in (0, 1] gives
``max(1, round(ratio * merged tokens))``):

* an image is one group with target ``K``;
* a video with ``video_budget="per_frame"`` (default): each temporal slot of its grid is a group with
  target ``K // T`` (the first ``K % T`` slots one more; at least 1 each), scored with its own global token;
  with ``"shared"``: the whole video is one group with target ``K``, scored with one global token, so
  frames compete for the budget;
* FlowCut keeps ``min(2 K_g, units)`` merge units per group in the vision tower (SPEC "Two-stage": ``2K``
  measured after the merger), then ``K_g`` in the language model; LLM-only methods keep the tower whole;
* ``keep="auto"`` (FlowCut only): every group keeps the fewest merge units whose share of its cumulative
  importance reaches ``mass`` (between ``min_keep`` and ``max_keep``), decided at the tower's last pruning
  step. That count is final: there is no language-model stage, since a second cut to a fixed fraction would
  undo the per-image choice. The counts are on ``handle.image_token_counts`` (images, then videos).

Encoder-only methods (random, grid, VisionZip, FasterVLM) select single tokens and are not supported here.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..methods.base import LLMContext, LLMSelection, LLMSelector, MethodSpec, VisionSelector
from .base import VLMAttachment
from .prompt import IGNORE_INDEX, compact, last_prompt_index, padding_side
from .registry import (
    UNBOUNDED_KEEP,
    VIDEO_BUDGET,
    VIDEO_BUDGETS,
    ModelAdapter,
    ModelParts,
    image_token_id,
    register_adapter,
)
from .vit import EncoderPassRecord

SUPPORTED_QWEN = (
    "Qwen2VLForConditionalGeneration",
    "Qwen2VLModel",
    "Qwen2_5_VLForConditionalGeneration",
    "Qwen2_5_VLModel",
)


def qwen_parts(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """``(outer, inner)`` for a Qwen2-VL / Qwen2.5-VL model: the module whose ``forward`` takes the prompt and
    the ``...Model`` holding ``visual`` and ``language_model``; ``None`` for any other model."""
    from transformers import (
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLModel,
        Qwen2VLForConditionalGeneration,
        Qwen2VLModel,
    )

    if isinstance(model, (Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration)):
        return model, model.model
    if isinstance(model, (Qwen2VLModel, Qwen2_5_VLModel)):
        return model, model
    return None


# ------------------------------------------------------------------------------------------------------
# Budgets
# ------------------------------------------------------------------------------------------------------


def resolve_keep(keep: int | float, count: int) -> int:
    """Target tokens of an item with ``count`` merged tokens: an int is capped at ``count``; a float ratio
    gives ``max(1, round(ratio * count))``."""
    if isinstance(keep, float):
        return min(count, max(1, round(keep * count)))
    return min(int(keep), count)


@dataclass(frozen=True)
class Group:
    """A scoring group: a run of merge units of one visual item, pruned to ``target`` with its own global
    token. ``lo, hi``: the group's units in the stream's raster unit numbering (items back to back)."""

    item: int  # index of the item in its stream (image i / video i)
    frame: int  # temporal slot of the item, -1: all of them
    lo: int
    hi: int
    target: int  # merged tokens the group keeps in the end (K_g)

    @property
    def size(self) -> int:
        return self.hi - self.lo


def make_groups(grid_thw: torch.Tensor, merge: int, keep: int | float, per_frame: bool) -> list[Group]:
    """The scoring groups of one stream (images or videos) in raster unit order; see the module docstring."""
    groups: list[Group] = []
    start = 0
    for item, (t, h, w) in enumerate(grid_thw.tolist()):
        per_slot = (h // merge) * (w // merge)
        total = t * per_slot
        k = resolve_keep(keep, total)
        if per_frame and t > 1:
            q, r = divmod(k, t)
            for f in range(t):
                lo = start + f * per_slot
                groups.append(Group(item, f, lo, lo + per_slot, min(per_slot, max(1, q + (f < r)))))
        else:
            groups.append(Group(item, -1, start, start + total, k))
        start += total
    return groups


# ------------------------------------------------------------------------------------------------------
# Vision stage
# ------------------------------------------------------------------------------------------------------


@dataclass
class _TowerPass:
    """State of one armed tower forward. Units are in the tower's order (Qwen2.5-VL: window order)."""

    groups: list[Group]
    selectors: list[VisionSelector | None]
    raster: torch.Tensor  # (U,) raster unit of each tower unit
    alive: torch.Tensor  # (U',) tower units still alive, ascending
    group_of: torch.Tensor  # (U',) group of each alive unit
    frame_of: torch.Tensor  # (U',) global frame (full-attention segment) of each alive unit
    window_of: torch.Tensor | None  # (U',) window of each alive unit (Qwen2.5-VL)
    total_units: int
    pe: tuple[torch.Tensor, torch.Tensor] | None = None  # original rotary embeddings, tower token order
    token_index: torch.Tensor | None = None  # (T',) tower tokens alive
    cu_full: torch.Tensor | None = None
    cu_window: torch.Tensor | None = None
    pruned: bool = False
    armed: int | None = None
    qkv: torch.Tensor | None = None
    tokens: list[int] = field(default_factory=list)  # alive merge units after every block


def _cu(segment_of_unit: torch.Tensor, unit: int, like: torch.Tensor) -> torch.Tensor:
    """Cumulative token boundaries of the alive units' segments (segments stay in order; empty ones vanish)."""
    _, counts = torch.unique_consecutive(segment_of_unit, return_counts=True)
    cu = F.pad((counts * unit).cumsum(0), (1, 0))
    return cu.to(device=like.device, dtype=like.dtype)


class QwenVisionPruner:
    """Hooks on one Qwen vision tower (``Qwen2VisionTransformerPretrainedModel`` or the 2.5 one).

    Inactive unless :meth:`run` arms it: a direct call of the tower outside :meth:`run` is untouched.
    """

    def __init__(self, visual: nn.Module) -> None:
        self.visual = visual
        self.blocks = list(visual.blocks)
        if len(self.blocks) < 2:
            raise ValueError(
                f"the vision tower has {len(self.blocks)} block(s); FlowCut needs at least 2 (it prunes at "
                f"the output of the blocks before the last one)"
            )
        attn = self.blocks[0].attn
        if not isinstance(getattr(attn, "qkv", None), nn.Linear):
            raise TypeError(f"vision attention {type(attn).__name__} has no fused qkv linear; not supported")
        self.merge = int(visual.spatial_merge_size)
        self.unit = self.merge**2
        self.num_heads = int(attn.num_heads)
        self.head_dim = int(attn.head_dim)
        self.scale = float(attn.scaling)
        self.windowed = hasattr(visual, "fullatt_block_indexes")
        self.full_blocks = (
            set(visual.fullatt_block_indexes) if self.windowed else set(range(len(self.blocks)))
        )
        self._rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb_vision
        # The merger reads the last block's output: pruning is complete at the output of the block before
        # it, so the last block already runs on the kept tokens (SPEC "Schedule", F = depth - 1).
        self.consume_layer = len(self.blocks) - 1
        self._pass: _TowerPass | None = None
        self._plan: tuple[list[Group], list[VisionSelector | None]] | None = None
        self.result: tuple[list[torch.Tensor], list[int]] | None = None
        self._handles: list[RemovableHandle] = []
        self._install()

    def _install(self) -> None:
        v = self.visual
        self._handles.append(v.register_forward_pre_hook(self._on_start, with_kwargs=True))
        self._handles.append(v.register_forward_hook(self._on_end))
        for i, blk in enumerate(self.blocks):
            self._handles.append(blk.register_forward_pre_hook(self._make_pre(i), with_kwargs=True))
            self._handles.append(blk.register_forward_hook(self._make_post(i), prepend=True))
            self._handles.append(blk.attn.qkv.register_forward_hook(self._make_capture(i)))
        self._handles.append(v.merger.register_forward_hook(self._on_merger))

    # -- driving ---------------------------------------------------------------------------------------
    def run(
        self,
        pixel_values: torch.Tensor,
        grid_thw: torch.Tensor,
        groups: list[Group],
        selectors: list[VisionSelector | None],
    ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """One tower forward with every group pruned by its selector (``None``: kept whole).

        Returns ``(features, kept, tokens_per_layer)``: ``features`` ``(U, D)`` merged tokens in raster
        order (zeros at dropped units), ``kept`` ``(U,)`` bool, merge units alive per block.
        """
        self._plan = (groups, selectors)
        try:
            out = self.visual(pixel_values.type(self.visual.dtype), grid_thw=grid_thw)
            kept, tokens = self.result
        finally:
            self._plan = None
            self._pass = None
            self.result = None
        return out.pooler_output, kept, tokens

    # -- hooks -----------------------------------------------------------------------------------------
    def _on_start(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._pass = None
        if self._plan is None:
            return
        groups, selectors = self._plan
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        device = grid.device
        per_item = (grid.prod(-1) // self.unit).tolist()
        total = int(sum(per_item))
        if self.windowed:
            from transformers.vision_utils import get_vision_window_index

            raster, cu_window = get_vision_window_index(
                grid, self.merge, self.visual.window_size, self.visual.patch_size
            )
            raster = raster.to(device)
            window_of = torch.bucketize(
                torch.arange(total, device=device) * self.unit, cu_window[1:].to(device), right=True
            )
        else:
            raster = torch.arange(total, device=device)
            window_of = None
        group_raster = torch.empty(total, dtype=torch.long, device=device)
        for g, grp in enumerate(groups):
            group_raster[grp.lo : grp.hi] = g
        frame_raster = torch.repeat_interleave(
            torch.arange(int(grid[:, 0].sum()), device=device),
            torch.repeat_interleave((grid[:, 1] * grid[:, 2]) // self.unit, grid[:, 0]),
        )
        group_of = group_raster[raster]
        if bool((group_of[1:] < group_of[:-1]).any()):
            raise RuntimeError(
                "the tower's unit order does not keep scoring groups contiguous; not supported"
            )
        for sel in selectors:
            if sel is not None:
                sel.start(self.consume_layer)
        self._pass = _TowerPass(
            groups=groups,
            selectors=selectors,
            raster=raster,
            alive=torch.arange(total, device=device),
            group_of=group_of,
            frame_of=frame_raster[raster],
            window_of=window_of,
            total_units=total,
        )

    def _make_pre(self, i: int) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            state = self._pass
            if state is None:
                return None
            state.armed, state.qkv = i, None
            if state.pe is None:
                state.pe = kwargs["position_embeddings"]
            if not state.pruned:
                return None
            kwargs = dict(kwargs)
            cu = state.cu_full if i in self.full_blocks else state.cu_window
            kwargs["cu_seqlens"] = cu
            if kwargs.get("max_seqlen") is not None:
                kwargs["max_seqlen"] = int((cu[1:] - cu[:-1]).max())
            idx = state.token_index
            kwargs["position_embeddings"] = (state.pe[0][idx], state.pe[1][idx])
            return args, kwargs

        return hook

    def _make_capture(self, i: int) -> Callable:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if self._pass is not None and self._pass.armed == i:
                self._pass.qkv = output

        return hook

    def _make_post(self, i: int) -> Callable:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            state = self._pass
            if state is None:
                return None
            qkv, state.qkv, state.armed = state.qkv, None, None
            counts = torch.bincount(state.group_of, minlength=len(state.groups)).tolist()
            todo = [
                g
                for g, sel in enumerate(state.selectors)
                if sel is not None and counts[g] > 0 and sel.needs_scores(counts[g])
            ]
            if not todo:
                state.tokens.append(int(state.alive.numel()))
                return None
            if qkv is None:
                raise RuntimeError(f"vision block {i}: the qkv projection did not run through its module")
            seq = output.shape[0]
            q, k, v = qkv.reshape(seq, 3, self.num_heads, self.head_dim).unbind(1)  # (T, H, d) each
            idx = state.token_index
            cos, sin = state.pe if idx is None else (state.pe[0][idx], state.pe[1][idx])
            q, k = self._rope(q, k, cos, sin)
            starts = [0, *torch.tensor(counts).cumsum(0).tolist()]
            keep_units: list[torch.Tensor] = []
            changed = False
            for g in range(len(state.groups)):
                a, b = starts[g], starts[g + 1]
                units = torch.arange(a, b, device=output.device)
                if g in todo:
                    tok = slice(a * self.unit, b * self.unit)
                    qs, ks, vs = (x[tok].transpose(0, 1).unsqueeze(0) for x in (q, k, v))  # (1, H, n, d)
                    chosen = state.selectors[g].step(i, qs, ks, vs, self.scale, False, group=self.unit)
                    if chosen is not None and not isinstance(chosen, torch.Tensor):
                        raise TypeError("token merging selectors are not supported on the Qwen vision tower")
                    if chosen is not None and chosen.shape[-1] < b - a:
                        units = a + chosen[0].to(output.device)
                        changed = True
                keep_units.append(units)
            if not changed:
                state.tokens.append(int(state.alive.numel()))
                return None
            keep = torch.cat(keep_units)  # (U'',) ascending: groups in order, indices ascending within
            tokens = (keep[:, None] * self.unit + torch.arange(self.unit, device=keep.device)).flatten()
            hidden = output[tokens]
            prev_tokens = torch.arange(seq, device=output.device) if idx is None else idx
            state.token_index = prev_tokens[tokens]
            state.alive = state.alive[keep]
            state.group_of = state.group_of[keep]
            state.frame_of = state.frame_of[keep]
            state.cu_full = _cu(state.frame_of, self.unit, state.pe[0].new_zeros(0, dtype=torch.int32))
            if state.window_of is not None:
                state.window_of = state.window_of[keep]
                state.cu_window = _cu(state.window_of, self.unit, state.cu_full)
            state.pruned = True
            state.tokens.append(int(state.alive.numel()))
            return hidden

        return hook

    def _on_merger(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        state = self._pass
        if state is None or not state.pruned:
            return None
        full = output.new_zeros(state.total_units, output.shape[-1])
        full[state.alive] = output
        return full

    def _on_end(self, module: nn.Module, args: tuple, output: Any) -> None:
        state = self._pass
        if state is None:
            return
        kept = torch.zeros(state.total_units, dtype=torch.bool, device=state.alive.device)
        kept[state.raster[state.alive]] = True
        self.result = (kept, list(state.tokens))
        self._pass = None

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._pass = None
        self._plan = None


# ------------------------------------------------------------------------------------------------------
# Language-model stage with per-group targets
# ------------------------------------------------------------------------------------------------------


class PerTargetSelector:
    """An :class:`LLMSelector` whose visual groups have different targets: one selector per distinct target,
    each deciding only for its groups. With a single target it is exactly that selector.

    :meth:`set_targets` gives, before a prefill, ``targets`` ``(B, I)`` (target of image ``i`` of row ``b``,
    the decoder's per-row ``image_index``; -1: none) and ``counts`` ``(B, I)`` (its visual tokens).
    """

    def __init__(self, make: Callable[[int], LLMSelector]) -> None:
        self._make = make
        self._selectors: dict[int, LLMSelector] = {}
        self.targets: torch.Tensor | None = None
        self.counts: torch.Tensor | None = None
        self._layers: dict[int, set[int]] = {}

    def selector(self, target: int) -> LLMSelector:
        if target not in self._selectors:
            self._selectors[target] = self._make(target)
        return self._selectors[target]

    def set_targets(self, targets: torch.Tensor, counts: torch.Tensor) -> None:
        self.targets, self.counts = targets, counts

    def prune_layers(self, num_layers: int, num_visual: int) -> list[int]:
        self._layers = {}
        if self.targets is None:
            return []
        for t in sorted({int(x) for x in self.targets[self.targets > 0].tolist()}):
            most = int(self.counts[self.targets == t].max())
            self._layers[t] = {int(x) for x in self.selector(t).prune_layers(num_layers, most)}
        return sorted(set().union(*self._layers.values())) if self._layers else []

    def select(self, ctx: LLMContext) -> torch.Tensor | LLMSelection | None:
        active = [t for t, layers in self._layers.items() if ctx.layer in layers]
        if len(self._layers) == 1:
            return self.selector(active[0]).select(ctx) if active else None
        img = ctx.image_index.clamp(min=0)
        target_of = torch.gather(self.targets.to(img.device), 1, img.clamp(max=self.targets.shape[1] - 1))
        target_of = torch.where(
            ctx.visual & (ctx.image_index >= 0), target_of, torch.full_like(target_of, -1)
        )
        keep = torch.ones_like(ctx.visual)
        hidden: torch.Tensor | None = None
        any_result = False
        for t in active:
            mine = target_of == t  # (B, T)
            sub = dataclasses.replace(ctx, image_index=torch.where(mine, ctx.image_index, -1))
            res = self.selector(t).select(sub)
            if res is None:
                continue
            any_result = True
            if isinstance(res, LLMSelection):
                if res.hidden is not None:
                    base = ctx.hidden if hidden is None else hidden
                    hidden = torch.where(mine[..., None], res.hidden.to(base.dtype), base)
                res = res.keep
            keep = keep & (res | ~mine)
        if not any_result:
            return None
        return LLMSelection(keep, hidden) if hidden is not None else keep


# ------------------------------------------------------------------------------------------------------
# Records
# ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QwenItem:
    """One image or video after the vision stage.

    ``kept_units``: ascending merge-unit indices on the item's merged ``t x (h/m) x (w/m)`` grid (raster,
    frame by frame); ``kept_tokens``: the corresponding ViT token indices in the processor's patch order
    (``unit * m*m + j``: whole 2 x 2 blocks).
    """

    kind: str  # "image" | "video"
    grid_thw: tuple[int, int, int]  # ViT patches (t, h, w)
    num_units: int
    kept_units: torch.Tensor
    kept_tokens: torch.Tensor
    features: torch.Tensor  # (len(kept_units), D)


@dataclass
class QwenPassRecord:
    """What the last vision stage did: items (images first, then videos, in prompt order of each stream),
    scoring groups with their targets and tower budgets, merge units alive after every block."""

    items: list[QwenItem] = field(default_factory=list)
    groups: list[Group] = field(default_factory=list)  # images' groups, then videos' (lo/hi per stream)
    budgets: list[int] = field(default_factory=list)  # merge units each group kept in the tower
    tokens_per_layer: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class _Layout:
    """Per kept placeholder (stream order), its global group; the groups' targets; what the prompt had."""

    image_groups: torch.Tensor  # (n_kept_image_placeholders,) long
    video_groups: torch.Tensor
    targets: torch.Tensor  # (G,) long
    features: dict[str, list[torch.Tensor]]


# ------------------------------------------------------------------------------------------------------
# Attachment
# ------------------------------------------------------------------------------------------------------


class QwenAttachment(VLMAttachment):
    """Both stages and the prompt surgery on a Qwen2-VL / Qwen2.5-VL instance (see the module docstring).

    Args:
        model: ``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration`` or their
            ``...Model``.
        keep: ``K`` per image (int count of merged tokens, or a float ratio in (0, 1]).
        make_encoder: vision selector for a budget of merge units (``None``: the tower keeps everything).
            The selector's ``step`` must accept ``group=`` (whole merge units: ``MethodSpec.merge_units``).
        make_llm: language-model selector for a target (``None``: no language-model stage).
        video_budget: ``"per_frame"`` or ``"shared"`` (module docstring).
        vision_factor: tower budget = ``vision_factor * K_g`` merge units (2: SPEC "Two-stage").
        auto: ``keep="auto"``: ``keep`` is the bound (``max_keep``) and every group keeps the count its own
            selector chooses in the tower (``make_llm`` must then be ``None``).
    """

    title = "Qwen2-VL"

    def __init__(
        self,
        model: nn.Module,
        keep: int | float,
        make_encoder: Callable[[int], VisionSelector] | None,
        make_llm: Callable[[int], LLMSelector] | None,
        video_budget: str = "per_frame",
        vision_factor: int = 2,
        auto: bool = False,
    ) -> None:
        if auto and (make_encoder is None or make_llm is not None):
            raise ValueError(
                "keep='auto' needs a method that decides its counts in the vision tower (flowcut)"
            )
        if video_budget not in VIDEO_BUDGETS:
            raise ValueError(f"video_budget must be one of {VIDEO_BUDGETS}, got {video_budget!r}")
        super().__init__(model, qwen_parts(model))
        self.keep = keep
        self.video_budget = video_budget
        self.vision_factor = vision_factor
        self.auto = auto
        self.image_counts: list[
            int
        ] = []  # auto: merged tokens every item kept (images, then videos), in order
        cfg = self.config
        self.image_token_id = int(cfg.image_token_id)
        self.video_token_id = int(cfg.video_token_id)
        self.merge = int(cfg.vision_config.spatial_merge_size)
        self._make_encoder = make_encoder
        self.pass_record = QwenPassRecord()
        self._issued: dict[int, _Layout] = {}
        self._rope_params = set(inspect.signature(self.inner.get_rope_index).parameters)
        self.llm_selector: PerTargetSelector | None = None
        try:
            self.vision = self.own(QwenVisionPruner(self.inner.visual)) if make_encoder is not None else None
            if make_llm is not None:
                self.llm_selector = PerTargetSelector(make_llm)
                self.own_decoder(self.llm_selector)
        except BaseException:
            self.remove()
            raise
        self.install()

    # -- vision stage ------------------------------------------------------------------------------------
    def _encode_stream(
        self, kind: str, pixels: torch.Tensor, grid: torch.Tensor
    ) -> tuple[list[QwenItem], list[Group], list[int], list[int]]:
        per_frame = kind == "video" and self.video_budget == "per_frame"
        groups = make_groups(grid, self.merge, self.keep, per_frame)
        unit = self.merge**2
        if self.vision is not None and self.auto:  # every group chooses its count; keep is the bound
            selectors = [self._make_encoder(min(g.size, g.target)) for g in groups]
            feats, kept, tokens = self.vision.run(pixels, grid, groups, selectors)
            groups = [dataclasses.replace(g, target=int(kept[g.lo : g.hi].sum())) for g in groups]
            budgets = [g.target for g in groups]
        elif self.vision is not None:
            budgets = [min(g.size, self.vision_factor * g.target) for g in groups]
            selectors = [
                self._make_encoder(b) if b < g.size else None for g, b in zip(groups, budgets, strict=True)
            ]
            feats, kept, tokens = self.vision.run(pixels, grid, groups, selectors)
        else:
            budgets = [g.size for g in groups]
            out = self.inner.visual(pixels.type(self.inner.visual.dtype), grid_thw=grid)
            feats = out.pooler_output
            kept = torch.ones(feats.shape[0], dtype=torch.bool, device=feats.device)
            tokens = []
        items: list[QwenItem] = []
        start = 0
        for t, h, w in grid.tolist():
            n = t * h * w // unit
            local = kept[start : start + n].nonzero().flatten()
            toks = (local[:, None] * unit + torch.arange(unit, device=local.device)).flatten()
            items.append(QwenItem(kind, (t, h, w), n, local.cpu(), toks.cpu(), feats[start + local]))
            start += n
        return items, groups, budgets, tokens

    # -- prompt ----------------------------------------------------------------------------------------
    def compact_inputs(
        self, inputs: dict[str, Any], for_generate: bool = False
    ) -> tuple[dict[str, Any], int, _Layout] | None:
        """Run the vision stage and return the compacted prompt (module docstring), its length and layout;
        ``None`` when the call carries no pixels."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        pv, pvv = inputs.get("pixel_values"), inputs.get("pixel_values_videos")
        has_img = pv is not None and pv.shape[0] > 0
        has_vid = pvv is not None and pvv.shape[0] > 0
        if not (has_img or has_vid):
            return None
        ids = self.prompt_ids(inputs, "image / video")
        if inputs.get("mm_encoder_outputs"):
            raise ValueError("pass either pixel_values / pixel_values_videos or mm_encoder_outputs, not both")
        if inputs.get("position_ids") is not None:
            raise ValueError(
                "do not pass position_ids with pixel values to a pruned Qwen2-VL: the pruning computes the "
                "M-RoPE positions of the kept tokens itself"
            )
        img_grid, vid_grid = inputs.get("image_grid_thw"), inputs.get("video_grid_thw")
        if has_img and img_grid is None:
            raise ValueError("pixel_values need image_grid_thw; pass the processor's output")
        if has_vid and vid_grid is None:
            raise ValueError("pixel_values_videos need video_grid_thw; pass the processor's output")
        mask = inputs.get("attention_mask")
        if mask is not None and mask.dim() != 2:
            raise ValueError(f"attention_mask of shape {tuple(mask.shape)}; pass the (B, L) padding mask")

        records = QwenPassRecord()
        per_placeholder: dict[str, torch.Tensor] = {}
        kept_cols: dict[str, torch.Tensor] = {}
        features: dict[str, list[torch.Tensor]] = {}
        targets: list[int] = []
        for kind, pixels, grid, token in (
            ("image", pv, img_grid, self.image_token_id),
            ("video", pvv, vid_grid, self.video_token_id),
        ):
            if pixels is None or pixels.shape[0] == 0:
                continue
            items, groups, budgets, tokens = self._encode_stream(kind, pixels, grid)
            n_units = sum(it.num_units for it in items)
            is_ph = ids == token
            if int(is_ph.sum()) != n_units:
                raise ValueError(
                    f"input_ids hold {int(is_ph.sum())} {kind} placeholders but the {kind}s need {n_units} "
                    f"({[it.num_units for it in items]} per {kind}, as the processor expands them). Pass the "
                    f"processor's output unchanged."
                )
            alive = torch.cat(
                [
                    torch.zeros(it.num_units, dtype=torch.bool).index_fill_(0, it.kept_units, True)
                    for it in items
                ]
            )
            group_of_unit = torch.empty(n_units, dtype=torch.long)
            for g, grp in enumerate(groups):
                group_of_unit[grp.lo : grp.hi] = len(targets) + g
            alive = alive.to(ids.device)
            kept_cols[kind] = torch.zeros_like(is_ph)
            kept_cols[kind][is_ph] = alive
            per_placeholder[kind] = group_of_unit.to(ids.device)[alive]
            features[kind] = [it.features for it in items]
            if self.auto:
                self.image_counts += [len(it.kept_units) for it in items]
            targets += [g.target for g in groups]
            records.items += items
            records.groups += groups
            records.budgets += budgets
            if tokens:
                records.tokens_per_layer = (
                    [a + b for a, b in zip(records.tokens_per_layer, tokens, strict=True)]
                    if records.tokens_per_layer
                    else tokens
                )
        self.pass_record = records

        # the unpruned model's M-RoPE positions of the caller's prompt
        visual = (ids == self.image_token_id) | (ids == self.video_token_id)
        types = inputs.get("mm_token_type_ids")
        if types is None:
            types = (ids == self.image_token_id).int() + 2 * (ids == self.video_token_id).int()
        rope_kwargs = {
            "image_grid_thw": img_grid if has_img else None,
            "video_grid_thw": vid_grid if has_vid else None,
        }
        if "second_per_grid_ts" in self._rope_params and inputs.get("second_per_grid_ts") is not None:
            rope_kwargs["second_per_grid_ts"] = inputs["second_per_grid_ts"]
        positions, _ = self.inner.get_rope_index(ids, types, attention_mask=mask, **rope_kwargs)  # (3, B, L)

        drop = visual.clone()
        for cols in kept_cols.values():
            drop &= ~cols
        keep = ~drop if mask is None else ~drop & mask.bool()
        lengths = keep.sum(dim=1)
        new_len = int(lengths.max())
        side = padding_side(mask)
        out = dict(inputs)
        for name in (
            "pixel_values",
            "pixel_values_videos",
            "image_grid_thw",
            "video_grid_thw",
            "second_per_grid_ts",
        ):
            out.pop(name, None)
        out["input_ids"] = compact(ids, keep, new_len, side, self.pad_token_id)
        new_mask = compact(mask if mask is not None else torch.ones_like(ids), keep, new_len, side, 0)
        if mask is not None or bool((lengths != new_len).any()):
            out["attention_mask"] = new_mask
        out["mm_token_type_ids"] = compact(types, keep, new_len, side, 0)
        if inputs.get("labels") is not None:
            out["labels"] = compact(inputs["labels"], keep, new_len, side, IGNORE_INDEX)
        if inputs.get("cache_position") is not None:
            out["cache_position"] = torch.arange(new_len, device=ids.device)
        pos = compact(positions.permute(1, 2, 0), keep, new_len, side, 0).permute(2, 0, 1)  # (3, B, L')
        # continuation: the unpruned model's next position is max + 1; the cache holds L'_valid tokens
        full_max = positions.amax(dim=(0, 2))  # padding columns hold 0
        self.inner.rope_deltas = (full_max + 1 - lengths).unsqueeze(1)
        if for_generate:
            text = new_mask.long().cumsum(-1) - 1
            text = text.masked_fill(new_mask == 0, 0)
            pos = torch.cat([text[None], pos], dim=0)  # generate's 4-row form: text positions first
        out["position_ids"] = pos
        out["mm_encoder_outputs"] = {
            kind: BaseModelOutputWithPooling(pooler_output=feats) for kind, feats in features.items()
        }
        layout = _Layout(
            image_groups=per_placeholder.get("image", torch.zeros(0, dtype=torch.long)),
            video_groups=per_placeholder.get("video", torch.zeros(0, dtype=torch.long)),
            targets=torch.tensor(targets, dtype=torch.long),
            features=features,
        )
        return out, new_len, layout

    def _announce(self, inputs: dict[str, Any], layout: _Layout) -> None:
        """Tell the language-model stage where the visual groups of this prefill are and their targets."""
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        valid = torch.ones_like(ids, dtype=torch.bool) if mask is None or mask.dim() != 2 else mask.bool()
        group = torch.full(ids.shape, -1, dtype=torch.long, device=ids.device)
        for token, groups in (
            (self.image_token_id, layout.image_groups),
            (self.video_token_id, layout.video_groups),
        ):
            is_ph = ids == token
            if int(is_ph.sum()) != groups.numel():
                return  # not the prompt this layout was made for
            group[is_ph] = groups.to(ids.device)
        visual = group >= 0
        b = ids.shape[0]
        width = max(1, max(int(group[r][visual[r]].unique().numel()) for r in range(b)))
        image_index = torch.full_like(group, -1)
        targets = torch.full((b, width), -1, dtype=torch.long, device=ids.device)
        counts = torch.zeros((b, width), dtype=torch.long, device=ids.device)
        for r in range(b):
            present = group[r][visual[r]].unique()  # sorted
            if present.numel() == 0:
                continue
            ordinal = torch.searchsorted(present, group[r].clamp(min=0))
            image_index[r] = torch.where(visual[r], ordinal, -1)
            targets[r, : present.numel()] = layout.targets.to(ids.device)[present]
            counts[r, : present.numel()] = torch.bincount(ordinal[visual[r]], minlength=present.numel())
        query_index = last_prompt_index(valid, self.prompt_len)
        self.llm_selector.set_targets(targets, counts)
        self.decoder.begin(visual=visual, valid=valid, query_index=query_index, image_index=image_index)

    def _issued_layout(self, inputs: dict[str, Any]) -> _Layout | None:
        mm = inputs.get("mm_encoder_outputs")
        if not isinstance(mm, dict) or not mm:
            return None
        for kind, value in mm.items():
            pooled = getattr(value, "pooler_output", None)
            if isinstance(pooled, (list, tuple)) and pooled and id(pooled[0]) in self._issued:
                layout = self._issued[id(pooled[0])]
                if layout.features.get(kind) is not None and layout.features[kind][0] is pooled[0]:
                    return layout
        return None

    # -- hooks ----------------------------------------------------------------------------------------
    def compact_for_generate(self, kwargs: dict[str, Any]) -> tuple | None:
        return self.compact_inputs(kwargs, for_generate=True)

    def announce(self, final: dict[str, Any], result: tuple | None, inputs: dict[str, Any]) -> None:
        layout = result[2] if result is not None else self._issued_layout(inputs)
        if layout is not None and self.decoder is not None and final.get("input_ids") is not None:
            self._announce(final, layout)

    def begin_session(self, kwargs: dict[str, Any], result: tuple | None) -> None:
        """generate hands the kept features to every forward it makes through mm_encoder_outputs; the
        pre-hook recognises them (by identity) to announce the visual groups of the prefill."""
        if result is not None:
            layout = result[2]
            self._issued = {id(feats[0]): layout for feats in layout.features.values() if feats}

    def end_session(self) -> None:
        self._issued = {}

    # -- handle interface -------------------------------------------------------------------------------
    @property
    def record(self) -> EncoderPassRecord:
        """``kept_indices`` ``(num_items, max kept)``: kept merge units of every image, then every video, on
        its merged grid (ascending, rows padded with -1); ``num_patches``: the most merge units of an item."""
        items = self.pass_record.items
        if not items:
            return EncoderPassRecord()
        width = max(len(it.kept_units) for it in items)
        rows = [
            torch.cat([it.kept_units, it.kept_units.new_full((width - len(it.kept_units),), -1)])
            for it in items
        ]
        return EncoderPassRecord(
            kept_indices=torch.stack(rows),
            tokens_per_layer=list(self.pass_record.tokens_per_layer),
            num_patches=max(it.num_units for it in items),
        )


class QwenAdapter(ModelAdapter):
    """Qwen2-VL and Qwen2.5-VL, images and videos. Methods whose vision selector keeps whole 2x2 merge units
    and that have a language-model stage after it (FlowCut), and the language-model-only methods."""

    name = "qwen2_vl"
    title = "Qwen2-VL / Qwen2.5-VL"
    classes = SUPPORTED_QWEN
    options = (VIDEO_BUDGET,)
    refuses = {
        "feature_layer": "feeds its merger from the last block (no feature layer to choose); do not pass it"
    }
    ratio_keep = True
    auto_keep = True

    def why_not(self, spec: MethodSpec) -> tuple[type[Exception], str] | None:
        if spec.make_selector is None or (spec.merge_units and spec.make_second_stage is not None):
            return None
        return ValueError, (
            "prunes single vision tokens and is not supported on Qwen2-VL / Qwen2.5-VL (the patch merger needs "
            "whole 2x2 merge units, and a language-model stage must bring each group to K)"
        )

    def check_options(self, spec: MethodSpec, options: dict[str, Any]) -> None:
        budget = options.get("video_budget")
        if budget is not None and budget not in VIDEO_BUDGETS:
            raise ValueError(f"video_budget must be one of {VIDEO_BUDGETS}, got {budget!r}")

    def attach(
        self, model: nn.Module, spec: MethodSpec, config: Any, options: dict[str, Any]
    ) -> QwenAttachment:
        if spec.make_selector is None:  # language-model only: the tower keeps everything
            make_encoder = None
            make_llm = lambda k: spec.make_llm_selector(config, k)  # noqa: E731
        else:  # FlowCut: 2K per group in the tower, K in the decoder
            make_encoder = lambda k: spec.make_selector(config, k)  # noqa: E731
            make_llm = lambda k: spec.make_second_stage(config, k)  # noqa: E731
        budget = options.get("video_budget") or "per_frame"
        if config.keep == "auto":  # counts from FlowCut's mass in the tower; the bound caps every group
            bound = UNBOUNDED_KEEP if config.max_keep is None else config.max_keep
            return QwenAttachment(model, bound, make_encoder, None, video_budget=budget, auto=True)
        return QwenAttachment(model, config.keep, make_encoder, make_llm, video_budget=budget)

    def parts(self, model: nn.Module) -> ModelParts | None:
        from transformers import Qwen2VLForConditionalGeneration

        if not isinstance(model, Qwen2VLForConditionalGeneration):
            return None
        inner = model.model
        llm = inner.language_model
        visual = inner.visual
        return ModelParts(
            visual,
            list(visual.blocks),
            llm,
            list(llm.layers),
            image_token_id(model.config),
            packed_vision=True,
        )


register_adapter(QwenAdapter())
