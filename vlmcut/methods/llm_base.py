"""Scores several language-model methods share (FastV, PDrop, FlowCut's second stage); what a method sees
there is :class:`~vlmcut.methods.base.LLMContext`.

Pure tensor code: no model plumbing (that is :mod:`vlmcut.models.llm`).
"""

from __future__ import annotations

import torch

from .base import LLMContext, LLMSelection, LLMSelector

__all__ = [
    "LLMContext",
    "LLMSelection",
    "LLMSelector",
    "attention_row",
    "causal_keys",
    "last_token_attention",
    "top_per_image",
]


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
