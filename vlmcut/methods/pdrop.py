"""PyramidDrop (Xing et al., "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid
Visual Redundancy Reduction", CVPR 2025).

Reproduced: the decoder is cut into 4 stages at layers ``(8, 16, 24)`` of 32 (the paper's LLaVA-1.5 layer
list, scaled here to the model's depth); at the end of each stage the visual tokens are ranked by the
attention the last instruction token pays them (softmax over all tokens it sees, head-averaged, in the
stage's last layer) and a fraction ``lambda`` survives, so the stages hold ``N, N*l, N*l^2, N*l^3`` tokens.
Only that one attention row is formed (the official code computes it separately too).

Accounting (issue: staged methods are compared at equal *average* visual tokens over the LLM layers, as
the FlowCut paper's tables do): ``lambda`` is solved so that the layer-average equals ``keep``, instead of
the paper's fixed 0.5. When even ``lambda = 0`` cannot reach ``keep`` because the first stage alone holds
more (``N * l_1 / L > keep``), the stage boundaries move to layers ``(2, ...)`` evenly spaced (FastV's first
pruning layer); if that still cannot reach it, a ``ValueError`` says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .base import MethodSpec, check_keep, check_layers, check_ratio, register_method
from .llm_base import LLMContext, last_token_attention, top_per_image

PAPER_LAYERS = (8, 16, 24)  # of 32 decoder layers (LLaVA-1.5-7B), Sec. 4 of the paper
PAPER_DEPTH = 32
PAPER_LAMBDA = 0.5


@dataclass(frozen=True)
class PDropConfig:
    """Settings of PyramidDrop.

    Args:
        keep: the target *average* visual tokens per image over all decoder layers.
            On Qwen2-VL / Qwen2.5-VL also a float ratio in (0, 1] of each image's merged tokens.
        layers: decoder layers that start a new stage (tokens are dropped at the output of the layer before
            each); default the paper's (8, 16, 24) of 32 scaled to the model's depth.
        ratio: ``lambda``, the fraction kept at each stage; default ``None`` solves it from ``keep``. With
            an explicit ratio, ``keep`` only caps nothing and the paper's schedule is used as given.
    """

    keep: int | float
    layers: tuple[int, ...] | None = None
    ratio: float | None = None

    def __post_init__(self) -> None:
        check_keep(self.keep)
        if self.layers is not None:
            object.__setattr__(self, "layers", check_layers("layers", self.layers, 1))
        if self.ratio is not None:
            check_ratio("ratio (lambda)", self.ratio, 0, 1)


def stage_counts(n: int, depth: int, layers: Sequence[int], keep: float) -> tuple[list[int], float]:
    """Visual tokens per stage and the ``lambda`` giving a layer-average of ``keep`` (bisection).

    Stage ``s`` covers layers ``[layers[s-1], layers[s])`` (stage 0 starts at 0, the last ends at ``depth``).
    """
    bounds = [0, *layers, depth]
    lengths = [bounds[s + 1] - bounds[s] for s in range(len(bounds) - 1)]

    def average(lam: float) -> float:
        return sum(length * n * lam**s for s, length in enumerate(lengths)) / depth

    if average(0.0) > keep:
        raise ValueError(
            f"the first stage (layers 0..{layers[0] - 1}) alone averages {average(0.0):.1f} > keep={keep} "
            f"visual tokens; pass earlier layers"
        )
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if average(mid) < keep else (lo, mid)
    lam = (lo + hi) / 2
    return [max(1, round(n * lam**s)) for s in range(len(lengths))], lam


def default_layers(depth: int, n: int, keep: int) -> tuple[int, ...]:
    """The paper's layers scaled to ``depth``, or ``(2, ...)`` evenly spaced when those cannot reach ``keep``."""
    scaled = tuple(max(1, round(x * depth / PAPER_DEPTH)) for x in PAPER_LAYERS)
    if n * scaled[0] / depth <= keep:
        return scaled
    step = (depth - 2) / len(PAPER_LAYERS)
    return tuple(sorted({2 + round(step * s) for s in range(len(PAPER_LAYERS))}))


class PDropSelector:
    def __init__(self, config: PDropConfig, keep: int | None = None) -> None:
        self.config = config
        self.keep = config.keep if keep is None else keep
        self.depth = 0
        self.layers: tuple[int, ...] = ()
        self._counts: dict[int, int] = {}  # prune layer -> visual tokens per image after it

    def prune_layers(self, num_layers: int, num_visual: int) -> list[int]:
        """Drop at the output of the layer before every stage start."""
        self.depth = num_layers
        if self.config.layers is not None and max(self.config.layers) >= num_layers:
            raise ValueError(f"PDrop layers {self.config.layers} must be < the decoder depth {num_layers}")
        if num_visual <= self.keep:
            return []
        layers, counts = self.schedule(num_visual)
        self._counts = {start - 1: counts[s + 1] for s, start in enumerate(layers)}
        return sorted(self._counts)

    def schedule(self, n: int) -> tuple[tuple[int, ...], list[int]]:
        """(stage-start layers, tokens per stage) for ``n`` visual tokens per image."""
        layers = self.config.layers or default_layers(self.depth, n, self.keep)
        if self.config.ratio is not None:
            return layers, [max(1, round(n * self.config.ratio**s)) for s in range(len(layers) + 1)]
        counts, _ = stage_counts(n, self.depth, layers, self.keep)
        return layers, counts

    def select(self, ctx: LLMContext) -> torch.Tensor | None:
        target = self._counts.get(ctx.layer)
        if target is None or int(ctx.visual_counts().max()) <= target:
            return None
        with torch.no_grad():
            return top_per_image(last_token_attention(ctx), ctx, target)


register_method(
    MethodSpec(
        "pdrop",
        PDropConfig,
        make_selector=None,
        make_llm_selector=lambda cfg, keep: PDropSelector(cfg, keep),
    )
)
