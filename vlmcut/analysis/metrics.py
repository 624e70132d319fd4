"""Pure analysis metrics behind the observations of FlowCut, section 2 (Figs. 2, 3, 4, 6, 7).

Every function here takes plain torch tensors (attention maps, score rows, value norms) and knows
nothing about models: the plumbing that records attention / values from a Hugging Face encoder lives
elsewhere. Conventions shared by all functions:

* An attention map ``attn`` has shape ``(..., T, T)``: rows are queries, columns are keys, any leading
  dims (layers, batch, heads) are kept in the output. Pass ``attn.mean(-3)`` for head-averaged maps.
* With ``has_cls=True`` token 0 is the CLS (global) token and tokens ``1..T-1`` are the ``N = T - 1``
  patch tokens in raster order; with ``has_cls=False`` (SigLIP, Qwen2-VL ViT) all ``T = N`` tokens are
  patches.
* Patch tokens are identified by their *patch index* ``0..N-1`` (row-major on the ``(h, w)`` grid),
  never by their token position. The CLS token is :data:`CLS_INDEX` (``-1``) in index maps.
* Results are computed and returned in float64 (integer index maps as int64): this is analysis code,
  off the hot path, and float64 keeps numbers comparable between runs and with the float64 reference
  pruning. Ties are broken towards the lower index everywhere (``torch.argmax`` returns the first
  maximum, sorts are stable), so every function is deterministic.
* Invalid input raises :class:`ValueError` with a message naming the argument.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import Tensor

__all__ = [
    "CLS_INDEX",
    "CRITERIA",
    "CriteriaDisagreement",
    "FlowMaps",
    "HubTokens",
    "ValueNormSummary",
    "attention_entropy_ratio",
    "criteria_disagreement",
    "criteria_rankings",
    "hub_tokens",
    "information_flow",
    "kendall_tau",
    "mean_attention_distance",
    "pairwise_agreement",
    "rank_order",
    "spearman",
    "topk_overlap",
    "value_l1_norm",
    "value_norm_summary",
]

# Index used for the CLS token in patch-index maps (it has no position on the patch grid).
CLS_INDEX = -1
# The three token-importance criteria compared in Fig. 4 (and combined in FlowCut's score, Sec. 3).
CRITERIA: tuple[str, str, str] = ("attention", "semantic", "value_norm")
# Tukey whisker length in IQRs; matplotlib's box-plot default, used for Fig. 7's box plots.
TUKEY_WHIS = 1.5


# --------------------------------------------------------------------------------------------- helpers
def _as_float64(x: Tensor, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.is_complex() or x.dtype == torch.bool:
        raise ValueError(f"{name} must be a real tensor, got dtype {x.dtype}")
    x = x.detach().to(torch.float64)
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    return x


def _check_attn(attn: Tensor, has_cls: bool, name: str = "attn") -> tuple[Tensor, int]:
    """Validate an attention map; return it in float64 and the number of patch tokens N."""
    a = _as_float64(attn, name)
    if a.ndim < 2 or a.shape[-1] != a.shape[-2]:
        raise ValueError(f"{name} must have shape (..., T, T), got {tuple(a.shape)}")
    n_patch = a.shape[-1] - (1 if has_cls else 0)
    if n_patch < 1:
        raise ValueError(f"{name} has no patch tokens (T={a.shape[-1]}, has_cls={has_cls})")
    return a, n_patch


def _check_grid(grid_hw: Sequence[int], name: str = "grid_hw") -> tuple[int, int]:
    if not isinstance(grid_hw, Sequence) or len(grid_hw) != 2:
        raise ValueError(f"{name} must be (h, w), got {grid_hw!r}")
    h, w = (int(v) for v in grid_hw)
    if h < 1 or w < 1 or (h, w) != tuple(grid_hw):
        raise ValueError(f"{name} must be two positive integers, got {grid_hw!r}")
    return h, w


def _check_grid_matches(n_patch: int, grid_hw: Sequence[int]) -> tuple[int, int]:
    h, w = _check_grid(grid_hw)
    if h * w != n_patch:
        raise ValueError(f"grid_hw={tuple(grid_hw)} has {h * w} cells but there are {n_patch} patch tokens")
    return h, w


def _check_scores(x: Tensor, name: str, min_n: int = 1) -> Tensor:
    s = _as_float64(x, name)
    if s.ndim < 1 or s.shape[-1] < min_n:
        raise ValueError(f"{name} must have shape (..., N) with N >= {min_n}, got {tuple(s.shape)}")
    return s


def _check_same_shape(a: Tensor, b: Tensor, na: str, nb: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{na} and {nb} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def _check_k(k: int, n: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        raise ValueError(f"k must be an int, got {k!r}")
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, N={n}], got {k}")
    return k


def _grid_distances(h: int, w: int, patch_index: Tensor) -> Tensor:
    """Euclidean distance in patch units between the grid cells of ``patch_index``. -> (N, N)."""
    rows = torch.div(patch_index, w, rounding_mode="floor").to(torch.float64)
    cols = (patch_index % w).to(torch.float64)
    # Explicit formula rather than torch.cdist: cdist may take a matmul shortcut that is not exact.
    dr = rows[:, None] - rows[None, :]
    dc = cols[:, None] - cols[None, :]
    return torch.sqrt(dr * dr + dc * dc)


def _eye_mask(t: int) -> Tensor:
    return torch.eye(t, dtype=torch.bool)


# ------------------------------------------------------------------------------- Fig. 3 (middle): entropy
def attention_entropy_ratio(attn_row: Tensor) -> Tensor:
    """Normalised entropy of the global token's attention over the patch tokens (Fig. 3, middle).

    ``attn_row``: ``(..., N)`` non-negative attention of the CLS / global query to the N patch keys
    (e.g. ``attn[..., 0, 1:]``). The row is renormalised over the patches (the CLS column is not part
    of it), then ``H(p) / log(N)`` is returned with ``0 * log 0 = 0``: 1 for uniform attention, 0 for
    one-hot attention. This is the ``h`` of FlowCut's adaptive prune count (SPEC, "Schedule").

    Returns ``(...)`` float64.
    """
    p = _check_scores(attn_row, "attn_row", min_n=2)  # log(1) = 0: the ratio is undefined for N = 1
    if bool((p < 0).any()):
        raise ValueError("attn_row must be non-negative")
    total = p.sum(-1, keepdim=True)
    if bool((total <= 0).any()):
        raise ValueError("attn_row has a row that sums to zero; it cannot be renormalised")
    p = p / total
    entropy = -torch.special.xlogy(p, p).sum(-1)  # xlogy(0, 0) = 0
    return entropy / math.log(p.shape[-1])


# ---------------------------------------------------------------------------- Fig. 3 (left): distance
def mean_attention_distance(
    attn: Tensor,
    grid_hw: Sequence[int],
    has_cls: bool = True,
    *,
    mode: Literal["argmax", "weighted"] = "argmax",
    exclude_self: bool = False,
    patch_index: Tensor | None = None,
    reduction: Literal["mean", "none"] = "mean",
) -> Tensor:
    """Average distance between each patch token and the token it attends to (Fig. 3, left).

    ``attn``: ``(..., T, T)``, e.g. ``(L, T, T)`` head-averaged per layer or ``(L, B, H, T, T)``.
    ``grid_hw``: the ``(h, w)`` patch grid. Distances are Euclidean, in patch units.

    Choices (the paper only says "the token that it attends the most"):

    * Only patch queries and patch keys take part; the CLS key is excluded because it has no grid
      position, so a patch whose largest attention goes to CLS is measured to its top *patch* key.
    * ``mode="argmax"`` (paper): distance to ``argmax_j A[i, j]`` over patch keys.
      ``mode="weighted"``: the ViT "mean attention distance", ``sum_j p_ij d(i, j)`` with the row
      renormalised over the patch keys.
    * ``exclude_self=False`` (default, the literal reading) lets a token's top key be itself
      (distance 0); ``True`` drops the diagonal first.
    * ``patch_index``: ``(N,)`` original grid index of each current patch token, for attention maps
      recorded after pruning (then ``N < h * w``); default ``arange(h * w)``.

    Returns ``(...)`` float64 (mean over patch queries), or ``(..., N)`` per query with
    ``reduction="none"``.
    """
    a, n = _check_attn(attn, has_cls)
    h, w = _check_grid(grid_hw)
    if patch_index is None:
        _check_grid_matches(n, (h, w))
        idx = torch.arange(n)
    else:
        if (
            not isinstance(patch_index, Tensor)
            or patch_index.dtype.is_floating_point
            or patch_index.dtype == torch.bool
            or patch_index.ndim != 1
        ):
            raise ValueError("patch_index must be a 1-D integer tensor")
        if patch_index.numel() != n:
            raise ValueError(f"patch_index has {patch_index.numel()} entries but there are {n} patch tokens")
        idx = patch_index.to(torch.int64)
        if bool(((idx < 0) | (idx >= h * w)).any()) or torch.unique(idx).numel() != n:
            raise ValueError(f"patch_index must hold distinct indices in [0, {h * w})")
    if mode not in ("argmax", "weighted"):
        raise ValueError(f"mode must be 'argmax' or 'weighted', got {mode!r}")
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    if exclude_self and n < 2:
        raise ValueError("exclude_self needs at least 2 patch tokens")

    off = 1 if has_cls else 0
    pp = a[..., off:, off:]  # (..., N, N) patch queries x patch keys
    dist = _grid_distances(h, w, idx)  # (N, N)
    if mode == "argmax":
        if exclude_self:
            pp = pp.masked_fill(_eye_mask(n), -math.inf)
        top = pp.argmax(-1)  # (..., N); first maximum on ties
        per_query = dist[torch.arange(n), top]  # (..., N)
    else:
        if bool((pp < 0).any()):
            raise ValueError("attn must be non-negative for mode='weighted'")
        if exclude_self:
            pp = pp.masked_fill(_eye_mask(n), 0.0)
        total = pp.sum(-1, keepdim=True)
        if bool((total <= 0).any()):
            raise ValueError("a patch query has zero attention on the patch keys; cannot renormalise")
        per_query = (pp / total * dist).sum(-1)  # (..., N)
    return per_query.mean(-1) if reduction == "mean" else per_query


# ------------------------------------------------------------------------- Fig. 2 (left): flow maps
@dataclass(frozen=True)
class FlowMaps:
    """Argmax information-flow maps of one or more attention maps (Fig. 2, left).

    Values are patch indices (row-major on the grid) or :data:`CLS_INDEX` for the CLS token.
    """

    inflow: Tensor  # (..., N) int64: primary source of each patch query, argmax_j A[i, j]
    outflow: Tensor  # (..., N) int64: primary destination of each patch key, argmax_i A[i, j]
    cls_inflow: Tensor | None  # (...) int64: primary source of the CLS query (None without CLS)
    cls_outflow: Tensor | None  # (...) int64: primary destination of the CLS key (None without CLS)
    grid_hw: tuple[int, int] | None = None

    def _grid(self, x: Tensor) -> Tensor:
        if self.grid_hw is None:
            raise ValueError("FlowMaps has no grid_hw; pass grid_hw to information_flow")
        return x.reshape(*x.shape[:-1], *self.grid_hw)

    @property
    def inflow_grid(self) -> Tensor:
        """``inflow`` laid out on the patch grid. -> (..., h, w)."""
        return self._grid(self.inflow)

    @property
    def outflow_grid(self) -> Tensor:
        """``outflow`` laid out on the patch grid. -> (..., h, w)."""
        return self._grid(self.outflow)


def information_flow(
    attn: Tensor,
    has_cls: bool = True,
    *,
    grid_hw: Sequence[int] | None = None,
    include_cls: bool = True,
    exclude_self: bool = False,
) -> FlowMaps:
    """Inflow / outflow argmax maps of an attention map (Sec. 2.2 i, Fig. 2 left).

    For ``A = attn`` (``(..., T, T)``, rows are queries): the *inflow* of token ``i`` is its primary
    source of information ``argmax_j A[i, :]``, the *outflow* of token ``j`` is the primary destination
    of its information ``argmax_i A[:, j]``. Maps are returned for the patch tokens, in patch indices.

    Choices: the CLS token takes part as a candidate (``include_cls=True``) because the paper's point
    is exactly that shallow patch tokens draw from / feed the CLS token; it shows up as
    :data:`CLS_INDEX`. ``include_cls=False`` restricts both argmaxes to patches. ``exclude_self``
    drops the diagonal (a token's attention to itself) before the argmax. ``grid_hw`` (checked against
    N) enables ``FlowMaps.inflow_grid`` / ``outflow_grid``.
    """
    a, n = _check_attn(attn, has_cls)
    hw = _check_grid_matches(n, grid_hw) if grid_hw is not None else None
    t = a.shape[-1]
    if exclude_self:
        if t < 2:
            raise ValueError("exclude_self needs at least 2 tokens")
        a = a.masked_fill(_eye_mask(t), -math.inf)
    if has_cls and not include_cls:
        if n < 2 and exclude_self:
            raise ValueError("exclude_self with include_cls=False needs at least 2 patch tokens")
        pp = a[..., 1:, 1:]
        return FlowMaps(pp.argmax(-1), pp.argmax(-2), None, None, hw)
    off = 1 if has_cls else 0
    # Token position t maps to patch index t - 1 with a CLS token, so CLS (position 0) becomes -1.
    inflow_all = a.argmax(-1) - off  # (..., T)
    outflow_all = a.argmax(-2) - off  # (..., T)
    if not has_cls:
        return FlowMaps(inflow_all, outflow_all, None, None, hw)
    return FlowMaps(inflow_all[..., 1:], outflow_all[..., 1:], inflow_all[..., 0], outflow_all[..., 0], hw)


class HubTokens(NamedTuple):
    indices: Tensor  # (..., top) int64 patch indices, most voted first (lower index first on ties)
    votes: Tensor  # (..., top) int64 number of patch queries whose top patch key is that token


def hub_tokens(attn: Tensor, top: int = 1, has_cls: bool = True, *, exclude_self: bool = False) -> HubTokens:
    """The 'hub tokens' of Sec. 2.2 i: patch tokens that most patch tokens attend to the most.

    Each patch query votes for its top *patch* key (hub tokens are non-CLS by the paper's definition,
    so the CLS key is not a candidate, and the CLS query does not vote). ``attn``: ``(..., T, T)``;
    votes are counted separately per leading index. Returns the ``top`` most-voted patch indices and
    their vote counts, ``(..., top)`` each; tokens with zero votes fill up the list if few are voted.
    """
    a, n = _check_attn(attn, has_cls)
    if isinstance(top, bool) or not isinstance(top, int) or not 1 <= top <= n:
        raise ValueError(f"top must be an int in [1, N={n}], got {top!r}")
    off = 1 if has_cls else 0
    pp = a[..., off:, off:]  # (..., N, N)
    if exclude_self:
        if n < 2:
            raise ValueError("exclude_self needs at least 2 patch tokens")
        pp = pp.masked_fill(_eye_mask(n), -math.inf)
    choice = pp.argmax(-1)  # (..., N)
    votes = torch.zeros(choice.shape, dtype=torch.int64).scatter_add_(-1, choice, torch.ones_like(choice))
    order = torch.sort(votes, dim=-1, descending=True, stable=True).indices[..., :top]
    return HubTokens(order, votes.gather(-1, order))


# ------------------------------------------------------------------------------- Fig. 4: criteria
def rank_order(scores: Tensor) -> Tensor:
    """Token indices from most to least important (descending score, lower index first on ties).

    ``scores``: ``(..., N)`` -> ``(..., N)`` int64 permutation.
    """
    s = _check_scores(scores, "scores")
    return torch.sort(s, dim=-1, descending=True, stable=True).indices


def criteria_rankings(attn_row: Tensor, semantic_row: Tensor, value_norm: Tensor) -> dict[str, Tensor]:
    """Rankings of the patch tokens by the three criteria of Fig. 4.

    All inputs are ``(..., N)`` over the patch tokens (the CLS column already dropped): the CLS
    attention row (attention strength), the CLS-to-token semantic similarity (semantic relevance) and
    the value-vector L1 norm (information density). Returns ``{name: (..., N) int64 rank order}`` keyed
    by :data:`CRITERIA`.
    """
    scores = _criteria_scores(attn_row, semantic_row, value_norm)
    return {name: rank_order(s) for name, s in scores.items()}


def _criteria_scores(attn_row: Tensor, semantic_row: Tensor, value_norm: Tensor) -> dict[str, Tensor]:
    rows = dict(zip(CRITERIA, (attn_row, semantic_row, value_norm), strict=True))
    checked = {name: _check_scores(x, name) for name, x in rows.items()}
    ref = checked[CRITERIA[0]]
    for name, x in checked.items():
        _check_same_shape(ref, x, "attn_row", name)
    return checked


def _topk_mask(s: Tensor, k: int) -> Tensor:
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices[..., :k]
    return torch.zeros(s.shape, dtype=torch.bool).scatter_(-1, order, True)


def topk_overlap(a: Tensor, b: Tensor, k: int) -> Tensor:
    """``|topk(a) ∩ topk(b)| / k`` for two score vectors ``(..., N)`` (higher = more important).

    Ties inside a score vector go to the lower index. Returns ``(...)`` float64 in ``[0, 1]``.
    """
    sa, sb = _check_scores(a, "a"), _check_scores(b, "b")
    _check_same_shape(sa, sb, "a", "b")
    k = _check_k(k, sa.shape[-1])
    both = _topk_mask(sa, k) & _topk_mask(sb, k)
    return both.sum(-1).to(torch.float64) / k


def _average_ranks(x: Tensor) -> Tensor:
    """1-based ranks with ties averaged (as scipy.stats.rankdata). (..., N) -> (..., N) float64.

    O(N^2) memory per row, which is fine for encoder token counts (a few thousand at most) and keeps
    the tie handling exact without a sort-and-scan.
    """
    less = (x.unsqueeze(-1) > x.unsqueeze(-2)).sum(-1)  # how many values are strictly smaller
    equal = (x.unsqueeze(-1) == x.unsqueeze(-2)).sum(-1)  # includes the value itself
    return less.to(torch.float64) + (equal.to(torch.float64) + 1.0) / 2.0


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman rank correlation of two score vectors ``(..., N)`` -> ``(...)`` float64.

    Pearson correlation of the tie-averaged ranks (matches ``scipy.stats.spearmanr``); NaN where one
    input is constant (as scipy).
    """
    sa, sb = _check_scores(a, "a", min_n=2), _check_scores(b, "b", min_n=2)
    _check_same_shape(sa, sb, "a", "b")
    ra, rb = _average_ranks(sa), _average_ranks(sb)
    ra = ra - ra.mean(-1, keepdim=True)
    rb = rb - rb.mean(-1, keepdim=True)
    return (ra * rb).sum(-1) / torch.sqrt((ra * ra).sum(-1) * (rb * rb).sum(-1))


