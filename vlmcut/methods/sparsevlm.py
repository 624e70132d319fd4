"""SparseVLM (Zhang et al., "SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model
Inference", ICML 2025). Upstream code: github.com/Gumpest/SparseVLMs, branch ``v1.5`` (the release of the
ICML version; ``main`` keeps its defaults and adds the later "SparseVLM+" mode, not reproduced here).

Reproduced:

* Text raters (upstream ``modelling_sparse_llama.py``): the instruction's text tokens are rated by their
  relevance to the image, ``softmax_text(H_v H_t^T)`` averaged over the visual tokens; those above the mean
  relevance are the raters. They are chosen once per prefill and reused at every prune layer, as upstream.
* Scoring: at each prune layer (paper default 0-based layers 2, 6, 15 of LLaVA-1.5-7B's 32, upstream
  ``pruning_loc``) the layer runs on every current token; a visual token's score is the attention the raters
  pay it in that layer (softmax over every key a rater sees, mean over heads, then over raters), and the
  lowest-scored visual tokens are dropped at the layer's output.
* Token recycling (upstream ``cluster_and_merge``): of the ``D`` dropped tokens, the ``m = int(0.3 D) + 1``
  with the highest scores are clustered (DPC-kNN: density peaks with ``k`` = the number of clusters) into
  ``int(m / 10) + 1`` clusters on the layer's output hidden states; each cluster's mean goes on as one
  recycled token. Recycled tokens count toward the stage's token count, as upstream
  (``v_token_num = kept + cluster_num``).

Adapted (budget and accounting):

* Upstream fixes a top-k count per stage for each budget (``score.py``: 192 -> 300/200/110, 128 ->
  303/110/36, 64 -> 66/30/17, plus the recycled tokens, e.g. 309/204/113 for 192). Here the per-stage
  counts ``c_s`` (recycled tokens included) are solved for any ``keep`` so that the *average* visual tokens
  per image over all decoder layers equals ``keep`` (the accounting of the FlowCut paper's tables): layers
  ``0 .. l_1`` see all ``N``, layers ``l_s + 1 .. l_{s+1}`` see ``c_s``. The counts are geometric,
  ``N * lambda^s`` with ``lambda`` by bisection (:func:`vlmcut.methods.pdrop.stage_counts`), and the last
  stage's count is chosen so that the integer counts' average is the closest to ``keep``. A ``keep``
  below what the unpruned first layers already average raises ``ValueError``. (Upstream's comment counts
  its first prune layer as pruned, "2*576 4*300 10*200 16*110"; in its code, as here, that layer runs on
  all tokens, so its "192" schedule averages about 207.) With the paper's layers on LLaVA-1.5 (576 tokens,
  32 layers) ``keep=192`` gives 318/176/98 and ``keep=64`` gives 62/7/1: the three unpruned layers alone
  average 54.
* A stage's count ``c`` is split into ``t`` top-scored tokens and ``r`` recycled ones with upstream's
  formula ``r = clusters(n - t)``, ``t`` the largest with ``t + r <= c``, so each stage holds exactly ``c``
  (:func:`recycle_split`; upstream's 300 -> 309 etc. are reproduced).
* Every image keeps the same count (upstream handles one image per batch); raters are per row.

Simplified:

* Positions: upstream appends the recycled tokens after the kept visual tokens and renumbers every position
  contiguously. Here tokens keep their original positions (the engine's rule); a recycled token takes the
  column of its cluster's density peak (the center, a dropped candidate that is kept for it) and the
  cluster mean replaces that token's hidden state (:class:`~vlmcut.methods.llm_base.LLMSelection`).
* Raters are chosen from the hidden states at the first prune layer's output (the engine sees only prune
  layers), not from the input embeddings. Text tokens = the valid, non-visual prompt tokens after the last
  visual token of the row, up to the last prompt token (tokens generated later never rate, so cached and
  uncached generation agree). Fallbacks: no token strictly above the mean -> every text token; no text
  token -> the last prompt token.
* Only the raters' attention rows (``R x T``) are formed, so layers keep SDPA; upstream forms the full
  attention matrix.
* DPC-kNN breaks density/score ties by candidate order (upstream adds 1e-6 random noise), and a cluster
  is the plain mean of its members (upstream divides by ``count + 1e-6``).

Not reproduced: the rank-based count of the first release (Oct 2024 code, ``attn_postprocess_rank``:
keep ``13.5 * rank(P)`` tokens, ``P`` the raters x visual attention). It varies per image and prompt, so it
cannot meet a fixed budget; the v1.5 and main branches replace it by the fixed per-budget counts above.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .base import MethodSpec, check_bool, check_keep, check_layers, check_ratio, register_method
from .llm_base import LLMContext, LLMSelection
from .pdrop import stage_counts

PAPER_LAYERS = (2, 6, 15)  # 0-based prune layers of 32 (LLaVA-1.5-7B); upstream `pruning_loc` (v1.5)
PAPER_DEPTH = 32
PAPER_RECYCLE_RATIO = 0.3  # top 30% of the dropped tokens are recycled; upstream `merge_token_num_stage1`
PAPER_CLUSTER_RATIO = 0.1  # one cluster per 10 recycled tokens, plus one; upstream `cluster_num`


@dataclass(frozen=True)
class SparseVLMConfig:
    """Settings of SparseVLM.

    Args:
        keep: the target *average* visual tokens per image over all decoder layers.
            On Qwen2-VL / Qwen2.5-VL also a float ratio in (0, 1] of each image's merged tokens.
        layers: 0-based decoder layers whose attention scores the visual tokens and at whose output they
            are dropped (strictly increasing). Default ``None``: the paper's ``(2, 6, 15)`` of 32 (upstream
            ``pruning_loc``), scaled to the model's depth (:func:`default_layers`).
        recycle: token recycling on (default ``True``, the paper's method; ``False`` is its ablation).
        recycle_ratio: fraction of a stage's dropped tokens (the highest-scored) that are recycled,
            ``int(ratio * D) + 1``. Default 0.3 (upstream ``merge_token_num_stage1``).
        cluster_ratio: clusters per recycled token, ``int(ratio * m) + 1``. Default 0.1 (upstream
            ``cluster_num``).
    """

    keep: int | float
    layers: tuple[int, ...] | None = None
    recycle: bool = True
    recycle_ratio: float = PAPER_RECYCLE_RATIO
    cluster_ratio: float = PAPER_CLUSTER_RATIO

    def __post_init__(self) -> None:
        check_keep(self.keep)
        if self.layers is not None:
            object.__setattr__(self, "layers", check_layers("layers", self.layers, 0))
        check_bool("recycle", self.recycle)
        check_ratio("recycle_ratio", self.recycle_ratio, 0, 1, high_open=False)
        check_ratio("cluster_ratio", self.cluster_ratio, 0, 1)


# ---------------------------------------------------------------------------------------------------
# Schedule
# ---------------------------------------------------------------------------------------------------


def default_layers(depth: int) -> tuple[int, ...]:
    """The paper's prune layers ``(2, 6, 15)`` of 32 scaled to ``depth``: the number of layers before each
    cut scales, and cuts that collide move one layer later."""
    out: list[int] = []
    for layer in PAPER_LAYERS:
        scaled = round((layer + 1) * depth / PAPER_DEPTH) - 1
        out.append(max(scaled, out[-1] + 1 if out else 0))
    if out[-1] > depth - 2:
        raise ValueError(
            f"SparseVLM's {len(PAPER_LAYERS)} prune layers need a decoder of at least "
            f"{len(PAPER_LAYERS) + 1} layers, this one has {depth}; pass layers=(...) explicitly"
        )
    return tuple(out)


def layer_average(n: int, depth: int, layers: Sequence[int], counts: Sequence[int]) -> float:
    """Average visual tokens per image over ``depth`` layers: ``n`` up to ``layers[0]`` (included),
    ``counts[s]`` after ``layers[s]``."""
    bounds = [layer + 1 for layer in layers] + [depth]
    total = bounds[0] * n + sum((bounds[s + 1] - bounds[s]) * c for s, c in enumerate(counts))
    return total / depth


def schedule(n: int, depth: int, layers: Sequence[int], keep: int) -> list[int]:
    """Visual tokens per image after each prune layer so that :func:`layer_average` is ``keep``.

    Geometric counts ``n * lambda^s`` (``lambda`` solved by bisection), rounded; the last count is then the
    integer giving the average closest to ``keep``. Raises ``ValueError`` when ``keep`` is unreachable.
    """
    layers = list(layers)
    floor = layer_average(n, depth, layers, [1] * len(layers))
    if floor > keep:
        raise ValueError(
            f"keep={keep} is unreachable: decoder layers 0..{layers[0]} see all {n} visual tokens, so even "
            f"one token per image after layer {layers[0]} averages {floor:.1f} over {depth} layers; pass "
            f"earlier layers (e.g. layers=(0, ...)) or a larger keep"
        )
    counts = stage_counts(n, depth, [layer + 1 for layer in layers], keep)[0][1:]
    last_len = depth - (layers[-1] + 1)
    rest = layer_average(n, depth, layers, [*counts[:-1], 0]) * depth
    cap = counts[-2] if len(counts) > 1 else n
    counts[-1] = min(cap, max(1, round((keep * depth - rest) / last_len)))
    return counts


def _recycled(dropped: int, recycle_ratio: float, cluster_ratio: float) -> tuple[int, int]:
    """(candidates, clusters) for ``dropped`` tokens: upstream's ``int(0.3 D) + 1``, ``int(m / 10) + 1``."""
    if dropped <= 0:
        return 0, 0
    m = min(dropped, int(dropped * recycle_ratio) + 1)
    return m, int(m * cluster_ratio) + 1


def recycle_split(
    n: int, count: int, recycle_ratio: float = PAPER_RECYCLE_RATIO, cluster_ratio: float = PAPER_CLUSTER_RATIO
) -> tuple[int, int]:
    """``(top, recycled)`` with ``top + recycled == count`` for an image going from ``n`` to ``count`` tokens.

    ``recycled`` is upstream's cluster count for the ``n - top`` dropped tokens; ``top`` is the largest that
    fits (``top + clusters(n - top)`` grows by 0 or 1 per step of ``top``, so ``count`` is hit exactly).
    """
    if count >= n:
        return n, 0
    for top in range(count, 0, -1):
        recycled = _recycled(n - top, recycle_ratio, cluster_ratio)[1]
        if top + recycled <= count:
            return top, recycled
    return 1, count - 1  # tiny counts: fewer clusters than upstream's formula


# ---------------------------------------------------------------------------------------------------
# Raters and scores (pure tensor functions)
# ---------------------------------------------------------------------------------------------------


def _wide(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def text_tokens(ctx: LLMContext) -> torch.Tensor:
    """(B, T) bool: valid non-visual tokens after the row's last visual token, up to the last prompt token."""
    cols = torch.arange(ctx.visual.shape[1], device=ctx.visual.device)
    last_visual = torch.where(ctx.visual, cols, -1).max(dim=1).values  # (B,)
    return ctx.valid & ~ctx.visual & (cols > last_visual[:, None]) & (cols <= ctx.query_index[:, None])


def select_raters(
    hidden: torch.Tensor, visual: torch.Tensor, text: torch.Tensor, query_index: torch.Tensor
) -> torch.Tensor:
    """(B, T) bool: the text raters of each row.

    hidden: (B, T, D); visual, text: (B, T) bool; query_index: (B,). Relevance of text token ``j``:
    ``mean_i softmax_j(h_i . h_j)`` over the row's visual tokens ``i``; raters are above the mean relevance.
    """
    raters = torch.zeros_like(text)
    for b in range(hidden.shape[0]):
        t_cols = text[b].nonzero().squeeze(1)
        if t_cols.numel() == 0:
            raters[b, query_index[b]] = True
            continue
        h_v = _wide(hidden[b, visual[b]])  # (Nv, D)
        if h_v.shape[0] == 0:
            raters[b, t_cols] = True
            continue
        relevance = (h_v @ _wide(hidden[b, t_cols]).T).softmax(dim=-1).mean(dim=0)  # (Nt,)
        pick = relevance > relevance.mean()
        raters[b, t_cols[pick] if bool(pick.any()) else t_cols] = True
    return raters


def rater_attention(ctx: LLMContext, raters: torch.Tensor) -> torch.Tensor:
    """(B, T): the attention the raters pay each visual token (zero elsewhere).

    Each rater's row is its softmax over every valid key up to itself (causal), averaged over heads; the
    rows are then averaged over the row's raters. Only the ``R`` rater rows are formed: ``(B, H, R, T)``.
    GQA keys are shared by ``H / Hkv`` query heads, as in the model.
    """
    b, h, t, d = ctx.q.shape
    hkv = ctx.k.shape[1]
    cols = torch.arange(t, device=ctx.q.device)
    n_raters = raters.sum(dim=1)  # (B,)
    r = max(1, int(n_raters.max()))
    pos = torch.where(raters, cols, t).sort(dim=1).values[:, :r]  # (B, R), t = padding
    real = pos < t
    pos = pos.clamp(max=t - 1)
    q = torch.gather(ctx.q, 2, pos[:, None, :, None].expand(b, h, r, d))  # (B, H, R, d)
    q = _wide(q).view(b, hkv, h // hkv, r, d)
    logits = torch.einsum("bkgrd,bktd->bkgrt", q, _wide(ctx.k)) * ctx.scale  # (B, Hkv, G, R, T)
    allowed = ctx.valid[:, None, :] & (cols[None, None, :] <= pos[:, :, None])  # (B, R, T)
    probs = logits.masked_fill(~allowed[:, None, None], float("-inf")).softmax(dim=-1).nan_to_num(0.0)
    per_rater = probs.mean(dim=(1, 2))  # (B, R, T)
    weight = real.to(per_rater.dtype) / n_raters.clamp(min=1)[:, None]  # (B, R)
    return (per_rater * weight[..., None]).sum(dim=1) * ctx.visual


def dpc_knn(x: torch.Tensor, clusters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Density-peak clustering with k nearest neighbours (``k = clusters``), as SparseVLM's recycling.

    x: (N, C) -> ``centers`` (clusters,) indices into ``x`` and ``assign`` (N,) in ``[0, clusters)``.
    Distances are Euclidean / sqrt(C); density ``exp(-mean of the squared distances to the k nearest)`` (self
    included); ``delta`` = distance to the nearest denser token (the largest distance for the densest);
    centers = top ``delta * density``; every token joins its nearest center. Ties go to the earlier token.
    """
    x = _wide(x)
    n = x.shape[0]
    dist = torch.cdist(x[None], x[None], compute_mode="donot_use_mm_for_euclid_dist")[0] / x.shape[1] ** 0.5
    dist.fill_diagonal_(0.0)
    density = (-(dist.topk(clusters, dim=-1, largest=False).values ** 2).mean(dim=-1)).exp()  # (N,)
    idx = torch.arange(n, device=x.device)
    denser = (density[None, :] > density[:, None]) | (
        (density[None, :] == density[:, None]) & (idx[None, :] < idx[:, None])
    )  # (N, N): [i, j] = j is denser than i
    delta = torch.where(denser, dist, dist.max()).min(dim=-1).values
    centers = torch.argsort(delta * density, descending=True, stable=True)[:clusters]
    assign = dist[:, centers].argmin(dim=1)
    assign[centers] = torch.arange(clusters, device=x.device)
    return centers, assign


def cluster_means(x: torch.Tensor, assign: torch.Tensor, clusters: int) -> torch.Tensor:
    """(clusters, C): the mean of the rows of ``x`` (N, C) in each cluster."""
    x = _wide(x)
    sums = x.new_zeros(clusters, x.shape[1]).index_add_(0, assign, x)
    return sums / torch.bincount(assign, minlength=clusters).clamp(min=1)[:, None].to(x.dtype)


# ---------------------------------------------------------------------------------------------------
# Selector
# ---------------------------------------------------------------------------------------------------


class SparseVLMSelector:
    """Text-guided pruning with token recycling at a few decoder layers (see the module docstring)."""

    def __init__(self, config: SparseVLMConfig, keep: int | None = None) -> None:
        self.config = config
        self.keep = config.keep if keep is None else keep
        self.layers: tuple[int, ...] = ()
        self._counts: dict[int, int] = {}  # prune layer -> visual tokens per image after it
        # raters of the current prefill, per row: their ranks among the row's text tokens (text tokens are
        # never dropped, so the ranks stay valid at later prune layers); None: the last prompt token
        self._raters: list[torch.Tensor | None] | None = None

    def prune_layers(self, num_layers: int, num_visual: int) -> list[int]:
        self._raters = None
        layers = self.config.layers or default_layers(num_layers)
        if max(layers) > num_layers - 2:
            raise ValueError(
                f"SparseVLM layers {layers} must be <= {num_layers - 2} for a {num_layers}-layer decoder "
                f"(pruning at the last layer's output saves nothing)"
            )
        self.layers = layers
        if num_visual <= self.keep:
            self._counts = {}
            return []
        self._counts = dict(zip(layers, schedule(num_visual, num_layers, layers, self.keep), strict=True))
        return list(layers)

    def _rater_mask(self, ctx: LLMContext) -> torch.Tensor:
        text = text_tokens(ctx)
        if self._raters is not None and len(self._raters) == text.shape[0]:
            raters = torch.zeros_like(text)
            for b, ranks in enumerate(self._raters):
                cols = text[b].nonzero().squeeze(1)
                if ranks is None:
                    raters[b, ctx.query_index[b]] = True
                elif ranks.numel() and int(ranks.max()) < cols.numel():
                    raters[b, cols[ranks]] = True
                else:
                    break
            else:
                return raters
        raters = select_raters(ctx.hidden, ctx.visual, text, ctx.query_index)
        ranks = text.long().cumsum(dim=1) - 1
        self._raters = [
            ranks[b][raters[b] & text[b]] if bool(text[b].any()) else None for b in range(len(text))
        ]
        return raters

    def select(self, ctx: LLMContext) -> torch.Tensor | LLMSelection | None:
        target = self._counts.get(ctx.layer)
        if target is None:
            return None
        with torch.no_grad():
            raters = self._rater_mask(ctx)
            if int(ctx.visual_counts().max()) <= target:
                return None
            scores = rater_attention(ctx, raters)  # (B, T)
            keep = ~ctx.visual
            hidden: torch.Tensor | None = None
            n_img = int(ctx.image_index.max()) + 1
            for b in range(ctx.visual.shape[0]):
                for img in range(n_img):
                    cols = (ctx.visual[b] & (ctx.image_index[b] == img)).nonzero().squeeze(1)
                    n = cols.numel()
                    if n <= target:
                        keep[b, cols] = True
                        continue
                    cfg = self.config
                    top, recycled = (
                        recycle_split(n, target, cfg.recycle_ratio, cfg.cluster_ratio)
                        if cfg.recycle
                        else (target, 0)
                    )
                    order = torch.argsort(scores[b, cols], descending=True, stable=True)
                    keep[b, cols[order[:top]]] = True
                    if recycled == 0:
                        continue
                    dropped = cols[order[top:]]  # highest score first
                    m = _recycled(dropped.numel(), cfg.recycle_ratio, cfg.cluster_ratio)[0]
                    cand = dropped[:m]
                    centers, assign = dpc_knn(ctx.hidden[b, cand], recycled)
                    if hidden is None:
                        hidden = ctx.hidden.clone()
                    merged = cluster_means(ctx.hidden[b, cand], assign, recycled)
                    keep[b, cand[centers]] = True
                    hidden[b, cand[centers]] = merged.to(hidden.dtype)
        return keep if hidden is None else LLMSelection(keep, hidden)


register_method(
    MethodSpec(
        "sparsevlm",
        SparseVLMConfig,
        make_selector=None,
        make_llm_selector=lambda cfg, keep: SparseVLMSelector(cfg, keep),
    )
)
