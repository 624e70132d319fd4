"""The real token counts of one forward: what enters every encoder layer and every decoder layer.

Forward hooks on the modules a model adapter names (:class:`~vlmcut.models.registry.ModelParts`), used in
untimed set-up passes only; the benchmark turns the counts into analytic FLOPs and KV-cache bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..models.registry import ModelParts


def forward_once(model: nn.Module, inputs: dict[str, torch.Tensor], logits_to_keep: bool) -> None:
    """One untimed prefill without a cache (``logits_to_keep``: the model takes it; last position only)."""
    with torch.inference_mode():
        model(**inputs, use_cache=False, **({"logits_to_keep": 1} if logits_to_keep else {}))


@dataclass(frozen=True)
class PromptCounts:
    """Real token counts of one prompt of the batch in one forward."""

    vision: list[list[int]]  # per encoder pass (image / crop): sequence entering every encoder layer
    llm_visual: list[int]  # visual tokens entering every decoder layer
    text: int  # non-visual tokens (every decoder layer)


class TokenCounter:
    """Forward hooks (set-up passes only, never while timing) that record the real token counts.

    * every encoder layer's input: CLIP ``(n, T, D)`` = ``n`` sequences of ``T``; a Qwen2-VL block's packed
      ``(T, D)`` (``ModelParts.packed_vision``) split by its ``cu_seqlens`` (one segment per image), as the
      pruning hooks hand them over;
    * the language model's input: real tokens per row (its 2-D ``attention_mask``);
    * after every decoder layer, how many prune stages ``llm_record()`` holds (``LLMPassRecord``; ``None``
      for methods that do not prune in the LLM), so that each stage's ``kept_positions`` is tied to the
      layer at whose output it was cut.
    """

    def __init__(self, parts: ModelParts, llm_record: Callable[[], Any]) -> None:
        self.parts = parts
        self.llm_record = llm_record
        self.calls: list[list[list[int]]] = []  # per tower call, per layer: sequence lengths
        self.valid: torch.Tensor | None = None  # (B, T) real tokens entering the language model
        self.stages_after: list[int] = []
        self._layer_calls = 0  # encoder layer calls in the current tower call
        self._handles: list[Any] = []

    def __enter__(self) -> TokenCounter:
        p = self.parts
        self._handles.append(p.vision.register_forward_pre_hook(self._on_vision))
        for layer in p.vision_layers:
            self._handles.append(layer.register_forward_pre_hook(self._on_vision_layer, with_kwargs=True))
        self._handles.append(p.llm.register_forward_pre_hook(self._on_llm, with_kwargs=True))
        for layer in p.llm_layers:
            self._handles.append(layer.register_forward_hook(self._on_llm_layer))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _on_vision(self, module: nn.Module, args: tuple) -> None:
        self.calls.append([])
        self._layer_calls = 0

    def _on_vision_layer(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        if self.parts.packed_vision:
            cu = kwargs.get("cu_seqlens")
            lengths = [int(hidden.shape[0])] if cu is None else (cu[1:] - cu[:-1]).tolist()
        else:
            lengths = [int(hidden.shape[1])] * int(hidden.shape[0])
        # A tower that runs one image at a time (FlowCut, per-image counts) calls every layer once per
        # image within one tower call: those sequences belong to the same layer.
        layer = self._layer_calls % len(self.parts.vision_layers)
        self._layer_calls += 1
        if self._layer_calls <= len(self.parts.vision_layers):
            self.calls[-1].append(lengths)
        else:
            self.calls[-1][layer] = self.calls[-1][layer] + lengths

    def _on_llm(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.valid is not None:
            return  # only the prefill
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            embeds = args[0] if args else kwargs["input_ids"]
        b, t = embeds.shape[:2]
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape == (b, t):
            self.valid = mask.bool()
        else:
            self.valid = torch.ones(b, t, dtype=torch.bool, device=embeds.device)

    def _on_llm_layer(self, module: nn.Module, args: tuple, output: Any) -> None:
        record = self.llm_record()
        self.stages_after.append(len(record.kept_positions) if record is not None else 0)

    def prompts(self, text: Sequence[int]) -> list[PromptCounts]:
        """The counts per prompt; ``text[r]``: the non-visual tokens of row ``r``."""
        batch = len(text)
        per_row: list[list[list[int]]] = [[] for _ in range(batch)]
        for call in self.calls:
            if len({len(layer) for layer in call}) > 1:
                raise RuntimeError(f"encoder sequences changed in number between layers: {call}")
            seqs = [list(s) for s in zip(*call, strict=True)]  # per sequence: length entering each layer
            if len(seqs) % batch:  # cannot happen with one image per row; totals stay right either way
                per_row[0] += seqs
                continue
            n = len(seqs) // batch  # crops / images are passed row by row
            for r in range(batch):
                per_row[r] += seqs[r * n : (r + 1) * n]
        if self.valid is None:
            raise RuntimeError("the language model did not run in the set-up pass")
        record = self.llm_record()
        stages = list(record.kept_positions) if record is not None else []
        num_layers = len(self.parts.llm_layers)
        if len(self.stages_after) != num_layers or (
            self.stages_after and self.stages_after[-1] != len(stages)
        ):
            raise RuntimeError(
                f"counted {self.stages_after} prune stages after the decoder layers but the language-model "
                f"record holds {len(stages)}"
            )
        valid = self.valid
        totals: list[torch.Tensor] = []  # per layer: (B,) real tokens entering it
        for layer in range(num_layers):
            done = self.stages_after[layer - 1] if layer else 0
            if done == 0:
                totals.append(valid.sum(dim=1))
            else:
                kept = stages[done - 1].to(valid.device)  # (B, T') original positions, -1 for fillers
                real = (kept >= 0) & torch.gather(valid, 1, kept.clamp(min=0))
                totals.append(real.sum(dim=1))
        return [
            PromptCounts(per_row[r], [int(t[r]) - int(text[r]) for t in totals], int(text[r]))
            for r in range(batch)
        ]


def count_tokens(
    model: nn.Module,
    parts: ModelParts,
    inputs: dict[str, torch.Tensor],
    text: Sequence[int],
    llm_record: Callable[[], Any],
    logits_to_keep: bool,
) -> list[PromptCounts]:
    """One untimed forward of ``model`` (pruning attached by the caller) with the counting hooks on."""
    with TokenCounter(parts, llm_record) as counter:
        forward_once(model, inputs, logits_to_keep)
    return counter.prompts(text)


__all__ = ["PromptCounts", "TokenCounter", "count_tokens", "forward_once"]
