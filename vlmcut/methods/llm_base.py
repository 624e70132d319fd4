"""What a method sees when it prunes inside the language model, and the scores several methods share.

Pure tensor code: no model plumbing (that is :mod:`vlmcut.models.llm`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class LLMContext:
    """What a selector sees at a prune layer (current, possibly already pruned, sequence of length T)."""

    layer: int
    q: torch.Tensor  # (B, H, T, d), RoPE applied
    k: torch.Tensor  # (B, Hkv, T, d), RoPE applied
    v: torch.Tensor  # (B, Hkv, T, d)
    scale: float
    visual: torch.Tensor  # (B, T) bool: visual tokens the selector may drop
    valid: torch.Tensor  # (B, T) bool: real tokens (not padding / fillers)
    query_index: torch.Tensor  # (B,) long: index (in this sequence) of the last prompt token
    image_index: torch.Tensor  # (B, T) long: which image of its row a visual token belongs to, -1 elsewhere
    hidden: torch.Tensor  # (B, T, D): the layer's output

    def visual_counts(self) -> torch.Tensor:
        """(B, I) visual tokens per image of each row (I = most images in a row)."""
        n_img = int(self.image_index.max()) + 1 if self.visual.any() else 0
        idx = self.image_index.clamp(min=0)
        counts = torch.zeros(self.visual.shape[0], max(1, n_img), dtype=torch.long, device=idx.device)
        return counts.scatter_add_(1, idx, self.visual.long())


@dataclass
class LLMSelection:
    """A selector's answer that also rewrites hidden states (e.g. SparseVLM's recycled tokens).

    ``keep``: (B, T) bool keep mask, as a plain mask answer. ``hidden``: (B, T, D) replacement for the
    layer's output (``None``: unchanged); only visual columns may differ from ``ctx.hidden``. A kept column
    keeps its original position whatever its new hidden state.
    """

    keep: torch.Tensor  # (B, T) bool
    hidden: torch.Tensor | None = None  # (B, T, D)


class LLMSelector(Protocol):
    """What a method implements to prune inside the language model.

    ``prune_layers(num_layers, num_visual)``: the decoder layers (0-based) at whose output it prunes, given
    the most visual tokens any image of the batch has; asked at the start of every prefill.
    ``select(ctx)``: at each of those layers, a (B, T) bool keep mask (visual columns only may be False),
    an :class:`LLMSelection` (a mask plus new hidden states for visual columns), or ``None`` to keep
    everything.
    """

    def prune_layers(self, num_layers: int, num_visual: int) -> Sequence[int]: ...

    def select(self, ctx: LLMContext) -> torch.Tensor | LLMSelection | None: ...


def top_per_image(scores: torch.Tensor, ctx: LLMContext, keep: int) -> torch.Tensor:
    """Keep mask: the ``keep`` highest-scoring visual tokens of every image, every non-visual token.

    scores: (B, T) (only visual entries are read). Images with ``<= keep`` visual tokens keep them all.
    """
    out = ~ctx.visual
    masked = scores.float().masked_fill(~ctx.visual, float("-inf"))
    for img in range(int(ctx.image_index.max()) + 1 if ctx.visual.any() else 0):
        of_img = ctx.visual & (ctx.image_index == img)
        n = of_img.sum(dim=1)  # (B,)
        k = min(keep, int(n.max()))
        if k == 0:
            continue
        s = masked.masked_fill(~of_img, float("-inf"))
        top = s.topk(k, dim=1).indices  # (B, k)
        chosen = torch.zeros_like(out).scatter_(1, top, True) & of_img
        out = out | chosen
    return out


def attention_row(ctx: LLMContext, query: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
    """Head-averaged softmax attention of one query per row over the masked keys.

    query: (B, H, d); key_mask: (B, T) bool -> (B, T) float32 (zero off the mask). GQA keys are shared by
    ``H / Hkv`` query heads, as in the model.
    """
    b, h, d = query.shape
    hkv = ctx.k.shape[1]
    k = ctx.k.repeat_interleave(h // hkv, dim=1) if hkv != h else ctx.k  # (B, H, T, d)
    logits = torch.einsum("bhd,bhtd->bht", query.float(), k.float()) * ctx.scale
    logits = logits.masked_fill(~key_mask[:, None, :], float("-inf"))
    return logits.softmax(dim=-1).nan_to_num(0.0).mean(dim=1)  # (B, T)


def last_token_attention(ctx: LLMContext) -> torch.Tensor:
    """(B, T): attention of the last prompt token over every real token (FastV, PDrop)."""
    rows = torch.arange(ctx.q.shape[0], device=ctx.q.device)
    query = ctx.q[rows, :, ctx.query_index]  # (B, H, d)
    return attention_row(ctx, query, ctx.valid & causal_keys(ctx))


def causal_keys(ctx: LLMContext) -> torch.Tensor:
    """(B, T) bool: the keys the last prompt token sees (not the tokens generated after it, which a
    forward without a KV cache carries along)."""
    cols = torch.arange(ctx.valid.shape[1], device=ctx.valid.device)
    return cols[None, :] <= ctx.query_index[:, None]