def kendall_tau(a: Tensor, b: Tensor) -> Tensor:
    """Kendall's tau-b of two score vectors ``(..., N)`` -> ``(...)`` float64.

    Tie-corrected (matches ``scipy.stats.kendalltau``'s default); NaN where one input is constant.
    """
    sa, sb = _check_scores(a, "a", min_n=2), _check_scores(b, "b", min_n=2)
    _check_same_shape(sa, sb, "a", "b")
    n = sa.shape[-1]
    dx = torch.sign(sa.unsqueeze(-1) - sa.unsqueeze(-2))  # (..., N, N)
    dy = torch.sign(sb.unsqueeze(-1) - sb.unsqueeze(-2))
    concordant_minus_discordant = (dx * dy).sum((-2, -1)) / 2.0  # each pair is counted twice
    n0 = n * (n - 1) / 2.0
    tied_x = ((dx == 0).sum((-2, -1)).to(torch.float64) - n) / 2.0  # minus the diagonal
    tied_y = ((dy == 0).sum((-2, -1)).to(torch.float64) - n) / 2.0
    return concordant_minus_discordant / torch.sqrt((n0 - tied_x) * (n0 - tied_y))


@dataclass(frozen=True)
class CriteriaDisagreement:
    """Pairwise agreement between token-importance criteria (Fig. 4). Matrices are symmetric."""

    names: tuple[str, ...]
    k: int
    overlap: Tensor  # (..., C, C) float64 top-k overlap, 1 on the diagonal
    spearman: Tensor  # (..., C, C) float64
    kendall: Tensor  # (..., C, C) float64


