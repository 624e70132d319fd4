"""VisionZip (Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language Models", CVPR 2025).

Reproduced, in the encoder layer that produces the consumed features (LLaVA-1.5: ``hidden_states[-2]``),
on that layer's output:

* dominant tokens: the patches with the highest [CLS] attention (softmax over all keys, summed over heads
  in the release; here averaged, the same ranking), kept in their original order;
* contextual tokens: the remaining patches, in original order, get ``C`` evenly spaced targets (every
  ``max(1, R // C)``-th of the ``R`` remaining, the first ``C`` of them); every other remaining patch joins
  the target whose key is most similar (cosine of the layer's keys averaged over heads, then normalised,
  as the release's ``metric``); each group becomes one token.
* output: dominant tokens, then the contextual tokens in target order.

Default split (``contextual=None``): ``C = floor(5 K / 32 + 1/2)`` contextual tokens and ``K - C``
dominant ones, the ratio of every published LLaVA setting: 54 + 10 at 64 (the official README's
``visionzip(model, dominant=54, contextual=10)``), 108 + 20 at 128, 162 + 30 at 192 (the splits used by
reproductions of the paper's Table 1, e.g. LightCompress / llmc), 135 + 25 at 160 (LLaVA-NeXT, the
repository's issue #17).

Differences from the authors' code:

* Group merge: the default ``merge="release"`` follows the authors' code (its numbers are the published
  ones): a contextual token is ``target + mean(other members)``, about twice the scale of a token when the
  group has other members. ``merge="mean"`` averages each group, its target counted once.
* CLS: the release counts the CLS token as one of the ``dominant`` tokens and feeds it to the LLM even for
  LLaVA-1.5 (``dominant=54`` is CLS + 53 patches). Here the model's own ``vision_feature_select_strategy``
  decides: with ``"default"`` (HF LLaVA-1.5) CLS is dropped as in the unpruned model, so all ``K`` slots
  are patches (54 dominant + 10 contextual at 64); with ``"full"`` CLS is one of the ``K`` tokens and the
  split applies to the ``K - 1`` patches (53 + 10 at 64, the release's count).
* Only the CLS attention row is formed from the layer's ``q, k`` (no ``output_attentions``), in float32.
* Towers without a CLS token (SigLIP): the mean token's attention ranks the dominant tokens, as FasterVLM
  and FlowCut do here (see ``methods/fastervlm.py``).
* ``kept_indices``: a contextual token is recorded at its target patch's original position.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from .base import MethodSpec, check_int, register_method
from .fastervlm import ConsumedLayerSelector, global_attention, top_patches

MergeRule = Literal["mean", "release"]

# 10 contextual of 64 tokens (official README, LLaVA-1.5); 20/128, 30/192, 25/160 follow the same ratio.
CONTEXTUAL_FRACTION = 5 / 32


def default_split(keep: int) -> tuple[int, int]:
    """``(dominant, contextual)`` for ``keep`` tokens: 54 + 10 at 64, 108 + 20 at 128, 162 + 30 at 192."""
    contextual = math.floor(keep * CONTEXTUAL_FRACTION + 0.5)
    return keep - contextual, contextual


@dataclass(frozen=True)
class VisionZipConfig:
    """Settings of VisionZip.

    Args:
        keep: visual (patch) tokens per image for the consumer: dominant + contextual.
        contextual: how many of them are contextual (merged) tokens; ``None`` (default) uses
            :func:`default_split` (10 of 64, the official LLaVA-1.5 setting, scaled by ``5 / 32``).
            ``0`` keeps dominant tokens only; ``contextual == keep`` merges only.
        merge: ``"release"`` (default, the authors' code): ``target + mean(other members)``;
            ``"mean"``: a contextual token is the plain average of its group, target included.
    """

    keep: int
    contextual: int | None = None
    merge: MergeRule = "release"

    def __post_init__(self) -> None:
        check_int("keep", self.keep, 1)
        if self.contextual is not None:
            check_int("contextual", self.contextual, 0)
            if self.contextual > self.keep:
                raise ValueError(
                    f"contextual={self.contextual} is more than keep={self.keep}; contextual tokens are part "
                    f"of the kept tokens, so use contextual <= keep (or None for the default split)"
                )
        if self.merge not in ("mean", "release"):
            raise ValueError(
                f"merge must be 'mean' (average of the group, target included) or 'release' (the authors' "
                f"code: target + mean of the others), got {self.merge!r}"
            )


@dataclass(frozen=True)
class ContextualMerge:
    """Dominant patches kept as they are, then contextual tokens (satisfies ``methods.base.TokenMerge``)."""

    kept: torch.Tensor  # (B, D) dominant patch indices, ascending
    weights: torch.Tensor  # (B, C, N) averaging weights of each contextual token over the N patches
    sources: torch.Tensor  # (B, C) the target patch of each contextual token


def key_metric(k: torch.Tensor, has_cls: bool) -> torch.Tensor:
    """Keys averaged over heads, then L2-normalised, patches only. k: ``(B, H, T, d)`` -> ``(B, N, d)``."""
    keys = k.to(torch.promote_types(k.dtype, torch.float32)).mean(dim=1)  # (B, T, d)
    if has_cls:
        keys = keys[:, 1:]
    return torch.nn.functional.normalize(keys, dim=-1)


def target_slots(num_remaining: int, contextual: int, device: torch.device | None = None) -> torch.Tensor:
    """Evenly spaced targets among ``R`` remaining tokens: every ``max(1, R // C)``-th, the first ``C``."""
    step = max(1, num_remaining // contextual)
    return torch.arange(0, num_remaining, step, device=device)[:contextual]


def assign_groups(metric: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Group of every remaining token: its most similar target (first on ties); targets are their own.

    metric: ``(B, R, d)`` normalised keys of the remaining tokens; slots: ``(C,)`` -> ``(B, R)`` in ``0..C-1``.
    """
    similarity = metric @ metric[:, slots].transpose(1, 2)  # (B, R, C)
    groups = similarity.argmax(dim=-1)
    groups[:, slots] = torch.arange(len(slots), device=groups.device)
    return groups


def group_weights(
    groups: torch.Tensor, slots: torch.Tensor, merge: MergeRule, dtype: torch.dtype
) -> torch.Tensor:
    """Averaging weights of each group over the remaining tokens. groups: ``(B, R)`` -> ``(B, C, R)``."""
    c = len(slots)
    members = torch.nn.functional.one_hot(groups, c).transpose(1, 2).to(dtype)  # (B, C, R)
    if merge == "mean":
        return members / members.sum(dim=-1, keepdim=True)  # >= 1: the target is a member
    rows = torch.arange(c, device=groups.device)
    others = members.clone()
    others[:, rows, slots] = 0
    weights = others / others.sum(dim=-1, keepdim=True).clamp(min=1)
    weights[:, rows, slots] = 1  # release: target + mean(others)
    return weights


def visionzip_plan(
    scores: torch.Tensor, metric: torch.Tensor, dominant: int, contextual: int, merge: MergeRule = "mean"
) -> ContextualMerge | torch.Tensor:
    """Dominant and contextual tokens of one layer's patches.

    scores: ``(B, N)`` global-token attention; metric: ``(B, N, d)`` normalised keys. Returns the dominant
    indices ``(B, dominant)`` alone when ``contextual == 0``, else a :class:`ContextualMerge`. Needs
    ``dominant + contextual <= N``.
    """
    b, n = scores.shape
    kept = top_patches(scores, dominant)  # (B, D)
    if contextual == 0:
        return kept
    rest_mask = torch.ones(b, n, dtype=torch.bool, device=scores.device).scatter_(1, kept, False)
    rest = rest_mask.nonzero()[:, 1].view(b, n - dominant)  # (B, R) ascending: nonzero is row-major
    slots = target_slots(n - dominant, contextual, scores.device)
    rest_metric = torch.gather(metric, 1, rest.unsqueeze(-1).expand(-1, -1, metric.shape[-1]))  # (B, R, d)
    groups = assign_groups(rest_metric, slots)
    w_rest = group_weights(groups, slots, merge, metric.dtype)  # (B, C, R)
    weights = w_rest.new_zeros(b, contextual, n).scatter_(
        2, rest.unsqueeze(1).expand(-1, contextual, -1), w_rest
    )
    return ContextualMerge(kept=kept, weights=weights, sources=rest[:, slots])


class VisionZipSelector(ConsumedLayerSelector):
    def __init__(self, config: VisionZipConfig, keep: int | None = None) -> None:
        super().__init__(config.keep if keep is None else keep)
        self.config = config
        if config.contextual is None:
            self.dominant, self.contextual = default_split(self.keep)
        elif config.contextual > self.keep:
            raise ValueError(
                f"contextual={config.contextual} but only {self.keep} patch tokens are kept per image (with "
                f"vision_feature_select_strategy='full' the CLS token takes one of keep={config.keep}); lower "
                f"contextual"
            )
        else:
            self.dominant, self.contextual = self.keep - config.contextual, config.contextual

    def select(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, has_cls: bool
    ) -> ContextualMerge | torch.Tensor:
        scores = global_attention(q, k, v, scale, has_cls)
        return visionzip_plan(
            scores, key_metric(k, has_cls), self.dominant, self.contextual, self.config.merge
        )


register_method(
    MethodSpec("visionzip", VisionZipConfig, make_selector=lambda cfg, keep: VisionZipSelector(cfg, keep))
)
