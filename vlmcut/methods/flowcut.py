"""FlowCut: information-flow-aware visual token pruning (NeurIPS 2025).

Pure tensor functions and a small stateful selector; no model plumbing lives here. The model adapters in
`vlmcut.models` hand the selector each encoder layer's own projected ``q, k, v`` and apply the kept
indices it returns. Everything follows ``shared/SPEC.md``; where the paper and the authors' release
disagree, the default follows the release (the published numbers came from it) and the paper's variant
is an option.

Scores per layer (SPEC "Per-layer scores"), from ``q, k, v`` of shape ``(B, H, T, d)``:

* attention strength ``a``: the global token's softmax attention row over all ``T`` keys, patch columns,
  averaged over heads (Eq. 1-2);
* semantic relevance ``s``: softmax over all ``T`` of ``v_g . v_j`` (release: unscaled; paper: / sqrt(d)),
  patch columns, averaged over heads (Eq. 4);
* information density ``n``: L1 norm of the head-averaged value vector (Eq. 4);
* score ``S = (a / sum a + s / sum s) * n`` (Eq. 5), accumulated as ``C = w_h * C + w_c * S`` (Eq. 6).

Only the global token's row of the attention matrix is ever formed: ``O(T)`` per head, so the encoder
layer keeps its own attention kernel (SDPA / FlashAttention) for the real computation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from .base import MethodSpec, check_choice, check_int, check_keep, check_ratio, register_method
from .llm_base import LLMContext, top_per_image

SemanticScaling = Literal["code", "paper"]
Padding = Literal["exclude", "compete"]

# Table 10 / Eq. 6: the released default weighs history and current score equally.
DEFAULT_HISTORY_WEIGHT = 0.5
# Sec. 3.3 / Table 11: prune every second layer.
DEFAULT_PRUNE_INTERVAL = 2
# keep="auto": the default share of an image's final cumulative importance its kept tokens must hold, and
# the default floor of its count.
DEFAULT_AUTO_MASS = 0.5
DEFAULT_AUTO_MIN_KEEP = 8


@dataclass(frozen=True)
class FlowCutConfig:
    """Settings of FlowCut.

    Args:
        keep: number of visual (patch) tokens the language model receives per image (``K``); on
            Qwen2-VL / Qwen2.5-VL also a float ratio in (0, 1] of each image's merged tokens; on LLaVA-1.5
            also ``"auto"``: each image keeps the fewest tokens whose share of its final cumulative score
            reaches ``mass`` (between ``min_keep`` and ``max_keep``), so busy images keep more than plain
            ones; the handle's ``image_token_counts`` lists what every image kept.
        mass: ``keep="auto"`` only: the share in (0, 1) of the image's cumulative importance (over its
            non-padding patches, after the last pruning layer's update) the kept tokens must hold
            (default 0.5).
        min_keep / max_keep: ``keep="auto"`` only: bounds of every image's count (default 8 and all
            patches). Below ``max_keep`` the in-tower schedule prunes towards ``max_keep``, so a smaller
            ``max_keep`` also saves tower compute.
        semantic_scaling: ``"code"`` (default, the authors' release: ``softmax(v_g . v_j)``) or ``"paper"``
            (Eq. 4: ``softmax(v_g . v_j / sqrt(d))``).
        history_weight: weight of the accumulated score in ``C = w_h * C + (1 - w_h) * S`` (Eq. 6,
            Table 10; default 0.5). ``0`` disables the cumulative tracking.
        prune_interval: prune when the number of remaining layers before the consumed one is a multiple
            of this (default 2, Table 11). A value larger than the encoder depth prunes only once, at
            the last possible layer.
        padding: ``"exclude"`` (default) or ``"compete"``. Patches that are flat processor padding (the mean
            colour a pad-to-square processor adds around a non-square image; see
            ``vlmcut.models.vit.padding_patches``) rank below every image patch at every pruning step, so
            they are dropped first and kept only when ``keep`` exceeds the image's real patches. Without
            this (``"compete"``, the release) the unscaled semantic relevance gives the near-identical
            padding values most of its mass: on a 3:2 photo padded to square, 27 of 64 kept tokens were
            padding. Images without padding get exactly the release's selection either way.
    """

    keep: int | float
    semantic_scaling: SemanticScaling = "code"
    history_weight: float = DEFAULT_HISTORY_WEIGHT
    prune_interval: int = DEFAULT_PRUNE_INTERVAL
    padding: Padding = "exclude"
    mass: float | None = None
    min_keep: int | None = None
    max_keep: int | None = None

    def __post_init__(self) -> None:
        if self.keep == "auto":
            mass = DEFAULT_AUTO_MASS if self.mass is None else self.mass
            check_ratio("mass", mass, 0.0, 1.0)
            object.__setattr__(self, "mass", float(mass))
            low = DEFAULT_AUTO_MIN_KEEP if self.min_keep is None else self.min_keep
            object.__setattr__(self, "min_keep", check_int("min_keep", low, 1))
            if self.max_keep is not None:
                check_int("max_keep", self.max_keep, 1)
                if self.max_keep < low:
                    raise ValueError(
                        f"max_keep={self.max_keep} is below min_keep={low}; give max_keep >= min_keep"
                    )
        else:
            check_keep(self.keep)
            extra = [n for n in ("mass", "min_keep", "max_keep") if getattr(self, n) is not None]
            if extra:
                raise ValueError(
                    f"{', '.join(extra)} bound keep='auto' (a budget per image) only; with keep={self.keep!r} "
                    f"every image keeps exactly that many tokens, so drop {extra[0]} or pass keep='auto'"
                )
        check_choice(
            "semantic_scaling",
            self.semantic_scaling,
            ("code", "paper"),
            "'code': the authors' release, unscaled; 'paper': divided by sqrt(d)",
        )
        # Table 10: the current score gets 1 - history_weight
        check_ratio("history_weight", self.history_weight, 0.0, 1.0, low_open=False, high_open=True)
        check_int("prune_interval", self.prune_interval, 1)
        check_choice(
            "padding",
            self.padding,
            ("exclude", "compete"),
            "'exclude': processor padding never competes for the budget; 'compete': the release",
        )

    @property
    def current_weight(self) -> float:
        return 1.0 - self.history_weight

    @property
    def auto(self) -> bool:
        return self.keep == "auto"


def mass_count(scores: torch.Tensor, mass: float, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """``(B,)``: per row, the fewest of the highest ``scores`` (B, N) whose sum reaches ``mass`` of the row's
    total (positions in ``exclude`` count for neither). Scores are FlowCut's, non-negative; a row with no
    finite positive mass gets N."""
    s = torch.nan_to_num(scores.double(), nan=0.0, posinf=0.0, neginf=0.0).clamp(min=0.0)
    if exclude is not None:
        s = s.masked_fill(exclude.to(s.device), 0.0)
    ranked = s.sort(dim=-1, descending=True).values
    cum = ranked.cumsum(dim=-1)
    total = cum[:, -1:]
    reached = cum >= mass * total
    count = reached.long().argmax(dim=-1) + 1
    return torch.where(total[:, 0] > 0, count, torch.full_like(count, scores.shape[-1]))


# --------------------------------------------------------------------------------------------------
# Pure score functions
# --------------------------------------------------------------------------------------------------


def score_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half-precision softmax/entropy are too coarse to rank 500+ tokens; float64 stays float64 so that
    # the reference comparison with the authors' release is bit-for-bit.
    return torch.promote_types(dtype, torch.float32)


def _flat_batch(t: torch.Tensor) -> torch.Tensor:
    """``t`` (B, H, T, d) as is if its (B, H) dims flatten into one batch dim of a batched matmul, else a
    contiguous copy. Model adapters pass head views of (B, T, H, d) projections: with B > 1 the einsums
    below run several times slower on such a view than on one copy (measured on CPU: 3 LLaVA-NeXT crops,
    ~9 -> ~3 ms per layer), while with B = 1 the copy would only add time."""
    b, h = t.shape[:2]
    if b == 1 or h == 1 or t.stride(0) == h * t.stride(1):
        return t
    return t.contiguous()


def global_query_value(q: torch.Tensor, v: torch.Tensor, has_cls: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The global token's query and value: the CLS token's, or the mean over tokens where there is none.

    q, v: ``(B, H, T, d)`` -> ``q_g, v_g``: ``(B, H, d)``.
    """
    if has_cls:
        return q[:, :, 0], v[:, :, 0]
    return q.mean(dim=2), v.mean(dim=2)


def attention_strength(q_g: torch.Tensor, k: torch.Tensor, scale: float, has_cls: bool) -> torch.Tensor:
    """Global token's attention over the patches, head-averaged, not renormalised (SPEC score 1).

    q_g: ``(B, H, d)``; k: ``(B, H, T, d)`` -> ``(B, N)`` with ``N = T - 1`` if ``has_cls`` else ``T``.
    """
    # The release scales the query before the product (CLIPAttention of transformers < 4.48); doing the
    # same keeps float64 results identical to it.
    logits = torch.einsum("bhd,bhtd->bht", q_g * scale, k)  # (B, H, T)
    probs = logits.softmax(dim=-1)
    if has_cls:
        probs = probs[..., 1:]
    return probs.mean(dim=1)


def semantic_relevance(
    v_g: torch.Tensor, v: torch.Tensor, has_cls: bool, scaling: SemanticScaling
) -> torch.Tensor:
    """Softmax similarity of each token's value to the global value, head-averaged (SPEC score 2).

    v_g: ``(B, H, d)``; v: ``(B, H, T, d)`` -> ``(B, N)``.
    """
    logits = torch.einsum("bhd,bhtd->bht", v_g, v)  # (B, H, T)
    if scaling == "paper":
        logits = logits / math.sqrt(v.shape[-1])  # Eq. 4
    probs = logits.softmax(dim=-1)
    if has_cls:
        probs = probs[..., 1:]
    return probs.mean(dim=1)


def information_density(v: torch.Tensor, has_cls: bool) -> torch.Tensor:
    """L1 norm of the head-averaged value vector of every patch (SPEC score 3). v: ``(B, H, T, d)`` -> ``(B, N)``."""
    v_mean = v.mean(dim=1)  # (B, T, d)
    if has_cls:
        v_mean = v_mean[:, 1:]
    return v_mean.abs().sum(dim=-1)


def combine_scores(a: torch.Tensor, s: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """Eq. 5: ``(a / sum a + s / sum s) * n``; all ``(B, N)``."""
    return (a / a.sum(dim=-1, keepdim=True) + s / s.sum(dim=-1, keepdim=True)) * n


def layer_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    has_cls: bool,
    semantic_scaling: SemanticScaling = "code",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Score one encoder layer from its own projections.

    q, k, v: ``(B, H, T, d)`` -> ``(S, a)``, both ``(B, N)``: the combined score and the attention strength
    (the latter drives the entropy schedule).
    """
    dtype = score_dtype(q.dtype)
    q, k, v = q.to(dtype), _flat_batch(k.to(dtype)), _flat_batch(v.to(dtype))
    q_g, v_g = global_query_value(q, v, has_cls)
    a = attention_strength(q_g, k, scale, has_cls)
    s = semantic_relevance(v_g, v, has_cls, semantic_scaling)
    n = information_density(v, has_cls)
    return combine_scores(a, s, n), a


def entropy_ratio(a: torch.Tensor) -> torch.Tensor:
    """Eq. 2-3: entropy of the renormalised attention over ``N`` patches divided by ``log N``. ``(B, N)`` -> ``(B,)``.

    ``p log p`` is taken as 0 where ``p = 0`` (its limit), so peaked attention with exact zeros gives a finite
    ratio. A row whose attention is not finite, or sums to 0, gives NaN: :func:`prune_count` decides what
    that row does, without touching the other rows.
    """
    n = a.shape[-1]
    p = a / a.sum(dim=-1, keepdim=True)
    entropy = -torch.special.xlogy(p, p).sum(dim=-1)
    # The release computes log(N) as torch.log(torch.tensor(N)): an integer tensor promoted to the
    # default float dtype. Matching it keeps prune counts identical when P lands near x.5.
    log_n = torch.log(torch.tensor(float(n), dtype=torch.get_default_dtype()))
    return entropy / log_n


def prune_count(a: torch.Tensor, remaining: int, keep: int) -> torch.Tensor:
    """Eq. 3: how many patches to drop now, per image. ``(B, N)`` -> ``(B,)`` long.

    a: ``(B, N)`` attention strength; ``remaining``: layers left before the consumed one (``r > 0``);
    ``keep``: the target patch count ``K``. Each image gets what it would get alone (SPEC: per image). An
    image whose attention is not finite (a NaN image) drops nothing here; the last step (``r = 0``) still
    brings it to ``K``, so the batch keeps running and its other images are unaffected.
    """
    if remaining <= 0:
        raise ValueError(
            f"prune_count needs remaining > 0 (at r = 0 everything down to keep is dropped), got {remaining}"
        )
    n = a.shape[-1]
    h = entropy_ratio(a)
    h = torch.where(torch.isfinite(h), h.clamp(0.0, 1.0), torch.ones_like(h))
    p = (n - keep) / remaining**0.5 * (1 - h**2)
    return p.round().long()


def is_prune_layer(remaining: int, interval: int) -> bool:
    """SPEC schedule: prune after a layer whose remaining count ``r = F - 1 - i`` is ``>= 0`` and a multiple of the interval."""
    return remaining >= 0 and remaining % interval == 0


# --------------------------------------------------------------------------------------------------
# Stateful selector for one forward pass of a vision encoder
# --------------------------------------------------------------------------------------------------


class FlowCutSelector:
    """Runs FlowCut's schedule over the layers of one encoder forward.

    The model adapter calls :meth:`start` before the first layer, then :meth:`step` after every layer
    ``i`` with that layer's ``q, k, v``; ``step`` returns the indices (into the current patch tokens,
    ascending) to keep, or ``None`` to keep everything.
    """

    # Counts differ per image (Eq. 3 per image, SPEC): a batch is scored one image at a time.
    per_image_passes = True

    def __init__(self, config: FlowCutConfig, keep: int | None = None) -> None:
        self.config = config
        self.keep = config.keep if keep is None else keep
        self.consume_layer = 0
        self.cumulative: torch.Tensor | None = None
        self.padding: torch.Tensor | None = None  # (B, N) bool over the current patch tokens

    def start(self, consume_layer: int) -> None:
        """``consume_layer``: ``F >= 1``, the encoder layer whose output the model consumes (0-based); the
        model adapter validates it when it attaches."""
        self.consume_layer = consume_layer
        self.cumulative = None
        self.padding = None

    def set_padding(self, mask: torch.Tensor | None) -> None:
        """``(B, N)`` bool, True at patches that are processor padding, for the pass that just started
        (the model adapter calls this after :meth:`start`); ignored with ``padding="compete"``."""
        self.padding = (
            mask if self.config.padding == "exclude" and mask is not None and bool(mask.any()) else None
        )

    def _auto_count(self, n: int) -> int:
        """``keep="auto"``: this image's count at the last pruning step (``self.keep`` is ``max_keep``)."""
        assert self.cumulative is not None
        if self.cumulative.shape[0] != 1:
            raise ValueError(
                "keep='auto' gives every image its own count; score one image per step (the model adapters run "
                "the tower one image at a time)"
            )
        count = int(mass_count(self.cumulative, float(self.config.mass), self.padding)[0])
        return max(min(self.config.min_keep, n), min(count, self.keep, n))

    def _rank(self, cumulative: torch.Tensor) -> torch.Tensor:
        """The selection key: the cumulative score, with padding below every other patch (order kept)."""
        pad = self.padding
        if pad is None or pad.shape != cumulative.shape:
            return cumulative
        finite = torch.where(torch.isfinite(cumulative), cumulative, torch.zeros_like(cumulative))
        span = finite.abs().amax(dim=-1, keepdim=True) * 2 + 1
        return torch.where(pad.to(cumulative.device), cumulative - span, cumulative)

    def needs_scores(self, num_patches: int) -> bool:
        """Scores are computed at every layer while the sequence is longer than the target (SPEC); with
        ``keep="auto"`` while it is longer than ``min_keep``."""
        if self.config.auto:
            return num_patches > min(self.config.min_keep, self.keep)
        return num_patches > self.keep

    def step(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        scale: float,
        has_cls: bool,
        group: int = 1,
    ) -> torch.Tensor | None:
        """Score layer ``layer`` and maybe prune its output. q, k, v: ``(B, H, T, d)`` -> ``(B, n_keep)`` or None.

        ``group > 1``: the patch tokens come in consecutive runs of ``group`` that are kept or dropped
        together (Qwen2-VL's 2x2 merge units, SPEC "inconsistent"): a unit's score and attention are the
        means of its tokens', and ``keep``, the schedule and the returned indices count units.
        """
        cfg = self.config
        with torch.no_grad():
            scores, a = layer_scores(q.detach(), k.detach(), v.detach(), scale, has_cls, cfg.semantic_scaling)
            if group > 1:
                scores = scores.unflatten(-1, (-1, group)).mean(dim=-1)  # (B, N / group)
                a = a.unflatten(-1, (-1, group)).mean(dim=-1)
            if self.cumulative is None:
                self.cumulative = scores
            else:
                self.cumulative = cfg.history_weight * self.cumulative + cfg.current_weight * scores

            remaining = self.consume_layer - 1 - layer
            if not is_prune_layer(remaining, cfg.prune_interval):
                return None
            n = scores.shape[-1]
            if remaining > 0:
                floor = min(self.keep, n)  # keep="auto" without max_keep: no floor below the patch count
                counts = (n - prune_count(a, remaining, floor)).clamp(min=floor)  # (B,)
                n_keep = int(counts[0])
                if bool((counts != n_keep).any()):
                    raise ValueError(
                        f"layer {layer}: the images of this batch keep different counts "
                        f"({counts.tolist()}); FlowCut's counts are per image, so score one image per "
                        f"step (the model adapters run the tower one image at a time)"
                    )
            elif self.config.auto:
                n_keep = self._auto_count(n)
            else:
                n_keep = self.keep
            # a NaN score (a NaN image) must not win the top-k: it ranks last
            cumulative = torch.nan_to_num(self._rank(self.cumulative), nan=-math.inf)
            idx = torch.topk(cumulative, n_keep, dim=-1).indices
            idx = idx.sort(dim=-1).values  # raster order survives (SPEC: re-sort ascending)
            self.cumulative = torch.gather(self.cumulative, 1, idx)
            if self.padding is not None:
                self.padding = torch.gather(self.padding.to(idx.device), 1, idx)
        return idx


# --------------------------------------------------------------------------------------------------
# Second stage inside the language model (LLaVA-NeXT, Qwen2-VL; SPEC "Two-stage pruning")
# --------------------------------------------------------------------------------------------------

# SPEC: the second stage prunes at the output of decoder layer 1 (the LLM's second layer).
LLM_STAGE_LAYER = 1


def llm_stage_scores(
    ctx: LLMContext, query: str = "visual_mean", semantic_scaling: SemanticScaling = "code"
) -> torch.Tensor:
    """Formula 4 on the visual tokens of every image, with a global query built in the decoder layer.

    ``query="visual_mean"`` (SPEC): the mean of the image's visual queries (and mean value for ``s``);
    ``"last_text"`` (the authors' LLaVA-NeXT / Qwen2-VL code): the last prompt token's query and value.
    Softmaxes run over the image's visual keys only. Returns ``(B, T)`` (meaningful at visual columns).
    """
    dtype = score_dtype(ctx.q.dtype)
    b, h, t, d = ctx.q.shape
    group = h // ctx.k.shape[1]
    k = ctx.k.repeat_interleave(group, dim=1).to(dtype)  # (B, H, T, d)
    v = ctx.v.repeat_interleave(group, dim=1).to(dtype)
    q = ctx.q.to(dtype)
    out = torch.zeros(b, t, dtype=dtype, device=q.device)
    rows = torch.arange(b, device=q.device)
    n_images = int(ctx.image_index.max()) + 1 if bool(ctx.visual.any()) else 0
    for img in range(n_images):
        sel = ctx.visual & (ctx.image_index == img)  # (B, T)
        if not bool(sel.any()):
            continue
        w = sel.to(dtype)[:, None, :, None]  # (B, 1, T, 1)
        count = sel.sum(dim=1).clamp(min=1).to(dtype)[:, None, None]  # (B, 1, 1)
        if query == "visual_mean":
            q_g = (q * w).sum(dim=2) / count  # (B, H, d)
            v_g = (v * w).sum(dim=2) / count
        else:
            q_g = q[rows, :, ctx.query_index]
            v_g = v[rows, :, ctx.query_index]
        key_mask = ~sel[:, None, :]
        a_logits = torch.einsum("bhd,bhtd->bht", q_g * ctx.scale, k).masked_fill(key_mask, float("-inf"))
        s_logits = torch.einsum("bhd,bhtd->bht", v_g, v)
        if semantic_scaling == "paper" or query == "last_text":
            s_logits = s_logits / math.sqrt(d)  # the release's LLM stage scales it too
        s_logits = s_logits.masked_fill(key_mask, float("-inf"))
        a = a_logits.softmax(-1).nan_to_num(0.0).mean(1)  # (B, T)
        s = s_logits.softmax(-1).nan_to_num(0.0).mean(1)
        n = v.mean(dim=1).abs().sum(-1) * sel  # (B, T)
        score = (
            a / a.sum(-1, keepdim=True).clamp_min(1e-30) + s / s.sum(-1, keepdim=True).clamp_min(1e-30)
        ) * n
        out = torch.where(sel, score, out)
    return out


class FlowCutLLMSelector:
    """FlowCut's language-model stage: keep ``keep`` visual tokens per image at the output of layer 1."""

    def __init__(
        self, keep: int, query: str = "visual_mean", semantic_scaling: SemanticScaling = "code"
    ) -> None:
        self.keep = keep
        self.query = query
        self.semantic_scaling = semantic_scaling

    def prune_layers(self, num_layers: int, num_visual: int) -> list[int]:
        return [LLM_STAGE_LAYER] if num_visual > self.keep else []

    def select(self, ctx: LLMContext) -> torch.Tensor | None:
        if int(ctx.visual_counts().max()) <= self.keep:
            return None
        with torch.no_grad():
            scores = llm_stage_scores(ctx, self.query, self.semantic_scaling)
        return top_per_image(scores, ctx, self.keep)


register_method(
    MethodSpec(
        "flowcut",
        FlowCutConfig,
        make_selector=lambda cfg, keep: FlowCutSelector(cfg, keep=keep),
        make_second_stage=lambda cfg, keep: FlowCutLLMSelector(keep, semantic_scaling=cfg.semantic_scaling),
        merge_units=True,
    )
)
