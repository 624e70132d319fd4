"""Record the information flow of a vision tower and every pruning decision (paper section 2, Figs. 2-8).

:func:`analyze_tower` runs one unpruned forward of a supported tower (CLIP, SigLIP, DINOv2; see
:func:`vlmcut.models.vit.tower_spec`) with full attention maps and per-layer ``q, k, v``, turns them into
the section-2 measurements with the pure functions of :mod:`vlmcut.analysis.metrics`, then runs one
forward per pruning method through :func:`vlmcut.prune` to record the kept indices and the value norms
of the tokens that survive at every layer. Everything is returned in an :class:`AnalysisResult` of CPU
tensors (float64 / int64); no figure is drawn here (see :mod:`vlmcut.analysis.report`).

How the model is touched, and how it is restored:

* Full ``T x T`` attention maps need the eager kernel: the tower is switched to ``"eager"`` with
  ``PreTrainedModel.set_attn_implementation`` (transformers 5.x) for the unpruned pass only, and every
  config's ``_attn_implementation_internal`` is put back to its saved value in a ``finally`` block, even
  when the forward raises.
* ``q, k, v`` come from temporary forward hooks on ``q_proj`` / ``k_proj`` / ``v_proj`` of every attention
  module; the hooks are removed in ``finally`` blocks as well. Pruned passes use the tower's own attention
  implementation and :func:`vlmcut.prune`'s handle, which is removed afterwards.

Global token: the CLS token where the tower has one; otherwise (SigLIP) the mean token, exactly as
FlowCut scores it (SPEC "No CLS"). The global attention row, the semantic relevance and the value norms are
FlowCut's own score functions (:mod:`vlmcut.methods.flowcut`), so the numbers here are the quantities the
pruner sees. Deterministic: no randomness except the ``random`` method, which is seeded by its config.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from vlmcut.analysis.metrics import (
    CLS_INDEX,
    CriteriaDisagreement,
    attention_entropy_ratio,
    criteria_disagreement,
    hub_tokens,
    information_flow,
    mean_attention_distance,
    topk_overlap,
)
from vlmcut.api import available_methods, prune
from vlmcut.methods.flowcut import (
    attention_strength,
    global_query_value,
    information_density,
    semantic_relevance,
)
from vlmcut.models.vit import TowerSpec, consumed_layer, tower_spec

__all__ = [
    "HUB_TOP",
    "AnalysisResult",
    "analyze_tower",
    "eager_attention",
    "pristine_hooks",
    "qkv_recorder",
]

# How many hub tokens (most-voted patch keys) are kept per layer, and the k of the CLS/hub overlap.
HUB_TOP = 5
_PROJ = ("q_proj", "k_proj", "v_proj")


@dataclass(frozen=True)
class AnalysisResult:
    """Everything :func:`analyze_tower` measured. ``B`` images, ``L`` encoder layers, ``N`` patches.

    Per-layer quantities are measured on the *input tokens of layer l* seen by its attention (its own
    ``q, k, v`` and attention map), i.e. exactly what FlowCut scores at that layer.
    """

    family: str  # "clip" / "siglip" / "dinov2"
    has_cls: bool
    grid_hw: tuple[int, int]
    num_heads: int
    keep: int
    feature_layer: int  # hidden_states index the consumer reads
    consume_layer: int  # F: first layer that runs on the kept tokens (0-based)
    attn_implementation: str  # the tower's own implementation (restored after the eager pass)
    # --- Fig. 3 (middle) / FlowCut's h: entropy ratio of the global token's attention over the patches
    entropy_ratio: Tensor  # (B, L) float64 in [0, 1]
    # --- Fig. 3 (left): patch -> most-attended patch distance, in patch units
    attn_distance: Tensor  # (B, L) float64, argmax over patch keys (paper)
    attn_distance_weighted: Tensor  # (B, L) float64, attention-weighted (ViT "mean attention distance")
    # --- Fig. 2 (left): argmax flow maps of the head-averaged attention (CLS_INDEX = -1 for the CLS token)
    inflow: Tensor  # (B, L, N) int64: primary source of each patch
    outflow: Tensor  # (B, L, N) int64: primary destination of each patch
    cls_inflow: Tensor | None  # (B, L) int64: primary source of the CLS query (None without CLS)
    cls_outflow: Tensor | None  # (B, L) int64: primary destination of the CLS key
    # --- Fig. 2 (right) / Insight 2: hub tokens and how the global token's focus relates to them
    global_attention: Tensor  # (B, L, N) float64: global token's attention row over the patches (a)
    global_focus: Tensor  # (B, L) int64: argmax of global_attention (the patch the global token reads most)
    hub_indices: Tensor  # (B, L, HUB_TOP) int64: patches most patch queries attend to most, most voted first
    hub_votes: Tensor  # (B, L, HUB_TOP) int64
    hub_share: Tensor  # (B, L) float64: votes of the top hub / N
    focus_is_top_hub: Tensor  # (B, L) float64 (0/1): global focus == top hub
    global_hub_overlap: Tensor  # (B, L) float64: |top-5 global attention ∩ top-5 hub votes| / 5
    patch_mirror_global: Tensor  # (B, L) float64: fraction of patches whose top patch key = global focus
    patch_to_cls: Tensor | None  # (B, L) float64: fraction of patches whose primary source is the CLS token
    # --- Fig. 4: the three criteria and their agreement on the top-k patches
    semantic: Tensor  # (B, L, N) float64: semantic relevance s
    value_norm: Tensor  # (B, L, N) float64: information density n (value L1 norm), unpruned
    criteria: CriteriaDisagreement  # overlap / spearman / kendall: (B, L, 3, 3), k = min(keep, N)
    # --- DINOv2 artifacts: L2 norm of every patch token at each layer's output
    hidden_norm: Tensor  # (B, L, N) float64
    # --- Figs. 6-8: one pruned forward per method
    kept: dict[str, Tensor] = field(default_factory=dict)  # method -> (B, K) int64 kept patch indices
    tokens_per_layer: dict[str, list[int]] = field(default_factory=dict)  # method -> patches after layer l
    # method -> L x (B, N_l); NaN past an image's own count (FlowCut's counts differ per image)
    pruned_value_norm: dict[str, list[Tensor]] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return int(self.entropy_ratio.shape[1])

    @property
    def num_patches(self) -> int:
        return self.grid_hw[0] * self.grid_hw[1]

    @property
    def batch(self) -> int:
        return int(self.entropy_ratio.shape[0])


# --------------------------------------------------------------------------------------------- plumbing
def _configs(module: nn.Module) -> list[Any]:
    """Every distinct ``PretrainedConfig`` reachable from the module tree (the tower shares one)."""
    seen: dict[int, Any] = {}
    for m in module.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation_internal"):
            seen.setdefault(id(cfg), cfg)
            for key in getattr(cfg, "sub_configs", {}) or {}:
                sub = getattr(cfg, key, None)
                if sub is not None and hasattr(sub, "_attn_implementation_internal"):
                    seen.setdefault(id(sub), sub)
    return list(seen.values())


@contextmanager
def eager_attention(tower: nn.Module) -> Iterator[None]:
    """Run the body with the tower on the eager attention kernel; restore every config afterwards.

    ``output_attentions=True`` only returns the full ``(B, H, T, T)`` maps with the eager kernel. The saved
    ``_attn_implementation_internal`` of every config in the tree is written back in ``finally``.
    """
    saved = [(cfg, cfg._attn_implementation_internal) for cfg in _configs(tower)]
    original = tower.config._attn_implementation
    try:
        if original != "eager":
            tower.set_attn_implementation("eager")
        yield
    finally:
        try:
            if tower.config._attn_implementation != original and isinstance(original, str):
                tower.set_attn_implementation(original)
        finally:
            for cfg, value in saved:
                cfg._attn_implementation_internal = value


@contextmanager
def qkv_recorder(spec: TowerSpec, names: Sequence[str] = _PROJ) -> Iterator[list[dict[str, Tensor]]]:
    """Temporary forward hooks on each layer's ``q_proj`` / ``k_proj`` / ``v_proj``.

    Yields a list with one dict per layer, filled during the forward with ``{name: (B, H, T, d)}`` (the
    projection output split into heads). All hooks are removed on exit, also on error.
    """
    store: list[dict[str, Tensor]] = [{} for _ in spec.attentions]
    handles: list[RemovableHandle] = []
    heads, head_dim = spec.num_heads, spec.head_dim

    def make(i: int, name: str) -> Any:
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            b, t, _ = output.shape
            store[i][name] = output.detach().view(b, t, heads, head_dim).transpose(1, 2)

        return hook

    try:
        for i, attn in enumerate(spec.attentions):
            for name in names:
                handles.append(getattr(attn, name).register_forward_hook(make(i, name)))
        yield store
    finally:
        for h in handles:
            h.remove()


_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
)
_CAPTURE_FLAG = "_output_capturing_hooks_installed"


@contextmanager
def pristine_hooks(module: nn.Module) -> Iterator[None]:
    """Remove, on exit, every forward (pre-)hook added to the module tree inside the body.

    transformers 5.x installs permanent, inactive output-capturing hooks the first time a model is called
    with ``output_attentions`` / ``output_hidden_states`` and marks the model with
    ``_output_capturing_hooks_installed``. Both the hooks and the mark are undone, so the tower leaves the
    analysis exactly as it came (hooks that were already there are kept).
    """
    missing = object()
    saved = [
        (m, {name: set(getattr(m, name, {})) for name in _HOOK_DICTS}, getattr(m, _CAPTURE_FLAG, missing))
        for m in module.modules()
    ]
    try:
        yield
    finally:
        for m, keys, flag in saved:
            for name, before in keys.items():
                hooks = getattr(m, name, None)
                if hooks is None:
                    continue
                for key in [k for k in hooks if k not in before]:
                    del hooks[key]
            if flag is missing:
                if _CAPTURE_FLAG in m.__dict__:
                    delattr(m, _CAPTURE_FLAG)
            else:
                setattr(m, _CAPTURE_FLAG, flag)


def _grid_hw(tower: nn.Module, pixel_values: Tensor, n_patch: int) -> tuple[int, int]:
    patch = getattr(tower.config, "patch_size", None)
    if isinstance(patch, int) and patch > 0:
        h, w = pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch
        if h * w == n_patch:
            return h, w
    side = math.isqrt(n_patch)
    if side * side != n_patch:
        raise ValueError(f"cannot lay {n_patch} patch tokens on a grid; pass square images")
    return side, side


def _check_pixels(pixel_values: Tensor) -> None:
    if not isinstance(pixel_values, Tensor) or pixel_values.ndim != 4:
        raise ValueError(
            f"pixel_values must be a (B, C, H, W) tensor, got {getattr(pixel_values, 'shape', None)}"
        )


def _tower_dtype(tower: nn.Module) -> torch.dtype:
    for p in tower.parameters():
        return p.dtype
    return torch.float32


# ------------------------------------------------------------------------------------------- analysis
def _unpruned_pass(
    tower: nn.Module, spec: TowerSpec, pixel_values: Tensor
) -> tuple[list[Tensor], list[dict[str, Tensor]], list[Tensor]]:
    """One eager forward. -> (attentions L x (B, H, T, T), qkv L x {name: (B, H, T, d)}, hidden L x (B, T, D))."""
    with pristine_hooks(tower), eager_attention(tower), qkv_recorder(spec) as qkv, torch.no_grad():
        out = tower(pixel_values=pixel_values, output_attentions=True, output_hidden_states=True)
    attentions = list(out.attentions or ())
    hidden = list(out.hidden_states or ())[1:]
    if len(attentions) != spec.num_layers or len(hidden) != spec.num_layers:
        raise RuntimeError(
            f"the tower returned {len(attentions)} attention maps and {len(hidden)} hidden states for "
            f"{spec.num_layers} layers; output_attentions needs the eager kernel"
        )
    if any(len(d) != len(_PROJ) for d in qkv):
        raise RuntimeError("a layer did not call its q_proj / k_proj / v_proj; unsupported attention module")
    return attentions, qkv, hidden


def _pruned_pass(
    tower: nn.Module, spec: TowerSpec, pixel_values: Tensor, method: str, keep: int, feature_layer: int
) -> tuple[Tensor, list[int], list[Tensor]]:
    """One forward per image under ``vlmcut.prune`` (counts differ per image). -> (kept (B, K), tokens per
    layer (the most any image has), L x (B, N_l) value norms, NaN past an image's own count)."""
    rows, schedules, per_image = [], [], []
    with prune(tower, method, keep=keep, feature_layer=feature_layer) as handle:
        for b in range(pixel_values.shape[0]):
            with qkv_recorder(spec, ("v_proj",)) as vals, torch.no_grad():
                tower(pixel_values=pixel_values[b : b + 1])
            norms = [information_density(d["v_proj"].to(torch.float64), spec.has_cls).cpu()[0] for d in vals]
            kept = handle.kept_indices
            if kept is None:  # keep >= N is the identity: every patch survives
                kept = torch.arange(norms[0].shape[-1])[None]
            rows.append(kept.detach().cpu().to(torch.int64))
            schedules.append(handle.tokens_per_layer)
            per_image.append(norms)
    stacked = []
    for layer in zip(*per_image, strict=True):
        width = max(v.shape[-1] for v in layer)
        stacked.append(
            torch.stack([torch.nn.functional.pad(v, (0, width - v.shape[-1]), value=math.nan) for v in layer])
        )
    tokens = [max(counts) for counts in zip(*schedules, strict=True)]
    return torch.cat(rows), tokens, stacked


def analyze_tower(
    tower: nn.Module,
    pixel_values: Tensor,
    *,
    keep: int = 64,
    methods: Sequence[str] = ("flowcut", "random", "grid"),
    feature_layer: int = -1,
) -> AnalysisResult:
    """Measure the information flow of ``tower`` on ``pixel_values`` and each method's pruning decisions.

    Args:
        tower: a supported bare vision tower (``CLIPVisionModel``, ``SiglipVisionModel``, ``Dinov2Model``;
            for LLaVA pass ``model.model.vision_tower``).
        pixel_values: ``(B, 3, H, W)`` preprocessed images (cast to the tower's dtype and device).
        keep: patch tokens each method keeps (``K``); the criteria top-k uses ``min(keep, N)``.
        methods: names from :func:`vlmcut.api.available_methods`, each run once through
            :func:`vlmcut.prune` with ``feature_layer``.
        feature_layer: the ``hidden_states`` index the consumer reads (LLaVA: ``vision_feature_layer``).

    Returns:
        An :class:`AnalysisResult`; the tower's attention implementation, hooks and weights are as before.
    """
    _check_pixels(pixel_values)
    spec = tower_spec(tower)
    unknown = [m for m in methods if m not in available_methods()]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; available: {available_methods()}")
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"keep must be a positive int, got {keep!r}")
    consume = consumed_layer(feature_layer, spec.num_layers)
    original_impl = str(tower.config._attn_implementation)
    device = next(tower.parameters()).device
    pixels = pixel_values.to(device=device, dtype=_tower_dtype(tower))

    attentions, qkv, hidden = _unpruned_pass(tower, spec, pixels)
    off = int(spec.has_cls)
    n = hidden[0].shape[1] - off
    grid = _grid_hw(tower, pixels, n)

    # Head-averaged attention maps, per layer: (B, L, T, T).
    attn = torch.stack([a.detach().to(torch.float64).mean(1).cpu() for a in attentions], dim=1)
    a_rows, s_rows, n_rows = [], [], []
    for i, d in enumerate(qkv):
        q, k, v = (d[name].to(torch.float64).cpu() for name in _PROJ)
        q_g, v_g = global_query_value(q, v, spec.has_cls)
        a_rows.append(attention_strength(q_g, k, spec.scales[i], spec.has_cls))  # (B, N)
        s_rows.append(semantic_relevance(v_g, v, spec.has_cls, "code"))
        n_rows.append(information_density(v, spec.has_cls))
    a_row = torch.stack(a_rows, 1)  # (B, L, N)
    s_row = torch.stack(s_rows, 1)
    n_row = torch.stack(n_rows, 1)

    flows = information_flow(attn, spec.has_cls, grid_hw=grid)
    hubs = hub_tokens(attn, top=min(HUB_TOP, n), has_cls=spec.has_cls)
    focus = a_row.argmax(-1)  # (B, L)
    pp = attn[..., off:, off:]  # (B, L, N, N) patch queries x patch keys
    patch_top = pp.argmax(-1)  # (B, L, N)
    k_hub = min(HUB_TOP, n)
    votes_full = torch.zeros(patch_top.shape, dtype=torch.float64).scatter_add_(
        -1, patch_top, torch.ones_like(patch_top, dtype=torch.float64)
    )
    result = AnalysisResult(
        family=spec.family,
        has_cls=spec.has_cls,
        grid_hw=grid,
        num_heads=spec.num_heads,
        keep=keep,
        feature_layer=feature_layer,
        consume_layer=consume,
        attn_implementation=original_impl,
        entropy_ratio=attention_entropy_ratio(a_row),
        attn_distance=mean_attention_distance(attn, grid, spec.has_cls, mode="argmax"),
        attn_distance_weighted=mean_attention_distance(attn, grid, spec.has_cls, mode="weighted"),
        inflow=flows.inflow,
        outflow=flows.outflow,
        cls_inflow=flows.cls_inflow,
        cls_outflow=flows.cls_outflow,
        global_attention=a_row,
        global_focus=focus,
        hub_indices=hubs.indices,
        hub_votes=hubs.votes,
        hub_share=hubs.votes[..., 0].to(torch.float64) / n,
        focus_is_top_hub=(focus == hubs.indices[..., 0]).to(torch.float64),
        global_hub_overlap=topk_overlap(a_row, votes_full, k_hub),
        patch_mirror_global=(patch_top == focus[..., None]).to(torch.float64).mean(-1),
        patch_to_cls=(flows.inflow == CLS_INDEX).to(torch.float64).mean(-1) if spec.has_cls else None,
        semantic=s_row,
        value_norm=n_row,
        criteria=criteria_disagreement(a_row, s_row, n_row, k=min(keep, n)),
        hidden_norm=torch.stack(
            [h.detach()[:, off:].to(torch.float64).norm(dim=-1).cpu() for h in hidden], 1
        ),
    )
    for method in methods:
        kept, tokens, norms = _pruned_pass(tower, spec, pixels, method, keep, feature_layer)
        result.kept[method] = kept
        result.tokens_per_layer[method] = tokens
        result.pruned_value_norm[method] = norms
    return result
