"""Selection time, measured inside a method's selectors, and the spec wrapping that makes it possible.

A :class:`~vlmcut.methods.base.MethodSpec` builds every selector a model adapter uses through its factories
(``make_selector``, ``make_llm_selector``, ``make_second_stage``). :func:`map_selectors` returns a spec whose
factories hand each selector through a wrapper, so the benchmark can time (:func:`timed_spec`), record or
replay (:mod:`vlmcut.bench.oracle`) what a method does without knowing how any model family wires it: the
spec goes through the public :func:`vlmcut.prune` like any other.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from typing import Any

import torch

from ..methods.base import MethodSpec

# (the spec's factory, the method's config, the budget it was asked for) -> the selector to hand out
Wrap = Callable[[Callable[[Any, int], Any], Any, int], Any]


def map_selectors(spec: MethodSpec, vision: Wrap, llm: Wrap) -> MethodSpec:
    """``spec`` whose vision-selector factory returns ``vision(make, cfg, keep)`` and whose language-model
    factories (``make_llm_selector``, ``make_second_stage``) return ``llm(make, cfg, keep)``. A factory the
    spec lacks stays ``None`` and every other field (name, ``merge_units``, ...) is kept, so the model
    adapters wire the wrapped spec exactly as the original."""

    def wrap(make: Callable[[Any, int], Any] | None, how: Wrap) -> Callable[[Any, int], Any] | None:
        if make is None:
            return None
        return lambda cfg, keep: how(make, cfg, keep)

    return dataclasses.replace(
        spec,
        make_selector=wrap(spec.make_selector, vision),
        make_llm_selector=wrap(spec.make_llm_selector, llm),
        make_second_stage=wrap(spec.make_second_stage, llm),
    )


class SelectionClock:
    """Adds up the time spent inside selector calls during one forward.

    CPU: wall clock around each call (the ops run synchronously). CUDA: a pair of timing events around each
    call, read once after the forward, so the measurement adds no synchronisation inside it; the interval
    between the events is the GPU time the selection occupies on the stream, including any gap its host code
    causes.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = torch.device(device).type == "cuda"
        self.reset()

    def reset(self) -> None:
        self._cpu_s = 0.0
        self._events: list[tuple[Any, Any]] = []
        self.calls = 0

    def __call__(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn(*args, **kwargs)
            end.record()
            self._events.append((start, end))
            return out
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        self._cpu_s += time.perf_counter() - t0
        return out

    def seconds(self) -> float:
        """Total time of the calls since :meth:`reset` (synchronises CUDA once to read the events)."""
        if self._events:
            torch.cuda.synchronize()
            return self._cpu_s + sum(s.elapsed_time(e) for s, e in self._events) / 1e3
        return self._cpu_s


class _TimedSelector:
    """An encoder selector (``step``) or language-model selector (``select``) whose calls a
    :class:`SelectionClock` times; every other attribute is the wrapped selector's, and the timed methods keep
    its signature."""

    def __init__(self, inner: Any, clock: SelectionClock) -> None:
        self.inner = inner
        for name in ("step", "select"):
            fn = getattr(inner, name, None)
            if callable(fn):
                setattr(self, name, self._timed(fn, clock))

    @staticmethod
    def _timed(fn: Callable[..., Any], clock: SelectionClock) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            return clock(fn, *args, **kwargs)

        return timed

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["inner"], name)


def timed_spec(spec: MethodSpec, clock: SelectionClock) -> MethodSpec:
    """``spec`` with every selector it builds wrapped so that ``clock`` times its calls."""

    def timed(make: Callable[[Any, int], Any], cfg: Any, keep: int) -> Any:
        inner = make(cfg, keep)
        return None if inner is None else _TimedSelector(inner, clock)

    return map_selectors(spec, timed, timed)


__all__ = ["SelectionClock", "Wrap", "map_selectors", "timed_spec"]