def pairwise_agreement(scores: Mapping[str, Tensor], k: int) -> CriteriaDisagreement:
    """Top-k overlap, Spearman and Kendall between every pair of named score vectors ``(..., N)``."""
    if len(scores) < 2:
        raise ValueError("scores needs at least two criteria")
    names = tuple(scores)
    vals = [_check_scores(scores[name], name) for name in names]
    for name, v in zip(names[1:], vals[1:], strict=True):
        _check_same_shape(vals[0], v, names[0], name)
    k = _check_k(k, vals[0].shape[-1])
    c = len(names)
    batch = vals[0].shape[:-1]
    out = {key: torch.empty(*batch, c, c, dtype=torch.float64) for key in ("overlap", "spearman", "kendall")}
    for i in range(c):
        for j in range(i, c):
            pair = (
                ("overlap", topk_overlap(vals[i], vals[j], k)),
                ("spearman", spearman(vals[i], vals[j])),
                ("kendall", kendall_tau(vals[i], vals[j])),
            )
            for key, value in pair:
                out[key][..., i, j] = value
                out[key][..., j, i] = value
    return CriteriaDisagreement(names, k, out["overlap"], out["spearman"], out["kendall"])


def criteria_disagreement(
    attn_row: Tensor, semantic_row: Tensor, value_norm: Tensor, k: int
) -> CriteriaDisagreement:
    """Fig. 4: how much the attention, semantic and value-norm criteria agree on the top-k patches.

    Inputs as :func:`criteria_rankings` (``(..., N)`` each, e.g. ``(L, N)`` for a per-layer plot).
    Low overlap / correlation means the criteria pick different tokens ("contradictory results").
    Matrices are ordered as :data:`CRITERIA`.
    """
    return pairwise_agreement(_criteria_scores(attn_row, semantic_row, value_norm), k)


