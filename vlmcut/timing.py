"""Wall-clock time of each stage of a VLM call (vision tower, language-model prefill, decode steps).

Forward hooks on the model's own submodules; nothing is patched. CUDA is synchronised around each stage
when the model is on a GPU so that the times are real.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class StageTimes:
    """Seconds spent per stage in the timed block."""

    vision: list[float] = field(default_factory=list)  # one entry per vision-tower call
    llm: list[float] = field(default_factory=list)  # one entry per language-model call: [prefill, decode...]

    @property
    def prefill(self) -> float:
        """The first language-model call (the prompt), vision excluded."""
        return self.llm[0] if self.llm else 0.0

    @property
    def decode_per_token(self) -> float:
        steps = self.llm[1:]
        return sum(steps) / len(steps) if steps else 0.0

    def as_dict(self) -> dict[str, float]:
        return {
            "vision_s": sum(self.vision),
            "llm_prefill_s": self.prefill,
            "decode_per_token_s": self.decode_per_token,
            "decode_steps": float(max(len(self.llm) - 1, 0)),
        }


def _sync(module: nn.Module) -> None:
    p = next(module.parameters(), None)
    if p is not None and p.device.type == "cuda":
        torch.cuda.synchronize(p.device)


class StageTimer:
    """``with StageTimer(vision_tower, language_model) as t: model.generate(...)`` then ``t.times``."""

    def __init__(self, vision: nn.Module, llm: nn.Module) -> None:
        self.modules = {"vision": vision, "llm": llm}
        self.times = StageTimes()
        self._handles: list = []
        self._t0: dict[str, float] = {}

    def __enter__(self) -> StageTimer:
        for name, mod in self.modules.items():
            self._handles.append(mod.register_forward_pre_hook(self._start(name)))
            self._handles.append(mod.register_forward_hook(self._stop(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _start(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            _sync(module)
            self._t0[name] = time.perf_counter()

        return hook

    def _stop(self, name: str):
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            _sync(module)
            getattr(self.times, name).append(time.perf_counter() - self._t0.pop(name))

        return hook
