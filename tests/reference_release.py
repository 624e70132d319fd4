"""An independent re-statement of the authors' released CLIP encoder pass (eager, full T x T attention).

It follows the release's order of operations (query scaled before the product, softmax over the full
attention matrix, CLS row read from it, per-layer pruning after the MLP, ``target`` counting the CLS
token) on the weights of a transformers ``CLIPVisionModel``, so that our hook-based implementation can be
compared with it in float64. Test-only code.
"""

from __future__ import annotations

import torch
from transformers import CLIPVisionModel


def _release_prune_count(cls_attn: torch.Tensor, rpl: int, target_patches: int) -> int:
    n = cls_attn.shape[-1]
    prob = cls_attn / cls_attn.sum(dim=-1, keepdim=True)
    entropy = -torch.sum(prob * torch.log(prob), dim=-1)
    ratio = entropy / torch.log(torch.tensor(n))
    r = (n - target_patches) / rpl**0.5 * (1 - ratio**2)
    if r.shape[0] > 1:
        r = r.max(0).values
    return int(r.round())


def release_forward(
    model: CLIPVisionModel, pixel_values: torch.Tensor, keep: int, select_layer: int
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Return (hidden states: embeddings + every layer output, kept patch indices (B, keep)).

    ``select_layer`` is the release's ``encoder.select_layer`` (``L - 2`` for LLaVA); ``keep`` patches plus
    the CLS token survive (the release's ``target = keep + 1``).
    """
    target = keep + 1
    h = model.pre_layrnorm(model.embeddings(pixel_values))
    b = h.shape[0]
    all_keep = torch.arange(h.shape[1]).unsqueeze(0).expand(b, -1)
    cumulative = None
    states = [h]
    for idx, layer in enumerate(model.encoder.layers):
        rpl = select_layer - idx - 1
        attn = layer.self_attn
        t = h.shape[1]
        residual = h
        x = layer.layer_norm1(h)
        heads, d = attn.num_heads, attn.head_dim
        q = (attn.q_proj(x) * attn.scale).view(b, t, heads, d).transpose(1, 2)
        k = attn.k_proj(x).view(b, t, heads, d).transpose(1, 2)
        v = attn.v_proj(x).view(b, t, heads, d).transpose(1, 2)
        weights = torch.softmax(q @ k.transpose(-1, -2), dim=-1)  # (B, H, T, T)
        semantic = torch.softmax(v[:, :, :1] @ v.transpose(-1, -2), dim=-1).mean(1)[:, 0]  # (B, T)
        v_metric = v.mean(1)  # (B, T, d)
        out = (weights @ v).transpose(1, 2).reshape(b, t, heads * d)
        h = residual + attn.out_proj(out)
        h = h + layer.mlp(layer.layer_norm2(h))
        if h.shape[1] > target:
            cls_attn = weights[:, :, 0, 1:].mean(dim=1)
            rel = cls_attn / cls_attn.sum(-1, keepdim=True)
            sem = semantic[:, 1:] / semantic[:, 1:].sum(-1, keepdim=True)
            scores = (rel + sem) * torch.norm(v_metric[:, 1:], p=1, dim=-1)
            cumulative = scores.clone() if cumulative is None else 0.5 * cumulative + 0.5 * scores
            if not rpl % 2:
                prune = _release_prune_count(cls_attn, rpl, target - 1) if rpl else h.shape[1]
                n_keep = max(h.shape[1] - prune, target)
                keep_idx = torch.topk(cumulative, n_keep - 1, dim=1).indices.sort(dim=1).values
                patches = torch.gather(h[:, 1:], 1, keep_idx.unsqueeze(-1).expand(-1, -1, h.shape[-1]))
                cumulative = torch.gather(cumulative, 1, keep_idx)
                all_keep = torch.gather(all_keep, 1, keep_idx)
                h = torch.cat([h[:, :1], patches], dim=1)
        states.append(h)
    return states, all_keep