# --------------------------------------------------------------------------- Figs. 6, 7: value norms
def value_l1_norm(v: Tensor) -> Tensor:
    """Information density of each token: L1 norm of its head-averaged value vector (SPEC score 3).

    ``v``: ``(..., H, T, d)`` per-head values -> ``(..., T)`` float64.
    """
    x = _as_float64(v, "v")
    if x.ndim < 3:
        raise ValueError(f"v must have shape (..., H, T, d), got {tuple(x.shape)}")
    return x.mean(-3).abs().sum(-1)


@dataclass(frozen=True)
class ValueNormSummary:
    """Box-plot statistics of per-layer value L1 norms (Fig. 7). Each field is ``(L,)``."""

    mean: Tensor  # float64
    q1: Tensor  # float64, 25th percentile (linear interpolation, as numpy / matplotlib)
    median: Tensor  # float64
    q3: Tensor  # float64, 75th percentile
    whislo: Tensor  # float64, smallest value >= q1 - whis * IQR (q1 if that is above q1)
    whishi: Tensor  # float64, largest value <= q3 + whis * IQR (q3 if that is below q3)
    count: Tensor  # int64, number of values (tokens) in the layer
    fliers: tuple[Tensor, ...]  # per layer, the values outside the whiskers (sorted)

    def bxp_stats(self, labels: Sequence[str] | None = None) -> list[dict[str, object]]:
        """The statistics as the list of dicts that ``matplotlib.axes.Axes.bxp`` takes."""
        n = self.mean.numel()
        if labels is not None and len(labels) != n:
            raise ValueError(f"labels has {len(labels)} entries for {n} layers")
        return [
            {
                "label": labels[i] if labels is not None else str(i),
                "mean": float(self.mean[i]),
                "med": float(self.median[i]),
                "q1": float(self.q1[i]),
                "q3": float(self.q3[i]),
                "whislo": float(self.whislo[i]),
                "whishi": float(self.whishi[i]),
                "fliers": self.fliers[i].tolist(),
            }
            for i in range(n)
        ]


