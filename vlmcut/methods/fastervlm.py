"""FasterVLM (Zhang et al., "[CLS] Attention is All You Need for Training-Free Visual Token Pruning", 2024).

Reproduced: the patches are ranked by the [CLS] token's attention (softmax over all keys, the CLS column
included, then the patch columns; averaged over heads) in the encoder layer that produces the features the
model consumes (LLaVA-1.5: ``vision_feature_layer = -2``), the top ``keep`` are kept in their original
order and everything else is dropped before the projector. Pruning that layer's *output* means the kept
features are exactly the unpruned model's features at those positions.

Differences from the authors' code: only the CLS row of the attention is formed from the layer's own
``q, k`` (``O(T)`` per head), so the layer keeps SDPA / FlashAttention instead of being run with
``output_attentions=True``; scores are taken in float32 (float64 stays float64) rather than the model's
half precision. Towers without a CLS token (SigLIP) have no [CLS] attention: their global query is the mean
token's, as for FlowCut (``methods/flowcut.py`` ``global_query_value``), an extension the paper does not
cover. Encoder layers after the consumed one (LLaVA's last layer) run on the kept tokens only; their
output is not read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import MethodSpec, check_int, register_method
from .flowcut import attention_strength, global_query_value, score_dtype
from .reference import OneShotSelector


@dataclass(frozen=True)
class FasterVLMConfig:
    """Settings of FasterVLM.

    Args:
        keep: visual (patch) tokens per image for the consumer (the paper's ``576 * (1 - R)``).
    """

    keep: int

    def __post_init__(self) -> None:
        check_int("keep", self.keep, 1)


def global_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, has_cls: bool
) -> torch.Tensor:
    """The [CLS] (or mean-token) attention row over the patches, head-averaged.

    q, k, v: ``(B, H, T, d)`` -> ``(B, N)``, ``N = T - 1`` with a CLS token, else ``T``. The softmax runs over
    all ``T`` keys (CLS included), so the patch scores sum to less than 1 when there is a CLS token.
    """
    dtype = score_dtype(q.dtype)
    q_g, _ = global_query_value(q.to(dtype), v.to(dtype), has_cls)  # (B, H, d)
    return attention_strength(q_g, k.to(dtype), scale, has_cls)


def top_patches(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """The ``keep`` highest-scoring patches, in their original (raster) order. ``(B, N)`` -> ``(B, keep)``."""
    return scores.topk(keep, dim=-1).indices.sort(dim=-1).values


class ConsumedLayerSelector(OneShotSelector):
    """Base of the methods that act once, on the output of the consumed layer ``F`` (with ``F``'s own
    ``q, k, v``), i.e. on the features the model reads. Subclasses implement :meth:`select`."""

    layer_offset = 0


class FasterVLMSelector(ConsumedLayerSelector):
    def __init__(self, config: FasterVLMConfig, keep: int | None = None) -> None:
        super().__init__(config.keep if keep is None else keep)
        self.config = config

    def select(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, has_cls: bool
    ) -> torch.Tensor:
        return top_patches(global_attention(q, k, v, scale, has_cls), self.keep)


register_method(
    MethodSpec("fastervlm", FasterVLMConfig, make_selector=lambda cfg, keep: FasterVLMSelector(cfg, keep))
)
