"""The oracle: a method's choices on one input, recorded once and replayed with no scoring.

"The same model fed exactly the kept tokens, without the selection work." :func:`record_choices` prunes the
model with the method's spec wrapped (:func:`~vlmcut.bench.selection.map_selectors`) so that every selector
the model adapter builds records what it returns: per encoder pass, the indices kept after each layer
(:class:`RecordingSelector`); per prefill, the decoder layers and keep masks of a language-model stage
(:class:`RecordingLLMSelector`). :meth:`Recording.attach` then prunes the model through the same public
:func:`vlmcut.prune` with a *replaying* spec: the ``n``-th selector the adapter asks for replays the ``n``-th
recorded one (:class:`ReplaySelector`, :class:`ReplayLLMSelector`), which computes nothing. The adapter does
everything else exactly as for the method (hook plumbing, q/k/v capture, gathers, prompt surgery), so the
oracle's cost differs from the method's by the scoring alone. Any model family works unchanged, as long as
its adapter builds its selectors in the same order on the same input, which :meth:`Recording.verify` checks:
the replay must keep exactly the recorded tokens, in the tower and in the language model.

Token merging (a :class:`~vlmcut.methods.base.TokenMerge` answer) and language-model selectors that rewrite
hidden states cannot be replayed as gathers; recording them raises a ``TypeError``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..api import PruneHandle, prune
from ..methods.base import LLMContext, LLMSelection, MethodSpec
from .selection import Wrap, map_selectors


class RecordingSelector:
    """Wraps an encoder selector and records the indices it returns per layer (for the oracle's replay).

    One record per pass (``start``): a tower that runs one image at a time (FlowCut's per-image counts)
    makes one pass per image, and the replay repeats them in the same order. ``group`` (Qwen2-VL's merge
    units) is passed on; the recorded indices then count units."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.keep = inner.keep
        self.per_image_passes = bool(getattr(inner, "per_image_passes", False))
        self.passes: list[dict[int, torch.Tensor]] = []

    @property
    def steps(self) -> dict[int, torch.Tensor]:
        """The last pass's record."""
        return self.passes[-1] if self.passes else {}

    def start(self, consume_layer: int) -> None:
        self.passes.append({})
        self.inner.start(consume_layer)

    def needs_scores(self, num_patches: int) -> bool:
        return self.inner.needs_scores(num_patches)

    def step(self, layer: int, *args: Any, **kwargs: Any) -> torch.Tensor | None:
        """The wrapped selector's ``step`` (called exactly as the model calls this one), recorded."""
        idx = self.inner.step(layer, *args, **kwargs)
        if idx is not None:
            if not isinstance(idx, torch.Tensor):
                raise TypeError("the oracle replays index gathers; token merging cannot be replayed")
            self.passes[-1][layer] = idx.detach().clone()
        return idx


class ReplaySelector:
    """Oracle encoder selector: returns precomputed indices after the recorded layers; computes nothing.

    ``steps[layer]``: ``(B, n)`` indices the recorded selector returned at ``layer`` (patches, or merge units
    when the model passes ``group``). A list of such records replays one per pass, in order and cyclically
    (``per_image_passes``: the tower then runs one image at a time, as it did while recording)."""

    def __init__(
        self,
        steps: dict[int, torch.Tensor] | list[dict[int, torch.Tensor]],
        keep: int,
        per_image_passes: bool = False,
    ) -> None:
        self.passes = steps if isinstance(steps, list) else [steps]
        self.steps: dict[int, torch.Tensor] = self.passes[0] if self.passes else {}
        self.keep = keep
        self.per_image_passes = per_image_passes
        self._next = 0

    def start(self, consume_layer: int) -> None:
        if self.passes:
            self.steps = self.passes[self._next % len(self.passes)]
            self._next += 1

    def needs_scores(self, num_patches: int) -> bool:
        return num_patches > self.keep

    def step(self, layer: int, *_: Any, **__: Any) -> torch.Tensor | None:
        """The recorded indices after ``layer``, whatever the layer's ``q, k, v`` (and ``group``) are."""
        return self.steps.get(layer)


class RecordingLLMSelector:
    """Wraps a language-model selector and records its prune layers and keep masks (for the replay)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.layers: list[int] = []
        self.masks: dict[int, torch.Tensor] = {}

    def prune_layers(self, num_layers: int, num_visual: int) -> list[int]:
        self.layers = [int(i) for i in self.inner.prune_layers(num_layers, num_visual)]
        self.masks = {}
        return list(self.layers)

    def select(self, ctx: LLMContext) -> torch.Tensor | None:
        keep = self.inner.select(ctx)
        if isinstance(keep, LLMSelection):
            if keep.hidden is not None:
                raise TypeError(
                    "the oracle replays keep masks; a selector that rewrites tokens cannot be replayed"
                )
            keep = keep.keep
        if keep is not None:
            self.masks[ctx.layer] = keep.detach().clone()
        return keep


class ReplayLLMSelector:
    """Oracle language-model selector: the recorded ``(B, T)`` keep masks at the recorded layers; computes
    nothing."""

    def __init__(self, layers: Sequence[int], masks: dict[int, torch.Tensor]) -> None:
        self.layers = list(layers)
        self.masks = masks

    def prune_layers(self, num_layers: int, num_visual: int) -> list[int]:
        return list(self.layers)

    def select(self, ctx: LLMContext) -> torch.Tensor | None:
        keep = self.masks.get(ctx.layer)
        if keep is not None and keep.shape != ctx.visual.shape:
            raise RuntimeError(
                f"oracle replay at decoder layer {ctx.layer}: recorded mask {tuple(keep.shape)} for a sequence "
                f"of {tuple(ctx.visual.shape)}"
            )
        return keep


# One selector the adapter asked the spec for: the budget it asked with and the recorder (None: the method's
# factory built nothing for it).
_Made = tuple[int, Any]


@dataclass
class Recording:
    """What ``spec`` chose at ``keep`` on one forward: its selectors in the order the model adapter built them
    (vision and language model separately) and the handle's view of the result."""

    spec: MethodSpec
    keep: int
    vision: list[_Made] = field(default_factory=list)  # (budget, RecordingSelector | None)
    llm: list[_Made] = field(default_factory=list)  # (budget, RecordingLLMSelector | None)
    kept_indices: torch.Tensor | None = None
    tokens_per_layer: list[int] = field(default_factory=list)
    llm_kept_positions: list[torch.Tensor] = field(default_factory=list)

    def replay_spec(self) -> MethodSpec:
        """A spec whose ``n``-th vision selector replays the ``n``-th recorded one, and likewise in the
        language model (cyclically, so every forward with images replays the recorded one). Build a fresh one
        per attachment: the counters start at 0."""
        made = {"vision": 0, "language-model": 0}

        def take(kind: str, records: list[_Made], budget: int) -> Any:
            n = made[kind]
            made[kind] += 1
            if not records:
                raise RuntimeError(
                    f"oracle replay: the model asked for a {kind} selector but none was recorded"
                )
            recorded_budget, recorder = records[n % len(records)]
            if budget != recorded_budget:
                raise RuntimeError(
                    f"oracle replay: {kind} selector {n} was asked for a budget of {budget}, but the "
                    f"recorded one had {recorded_budget}; the replayed forward does not follow the recorded one"
                )
            return recorder

        def vision(make: Callable[[Any, int], Any], cfg: Any, budget: int) -> ReplaySelector | None:
            rec = take("vision", self.vision, budget)
            return None if rec is None else ReplaySelector(rec.passes, budget, rec.per_image_passes)

        def llm(make: Callable[[Any, int], Any], cfg: Any, budget: int) -> ReplayLLMSelector | None:
            rec = take("language-model", self.llm, budget)
            return None if rec is None else ReplayLLMSelector(rec.layers, rec.masks)

        return map_selectors(self.spec, vision, llm)

    def attach(self, model: nn.Module) -> PruneHandle:
        """Prune ``model`` with the replay (through :func:`vlmcut.prune`, as the method itself)."""
        return prune(model, self.replay_spec(), keep=self.keep)

    def verify(self, replayed: PruneHandle) -> None:
        """Raise a ``RuntimeError`` unless the forward just run under ``replayed`` kept exactly the recorded
        tokens: the same kept indices and per-layer counts in the tower, the same kept positions after every
        language-model stage."""
        what = f"oracle replay of {self.spec.name} on {type(replayed.model).__name__}"
        if not _same(self.kept_indices, replayed.kept_indices):
            raise RuntimeError(f"{what} did not reproduce {self.spec.name}'s kept indices")
        if list(self.tokens_per_layer) != list(replayed.tokens_per_layer):
            raise RuntimeError(f"{what} did not reproduce {self.spec.name}'s per-layer token counts")
        got = _kept_positions(replayed)
        want = self.llm_kept_positions
        if len(want) != len(got) or not all(_same(a, b) for a, b in zip(want, got, strict=True)):
            raise RuntimeError(f"{what} did not reproduce {self.spec.name}'s language-model stage")


def record_choices(model: nn.Module, spec: MethodSpec, keep: int, run: Callable[[], Any]) -> Recording:
    """Prune ``model`` with ``spec`` at ``keep``, call ``run()`` (one forward), and return what every selector
    the adapter built chose in it; the model is restored before this returns."""
    rec = Recording(spec, keep)

    def recording(wrapper: type, into: list[_Made]) -> Wrap:
        def build(make: Callable[[Any, int], Any], cfg: Any, budget: int) -> Any:
            inner = make(cfg, budget)
            into.append((budget, None if inner is None else wrapper(inner)))
            return into[-1][1]

        return build

    wrapped = map_selectors(
        spec, recording(RecordingSelector, rec.vision), recording(RecordingLLMSelector, rec.llm)
    )
    with prune(model, wrapped, keep=keep) as handle:
        run()
    rec.kept_indices = handle.kept_indices
    rec.tokens_per_layer = handle.tokens_per_layer
    rec.llm_kept_positions = _kept_positions(handle)
    return rec


def _kept_positions(handle: PruneHandle) -> list[torch.Tensor]:
    record = handle.llm_record
    return [] if record is None else list(record.kept_positions)


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is b
    return a.shape == b.shape and bool(torch.equal(a.cpu(), b.cpu()))


__all__ = [
    "Recording",
    "RecordingLLMSelector",
    "RecordingSelector",
    "ReplayLLMSelector",
    "ReplaySelector",
    "record_choices",
]