def value_norm_summary(v_norms: Sequence[Tensor], whis: float = TUKEY_WHIS) -> ValueNormSummary:
    """Box-plot statistics for a list of per-layer value-norm tensors (Fig. 7, before / after pruning).

    ``v_norms[l]``: any shape (e.g. ``(N_l,)`` or ``(B, N_l)``), flattened; layers may have different
    token counts (pruning shrinks them). Whiskers follow Tukey / matplotlib: they reach the most
    extreme data point within ``whis * IQR`` of the box.
    """
    if isinstance(v_norms, Tensor) or len(v_norms) == 0:
        raise ValueError("v_norms must be a non-empty sequence of tensors (one per layer)")
    if not (whis >= 0 and math.isfinite(whis)):
        raise ValueError(f"whis must be a finite non-negative number, got {whis!r}")
    fields: dict[str, list[Tensor]] = {k: [] for k in ("mean", "q1", "median", "q3", "whislo", "whishi")}
    counts: list[int] = []
    fliers: list[Tensor] = []
    probs = torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)
    for layer, vals in enumerate(v_norms):
        x = _as_float64(vals, f"v_norms[{layer}]").flatten()
        if x.numel() == 0:
            raise ValueError(f"v_norms[{layer}] is empty")
        q1, med, q3 = torch.quantile(x, probs)  # linear interpolation, numpy's default
        lo_fence, hi_fence = q1 - whis * (q3 - q1), q3 + whis * (q3 - q1)
        lo_ok, hi_ok = x >= lo_fence, x <= hi_fence
        # As matplotlib.cbook.boxplot_stats: a whisker never ends inside the box (possible when no
        # data point lies within the fence, e.g. whis=0 with few points), it falls back to the quartile.
        whislo = torch.minimum(x[lo_ok].min(), q1) if bool(lo_ok.any()) else q1
        whishi = torch.maximum(x[hi_ok].max(), q3) if bool(hi_ok.any()) else q3
        fields["mean"].append(x.mean())
        fields["q1"].append(q1)
        fields["median"].append(med)
        fields["q3"].append(q3)
        fields["whislo"].append(whislo)
        fields["whishi"].append(whishi)
        counts.append(x.numel())
        fliers.append(torch.sort(x[(x < whislo) | (x > whishi)]).values)
    stacked = {k: torch.stack(v) for k, v in fields.items()}
    return ValueNormSummary(count=torch.tensor(counts, dtype=torch.int64), fliers=tuple(fliers), **stacked)
