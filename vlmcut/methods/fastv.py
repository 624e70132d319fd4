"""FastV (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", ECCV 2024).

Reproduced: at decoder layer ``K`` (paper default ``K = 2``) the visual tokens are ranked by the attention
the last prompt token pays them in layer ``K - 1`` (softmax over every token it sees, averaged over heads)
and only the top ones go on; earlier layers see every token. Only that one attention row is formed, so the
layer keeps SDPA (the official code switches the model to eager attention to read the full matrix).

Differences: the paper keeps a ratio ``R`` of all visual tokens of the sequence; here ``keep`` is a count
per image (the same count for every image, as the other methods). Accounting: the visual tokens of layers
``0 .. K-1`` are not pruned, so the average over layers is above ``keep`` (as in the paper's tables).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import MethodSpec, check_int, check_keep, register_method
from .llm_base import LLMContext, last_token_attention, top_per_image


@dataclass(frozen=True)
class FastVConfig:
    """Settings of FastV.

    Args:
        keep: visual tokens per image from decoder layer ``layer`` on.
            On Qwen2-VL / Qwen2.5-VL also a float ratio in (0, 1] of each image's merged tokens.
        layer: ``K``: tokens are dropped before decoder layer ``K`` (at the output of layer ``K - 1``),
            ranked by layer ``K - 1``'s attention. Paper default 2.
    """

    keep: int | float
    layer: int = 2

    def __post_init__(self) -> None:
        check_keep(self.keep)
        check_int("layer", self.layer, 1)


class FastVSelector:
    def __init__(self, config: FastVConfig, keep: int | None = None) -> None:
        self.config = config
        self.keep = config.keep if keep is None else keep

    def prune_layers(self, num_layers: int, num_visual: int) -> list[int]:
        if self.config.layer > num_layers - 1:
            raise ValueError(f"FastV layer={self.config.layer} must be < {num_layers} (the decoder depth)")
        return [self.config.layer - 1]

    def select(self, ctx: LLMContext) -> torch.Tensor | None:
        if int(ctx.visual_counts().max()) <= self.keep:
            return None
        with torch.no_grad():
            return top_per_image(last_token_attention(ctx), ctx, self.keep)


register_method(
    MethodSpec(
        "fastv",
        FastVConfig,
        make_selector=None,
        make_llm_selector=lambda cfg, keep: FastVSelector(cfg, keep),
    )
)
