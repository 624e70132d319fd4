"""LLaVA-NeXT (``LlavaNextForConditionalGeneration`` / ``LlavaNextModel``, "anyres"): the vision stage and
the layout, wired on one instance.

LLaVA-NeXT cuts an image into crops: a base crop (the whole image at the tower's resolution) and a grid of
tiles of the best-fitting resolution. The tower sees all crops of all images as one batch. Unpruned, the
model lays the features out as: the base crop's patches, then the tile grid as one spatial map, *unpadded*
back to the image's aspect ratio (rows or columns that only show the processor's padding are cut), read
row by row with an ``image_newline`` token at the end of every row.

What this module does:

* **Vision stage.** An :class:`EncoderPruner` on the tower prunes every crop (base and tiles alike) to a
  per-crop budget (see :meth:`LlavaNextAttachment.crop_budgets`): ``keep_crop = K // 2`` for two-stage
  methods (SPEC "Two-stage pruning"; the language-model stage then keeps ``K``), or ``K`` shared out over
  the image's crops for single-stage methods.
* **Layout.** The survivors go back where the unpruned model would put them: the unpruned sequence of
  ``(crop, patch)`` origins is built with transformers' own grid-shape and ``unpad_image`` helpers, and
  the pruned sequence is that sequence with the dropped patch tokens deleted. So the base crop's kept
  patches come first in raster order, then the kept tile patches row by row on the unpadded map, and
  **every** row of the unpadded map keeps its ``image_newline`` (also a row whose patches were all
  dropped: the language model still sees how many rows the image has). Kept patches in the unpadded-away
  area are dropped, exactly as unpruned.
* **Placeholders.** How many features an image gets depends on which patches survive (unpadding), so the
  forward pre-hook runs the vision stage itself, packs the features, cuts every image's placeholder
  block to that exact count (the first ones are kept; they are all the same token), and hands the packed
  features to the model through ``mm_encoder_outputs`` (``pixel_values`` are taken out, so the model does
  not encode twice). Positions stay contiguous, as in :mod:`vlmcut.models.llava`. ``generate`` is
  wrapped on the instance: it encodes once, compacts the prompt, and returns the caller's ``input_ids``
  in front of the new tokens.
* **For the language-model stage**, every forward that carries images publishes
  :attr:`LlavaNextAttachment.visual_positions` (:class:`VisualPositions`) before the language model
  runs, and, when an ``llm_stage`` is attached, calls its ``begin(**positions.decoder_inputs(...))``.
  Newline tokens are **not prunable**: they are layout, not image content; ``K`` counts patch tokens
  (the paper's "160 of 2880" counts 5 x 576 patches, no newlines).

Counting rules (``K`` = ``keep``; "content" = patch tokens, newlines excluded):

* two-stage methods: every crop keeps ``keep_crop`` patches (default ``max(1, K // 2)``); the language-model
  stage's target is ``min(K, content)`` per image;
* single-stage methods: image ``i`` with ``n_i`` crops gives crop ``c`` the budget
  ``K // n_i + (c < K % n_i)`` (the base crop first gets the remainder), so the budgets sum to exactly
  ``K``; the content that reaches the language model is ``K`` minus the kept patches that fall in the
  unpadded-away area (0 for images that need no unpadding). The tower runs once per distinct budget;
* a method without a vision selector (language-model only) keeps every crop whole; target ``min(K, content)``;
* any budget is capped at the crop's patch count, so ``K >= every patch`` is the exact identity.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from ..methods.base import MethodSpec, VisionSelector
from .base import VLMAttachment
from .llm import DecoderPruner
from .prompt import check_feature_options, compact_prompt, last_prompt_index, unchanged_hint
from .registry import ModelAdapter, ModelParts, register_adapter, tower_parts
from .vit import EncoderPassRecord, EncoderPruner, consumed_layer, tower_spec


def llava_next_parts(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """``(outer, inner)`` for a LLaVA-NeXT model: the module whose ``forward`` takes the prompt, and the
    ``LlavaNextModel`` holding ``vision_tower``; ``None`` if ``model`` is not a LLaVA-NeXT."""
    from transformers import LlavaNextForConditionalGeneration, LlavaNextModel

    if isinstance(model, LlavaNextForConditionalGeneration):
        return model, model.model
    if isinstance(model, LlavaNextModel):
        return model, model
    return None


class LLMStage(Protocol):
    """What the language-model stage offers the attachment (``vlmcut.models.llm.DecoderPruner``)."""

    def begin(
        self, visual: torch.Tensor, valid: torch.Tensor, query_index: torch.Tensor, image_index: torch.Tensor
    ) -> None: ...

    def remove(self) -> None: ...


# ------------------------------------------------------------------------------------------------------
# Pure layout functions
# ------------------------------------------------------------------------------------------------------

NEWLINE = -1  # origin code of an image_newline token


def unpruned_origins(
    image_size: tuple[int, int], num_crops: int, grid_shape: tuple[int, int], side: int
) -> torch.Tensor:
    """The unpruned LLaVA-NeXT sequence of one image as origin codes ``crop * side**2 + patch``.

    ``image_size``: the original ``(height, width)``; ``num_crops``: base + tiles; ``grid_shape``: tiles
    ``(rows, cols)``; ``side``: patches per crop side. Returns ``(L,)`` long, ``NEWLINE`` for a newline:
    the base crop's patches, then the tile map unpadded with transformers' ``unpad_image`` and read row by
    row, a newline after each row. A single crop (no tiles) is followed by one newline, as upstream.
    """
    from transformers.models.llava_next.modeling_llava_next import unpad_image

    n = side * side
    base = torch.arange(n)
    if num_crops == 1:
        return torch.cat([base, torch.tensor([NEWLINE])])
    rows, cols = grid_shape
    if rows * cols != num_crops - 1:
        raise ValueError(
            f"image of size {tuple(image_size)} has {num_crops - 1} tiles but its anyres grid is {rows} x {cols}; "
            f"pixel_values and image_sizes do not belong together"
        )
    tiles = torch.arange(n, num_crops * n).view(rows, cols, side, side)
    canvas = tiles.permute(0, 2, 1, 3).reshape(1, rows * side, cols * side)  # (1, H, W) spatial map
    canvas = unpad_image(canvas, list(image_size))[0]  # (H', W')
    with_newline = torch.cat([canvas, canvas.new_full((canvas.shape[0], 1), NEWLINE)], dim=1)
    return torch.cat([base, with_newline.flatten()])


def pruned_origins(full: torch.Tensor, kept: list[torch.Tensor], side: int) -> torch.Tensor:
    """``full`` (L,) origin codes with the patches not in ``kept`` deleted; newlines all stay.

    ``kept[c]``: the kept patch indices of crop ``c`` on its original grid.
    """
    n = side * side
    alive = torch.zeros(len(kept) * n, dtype=torch.bool)
    for c, idx in enumerate(kept):
        alive[c * n + idx.cpu()] = True
    is_newline = full == NEWLINE
    return full[is_newline | alive[full.clamp(min=0)]]


def pack_features(
    seq: torch.Tensor,
    crop_features: list[torch.Tensor],
    kept: list[torch.Tensor],
    newline: torch.Tensor,
    num_patches: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features in the order of ``seq`` (L,) origin codes, and the ``(L, 2)`` (crop, patch) origins.

    ``crop_features[c]``: ``(k_c, D)`` the kept features of crop ``c``, in the order of ``kept[c]`` (k_c,);
    ``newline``: ``(D,)``. A newline's origin is ``(-1, -1)``.
    """
    device = seq.device
    table = torch.cat([*crop_features, newline.view(1, -1)], dim=0)  # the newline is the last row
    row_of = torch.full((len(kept) * num_patches,), -1, dtype=torch.long, device=device)
    offset = 0
    for c, idx in enumerate(kept):
        row_of[c * num_patches + idx.to(device)] = torch.arange(offset, offset + len(idx), device=device)
        offset += len(idx)
    is_newline = seq == NEWLINE
    rows = torch.where(is_newline, torch.full_like(seq, table.shape[0] - 1), row_of[seq.clamp(min=0)])
    origin = torch.stack([seq // num_patches, seq % num_patches], dim=1)
    origin[is_newline] = NEWLINE
    return table[rows], origin


def crop_budgets(crops_per_image: list[int], keep: int, keep_crop: int | None, num_patches: int) -> list[int]:
    """Patch tokens each crop keeps, in tower-batch order (image by image, base crop first).

    ``keep_crop`` given: every crop keeps it. Otherwise ``keep`` is shared out over each image's crops:
    ``keep // n + 1`` for the first ``keep % n`` crops, ``keep // n`` for the others. Capped at
    ``num_patches``.
    """
    out: list[int] = []
    for n in crops_per_image:
        if keep_crop is not None:
            out += [keep_crop] * n
        else:
            q, r = divmod(keep, n)
            out += [q + 1] * r + [q] * (n - r)
    return [min(b, num_patches) for b in out]


def block_drop_mask(
    input_ids: torch.Tensor, image_token_id: int, per_image: list[int], kept: list[int]
) -> torch.Tensor:
    """Which placeholders to drop: image ``i``'s block of ``per_image[i]`` keeps its first ``kept[i]``.

    input_ids: ``(B, L)`` -> bool ``(B, L)``. Images are numbered row by row (the order in which the model
    scatters features into the placeholders); a row must hold whole blocks.
    """
    is_img = input_ids == image_token_id
    device = input_ids.device
    ends = torch.tensor(per_image, device=device).cumsum(0)
    row_ends = is_img.sum(dim=1).cumsum(0)
    if int(row_ends[-1]) != int(ends[-1]) or not bool(torch.isin(row_ends[row_ends > 0], ends).all()):
        raise ValueError(
            f"input_ids hold {is_img.sum(dim=1).tolist()} image placeholders per row; the images need "
            f"{per_image} (in order, whole blocks per row). Pass the processor's output unchanged."
        )
    ordinal = is_img.flatten().long().cumsum(0) - 1  # (B * L,) placeholder number, row-major
    image = torch.bucketize(ordinal.clamp(min=0), ends, right=True).clamp(max=len(per_image) - 1)
    start = ends - torch.tensor(per_image, device=device)
    local = ordinal - start[image]
    keep_n = torch.tensor(kept, device=device)[image]
    return (is_img.flatten() & (local >= keep_n)).view_as(input_ids)


# ------------------------------------------------------------------------------------------------------
# Records
# ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageLayout:
    """One image's packed visual features after the vision stage.

    ``origin`` row ``j`` says where feature ``j`` came from: ``(crop, patch)`` with crop 0 the base image and
    ``patch`` the index on that crop's original ``side x side`` grid, or ``(-1, -1)`` for a newline.
    """

    features: torch.Tensor  # (L, D) what the image's placeholders receive
    origin: torch.Tensor  # (L, 2) long
    unpruned_length: int  # placeholders the processor wrote for this image

    @property
    def length(self) -> int:
        return int(self.features.shape[0])

    @property
    def is_newline(self) -> torch.Tensor:
        return self.origin[:, 0] == NEWLINE

    @property
    def num_content(self) -> int:
        return int((~self.is_newline).sum())


@dataclass
class NextPassRecord:
    """What the last vision stage did, crop by crop (tower-batch order: image by image, base crop first)."""

    crop_image: torch.Tensor | None = None  # (num_crops_total,) image index of every crop
    budgets: list[int] = field(default_factory=list)  # patch tokens each crop was asked to keep
    kept_per_crop: list[torch.Tensor] = field(default_factory=list)  # ascending indices on the crop grid
    images: list[ImageLayout] = field(default_factory=list)
    tokens_per_layer: list[int] = field(default_factory=list)

    @property
    def origins(self) -> list[torch.Tensor]:
        """Per image: ``(L_i, 2)`` (crop, patch) of every packed position, ``(-1, -1)`` for a newline."""
        return [im.origin for im in self.images]


@dataclass(frozen=True)
class VisualPositions:
    """The visual positions of one forward's (compacted) prompt, for the language-model stage.

    All ``(B, L)`` over the prompt the language model receives. Newline tokens are visual but not
    prunable; the language-model stage treats them like text.
    """

    visual: torch.Tensor  # bool: every image placeholder (patch or newline)
    prunable: torch.Tensor  # bool: patch tokens the language-model stage may drop (newlines excluded)
    image_index: torch.Tensor  # long: global image index of each visual position, -1 elsewhere
    origin: torch.Tensor  # (B, L, 2) long: (crop, patch) of each visual position; -1 elsewhere / newline
    valid: torch.Tensor  # bool: real tokens (the attention mask; all True without one)
    target: torch.Tensor  # (num_images,) long: patch tokens each image keeps after the language-model stage

    def row_image_index(self) -> torch.Tensor:
        """``(B, L)``: the image's index *within its row* (0, 1, ...) at prunable positions, -1 elsewhere."""
        first = torch.where(self.visual, self.image_index, torch.full_like(self.image_index, 2**62))
        first = first.min(dim=1, keepdim=True).values
        return torch.where(self.prunable, self.image_index - first, torch.full_like(self.image_index, -1))

    def decoder_inputs(self, prompt_len: int | None = None) -> dict[str, torch.Tensor]:
        """Keyword arguments for ``DecoderPruner.begin``: ``visual`` = the *prunable* positions, ``valid``,
        ``query_index`` (the last prompt token of each row; ``prompt_len``: columns that belong to the
        prompt when generation without a cache re-feeds prompt + new tokens) and ``image_index`` (per row)."""
        return {
            "visual": self.prunable,
            "valid": self.valid,
            "query_index": last_prompt_index(self.valid, prompt_len),
            "image_index": self.row_image_index(),
        }


# ------------------------------------------------------------------------------------------------------
# Attachment
# ------------------------------------------------------------------------------------------------------


class LlavaNextAttachment(VLMAttachment):
    """Vision-stage pruning and layout on a LLaVA-NeXT instance (see the module docstring).

    Args:
        model: ``LlavaNextForConditionalGeneration`` or ``LlavaNextModel``.
        make_selector: encoder selector for a patch budget (``None``: no vision-stage pruning).
        keep: ``K``, patch tokens per image that the language model keeps in the end.
        two_stage: the method prunes again inside the language model (FlowCut): crops keep ``keep_crop``.
        keep_crop: patches every crop keeps in the tower; default ``max(1, K // 2)`` for two-stage methods
            (SPEC), ``None`` (share ``K`` out over each image's crops) otherwise.
        make_llm_stage: builds the language-model stage on ``inner.language_model``; its ``begin`` gets
            :meth:`VisualPositions.decoder_inputs` before every prefill that carries images.
    """

    title = "LLaVA-NeXT"

    def __init__(
        self,
        model: nn.Module,
        make_selector: Callable[[int], VisionSelector | None],
        keep: int,
        *,
        two_stage: bool = False,
        keep_crop: int | None = None,
        make_llm_stage: Callable[[nn.Module], LLMStage | None] | None = None,
    ) -> None:
        super().__init__(model, llava_next_parts(model))
        cfg = self.config
        spec = tower_spec(self.inner.vision_tower)
        strategy = cfg.vision_feature_select_strategy
        if (strategy == "default") != spec.has_cls:
            raise ValueError(
                f"vision_feature_select_strategy={strategy!r} with a {spec.family} tower "
                f"({'with' if spec.has_cls else 'without'} a CLS token) does not give one feature per patch; "
                f"LLaVA-NeXT pruning supports 'default' with a CLS tower or 'full' without one"
            )
        if not isinstance(cfg.image_grid_pinpoints, list):
            raise ValueError("config.image_grid_pinpoints must be a list of (height, width) resolutions")
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep must be an int >= 1, got {keep!r}")
        if keep_crop is None and two_stage:
            keep_crop = max(1, keep // 2)  # SPEC "Two-stage pruning": K/2 per crop in the tower
        if keep_crop is not None and (
            isinstance(keep_crop, bool) or not isinstance(keep_crop, int) or keep_crop < 1
        ):
            raise ValueError(f"keep_crop must be an int >= 1, got {keep_crop!r}")
        self.keep = keep
        self.two_stage = two_stage
        self.keep_crop = keep_crop
        self.tile = int(cfg.vision_config.image_size)
        self.side = self.tile // int(cfg.vision_config.patch_size)
        self.num_patches = self.side * self.side
        self.drop_cls = strategy == "default"
        self.strategy = strategy
        self.feature_layer = cfg.vision_feature_layer
        self.image_token_id = int(cfg.image_token_id)
        self.pass_record = NextPassRecord()
        self._kept_matrix: torch.Tensor | None = None
        self.visual_positions: VisualPositions | None = None
        self._issued: dict[int, ImageLayout] = {}  # id(features) -> layout, while generate runs

        self._make_selector = make_selector
        self._selectors: dict[int, VisionSelector] = {}
        try:
            first = self._selector(min(keep_crop or keep, self.num_patches))
            consume = consumed_layer(cfg.vision_feature_layer, spec.num_layers)
            self.encoder = self.own(EncoderPruner(spec, first, consume)) if first is not None else None
            if make_llm_stage is not None:
                self.decoder = self.own(make_llm_stage(self.inner.language_model))
        except BaseException:
            self.remove()
            raise
        self.install()

    # -- budgets ---------------------------------------------------------------------------------------
    @property
    def prunes_in_llm(self) -> bool:
        """Whether a language-model stage is meant to bring every image to ``K`` patch tokens."""
        return self.two_stage or self.encoder is None

    def crop_budgets(self, crops_per_image: list[int]) -> list[int]:
        """Patch tokens each crop keeps in the tower (module docstring, "Counting rules")."""
        if self.encoder is None:
            return [self.num_patches] * sum(crops_per_image)
        return crop_budgets(crops_per_image, self.keep, self.keep_crop, self.num_patches)

    def _selector(self, budget: int) -> VisionSelector | None:
        if budget not in self._selectors:
            selector = self._make_selector(budget)
            if selector is None:
                return None
            self._selectors[budget] = selector
        return self._selectors[budget]

    # -- vision stage ------------------------------------------------------------------------------------
    def _tower_pass(
        self, pixel_values: torch.Tensor, budget: int
    ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """One tower pass over crops that all keep ``budget`` patches -> features (n, budget, D), kept (n, budget)."""
        if self.encoder is not None:
            self.encoder.selector = self._selector(budget)
        out = self.inner.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
        layer = self.feature_layer
        if isinstance(layer, int):
            hidden = out.hidden_states[layer]
        else:
            hidden = torch.cat([out.hidden_states[i] for i in layer], dim=-1)
        if self.drop_cls:
            hidden = hidden[:, 1:]
        feats = self.inner.multi_modal_projector(hidden)  # (n, kept, D)
        n = pixel_values.shape[0]
        if self.encoder is None or self.encoder.record.kept_indices is None:
            kept = torch.arange(feats.shape[1], device=feats.device).expand(n, -1)
            return feats, kept, []
        return feats, self.encoder.record.kept_indices, list(self.encoder.record.tokens_per_layer)

    def encode(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor | list) -> list[ImageLayout]:
        """Run the vision stage on the processor's ``pixel_values`` / ``image_sizes`` and pack every image.

        Updates :attr:`pass_record`. Returns one :class:`ImageLayout` per image.
        """
        from transformers.models.llava_next.modeling_llava_next import (
            get_anyres_image_grid_shape,
            image_size_to_num_patches,
        )

        if image_sizes is None:
            raise ValueError("LLaVA-NeXT needs image_sizes with pixel_values; pass the processor's output")
        sizes = [
            list(map(int, s)) for s in (image_sizes.tolist() if torch.is_tensor(image_sizes) else image_sizes)
        ]
        pinpoints = self.config.image_grid_pinpoints
        n_crops = [image_size_to_num_patches(s, pinpoints, self.tile) for s in sizes]
        if pixel_values.dim() == 5:
            pixel_values = torch.cat([pv[:n] for pv, n in zip(pixel_values, n_crops, strict=True)], dim=0)
        elif pixel_values.dim() != 4:
            raise ValueError(f"pixel_values of shape {tuple(pixel_values.shape)}; expected 4 or 5 dimensions")
        if pixel_values.shape[0] != sum(n_crops):
            raise ValueError(
                f"pixel_values hold {pixel_values.shape[0]} crops but image_sizes need {sum(n_crops)} "
                f"({n_crops} per image)"
            )
        budgets = self.crop_budgets(n_crops)
        total = len(budgets)
        feats: list[torch.Tensor | None] = [None] * total
        kept: list[torch.Tensor | None] = [None] * total
        tokens: list[list[int]] = []
        for budget in sorted(set(budgets), reverse=True):
            members = [c for c in range(total) if budgets[c] == budget]
            if budget == 0:  # keep < crops: this crop contributes nothing, so the tower can skip it
                continue
            batch = pixel_values if len(members) == total else pixel_values[members]
            f, k, t = self._tower_pass(batch, budget)
            tokens.append(t)
            for j, c in enumerate(members):
                feats[c], kept[c] = f[j], k[j]

        ref = next(f for f in feats if f is not None)
        empty_f, empty_k = (
            ref.new_zeros((0, ref.shape[-1])),
            torch.zeros(0, dtype=torch.long, device=ref.device),
        )
        feats = [f if f is not None else empty_f for f in feats]
        kept = [k if k is not None else empty_k for k in kept]
        newline = self.inner.image_newline.to(ref.device, ref.dtype)
        layouts: list[ImageLayout] = []
        start = 0
        for size, n in zip(sizes, n_crops, strict=True):
            crops = slice(start, start + n)
            start += n
            grid = get_anyres_image_grid_shape(size, pinpoints, self.tile) if n > 1 else (0, 0)
            full = unpruned_origins(tuple(size), n, grid, self.side)
            seq = pruned_origins(full, kept[crops], self.side).to(ref.device)
            features, origin = pack_features(seq, feats[crops], kept[crops], newline, self.num_patches)
            layouts.append(ImageLayout(features=features, origin=origin, unpruned_length=len(full)))

        width = max(budgets)
        kept_rows = [torch.cat([k, k.new_full((width - len(k),), -1)]) for k in kept]
        per_layer = [max(col) for col in zip(*tokens, strict=False)] if tokens and all(tokens) else []
        self.pass_record = NextPassRecord(
            crop_image=torch.repeat_interleave(torch.arange(len(n_crops)), torch.tensor(n_crops)),
            budgets=budgets,
            kept_per_crop=kept,
            # detached: the record must not keep a training step's graph alive
            images=[dataclasses.replace(im, features=im.features.detach()) for im in layouts],
            tokens_per_layer=per_layer,
        )
        self._kept_matrix = torch.stack(kept_rows)
        return layouts

    # -- prompt ----------------------------------------------------------------------------------------
    def compact_inputs(self, inputs: dict[str, Any]) -> tuple[dict[str, Any], int, list[ImageLayout]] | None:
        """The prompt with each image's placeholders cut to its packed length and the packed features in
        ``mm_encoder_outputs`` (``pixel_values`` / ``image_sizes`` removed); ``None`` without images."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        pixel_values = inputs.get("pixel_values")
        if pixel_values is None or pixel_values.shape[0] == 0:
            return None
        ids = self.prompt_ids(inputs)
        if inputs.get("mm_encoder_outputs"):
            raise ValueError("pass either pixel_values or mm_encoder_outputs, not both")
        check_feature_options(inputs, self.feature_layer, self.strategy)
        layouts = self.encode(pixel_values, inputs.get("image_sizes"))
        per_image = [im.unpruned_length for im in layouts]
        kept = [im.length for im in layouts]
        total = int((ids == self.image_token_id).sum())
        out = dict(inputs)
        new_len = ids.shape[1]
        if total == sum(per_image):
            if kept != per_image:
                drop = block_drop_mask(ids, self.image_token_id, per_image, kept)
                out, new_len = compact_prompt(inputs, drop, self.pad_token_id)
        else:  # generate's own forwards carry encoded features, never pixels with a cut prompt
            raise ValueError(
                f"input_ids hold {total} image placeholders for {len(layouts)} image(s); expected {per_image} "
                f"(as the processor expands them). {unchanged_hint()}"
            )
        out.pop("pixel_values", None)
        out.pop("image_sizes", None)
        out["mm_encoder_outputs"] = {
            "image": BaseModelOutputWithPooling(pooler_output=[im.features for im in layouts])
        }
        return out, new_len, layouts

    def _positions(self, inputs: dict[str, Any], layouts: list[ImageLayout]) -> VisualPositions:
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        visual = ids == self.image_token_id
        device = ids.device
        newline = torch.cat([im.is_newline for im in layouts]).to(device)
        image = torch.cat([torch.full((im.length,), i, dtype=torch.long) for i, im in enumerate(layouts)])
        origin = torch.cat([im.origin for im in layouts]).to(device)
        prunable = torch.zeros_like(visual)
        prunable[visual] = ~newline
        image_index = torch.full(ids.shape, -1, dtype=torch.long, device=device)
        image_index[visual] = image.to(device)
        origin_map = torch.full((*ids.shape, 2), -1, dtype=torch.long, device=device)
        origin_map[visual] = origin
        content = torch.tensor([im.num_content for im in layouts], device=device)
        target = content.clamp(max=self.keep) if self.prunes_in_llm else content
        valid = torch.ones_like(visual) if mask is None or mask.dim() != 2 else mask.bool()
        return VisualPositions(visual, prunable, image_index, origin_map, valid, target)

    def _issued_layouts(self, inputs: dict[str, Any]) -> list[ImageLayout] | None:
        """The layouts behind ``mm_encoder_outputs`` that this attachment packed (generate's prefill)."""
        mm = inputs.get("mm_encoder_outputs") or {}
        image = mm.get("image") if isinstance(mm, dict) else None
        pooled = getattr(image, "pooler_output", None)
        if not isinstance(pooled, (list, tuple)) or not pooled:
            return None
        found = [self._issued.get(id(t)) for t in pooled]
        if any(im is None or im.features is not t for im, t in zip(found, pooled, strict=True)):
            return None
        return found

    # -- hooks ----------------------------------------------------------------------------------------
    def forward_inputs(self, inputs: dict[str, Any]) -> dict[str, Any] | None:
        result = self.compact_inputs(inputs)
        if result is not None:
            final, _, layouts = result
        else:
            final, layouts = inputs, self._issued_layouts(inputs)
        ids = final.get("input_ids")
        if layouts is None or ids is None:
            self.visual_positions = None
            return None
        self.visual_positions = self._positions(final, layouts)
        if self.decoder is not None:
            self.decoder.begin(**self.visual_positions.decoder_inputs(self.prompt_len))
        return final if result is not None else None

    def begin_session(self, kwargs: dict[str, Any], result: tuple | None) -> None:
        """generate hands the packed features to every forward it makes through mm_encoder_outputs; the
        pre-hook recognises them (by identity) to announce the visual positions of the prefill."""
        if result is not None:
            self._issued = {id(im.features): im for im in result[2]}

    def end_session(self) -> None:
        self._issued = {}

    # -- handle interface -------------------------------------------------------------------------------
    @property
    def record(self) -> EncoderPassRecord:
        """The vision stage per crop: ``kept_indices`` ``(num_crops_total, keep_crop)`` on each crop's
        grid (rows padded with -1 where budgets differ), ``num_patches`` per crop."""
        rec = self.pass_record
        if rec.crop_image is None:
            return EncoderPassRecord(num_patches=self.num_patches)
        return EncoderPassRecord(
            kept_indices=self._kept_matrix,
            tokens_per_layer=list(rec.tokens_per_layer),
            num_patches=self.num_patches,
        )


class LlavaNextAdapter(ModelAdapter):
    """LLaVA-NeXT ("anyres" crops): every method. Two-stage methods (FlowCut) keep ``K // 2`` per crop in the
    tower and ``K`` per image in the language model (SPEC "Two-stage"); LLM-only methods keep every crop whole."""

    name = "llava_next"
    title = "LLaVA-NeXT"
    classes = ("LlavaNextForConditionalGeneration", "LlavaNextModel")

    def attach(
        self, model: nn.Module, spec: MethodSpec, config: Any, options: dict[str, Any]
    ) -> LlavaNextAttachment:
        if spec.make_selector is None:  # LLM-only methods: every crop whole, the decoder prunes to K
            make_encoder: Callable[[int], VisionSelector | None] = lambda k: None  # noqa: E731
            second = spec.make_llm_selector
        else:
            make_encoder = lambda k: spec.make_selector(config, k)  # noqa: E731
            second = spec.make_second_stage  # FlowCut: K/2 per crop, then K in the LLM (SPEC)
        return LlavaNextAttachment(
            model,
            make_encoder,
            config.keep,
            two_stage=spec.make_selector is not None and second is not None,
            make_llm_stage=(lambda lm: DecoderPruner(lm, second(config, config.keep))) if second else None,
        )

    def parts(self, model: nn.Module) -> ModelParts | None:
        from transformers import LlavaNextForConditionalGeneration

        if not isinstance(model, LlavaNextForConditionalGeneration):
            return None
        return tower_parts(model.model, model.model.vision_tower)


register_adapter(LlavaNextAdapter())
