"""Memory of one prefill: the peak above what was held before it, and the bytes a KV cache holds."""

from __future__ import annotations

import os
import threading
from typing import Any

import torch

_RSS_POLL_S = 0.005


class PeakMemory:
    """Peak memory above the level at :meth:`start`: CUDA allocator stats, or sampled RSS on Linux."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._base = 0
        self._peak = 0
        self._page = 4096
        try:
            self._page = os.sysconf("SC_PAGE_SIZE")
            self._statm = open("/proc/self/statm", "rb")  # noqa: SIM115 - closed in stop()
        except (OSError, ValueError, AttributeError):
            self._statm = None

    @property
    def available(self) -> bool:
        return self.device.type == "cuda" or self._statm is not None

    def describe(self) -> str:
        """What the measured peak is, for the report."""
        if self.device.type == "cuda":
            return "CUDA max_memory_allocated during the prefill, above the memory held before it"
        if self._statm is None:
            return "n/a: no /proc/self/statm on this OS (tracemalloc does not see torch's allocations)"
        return (
            f"peak RSS growth during the prefill, sampled every {1e3 * _RSS_POLL_S:.0f} ms from "
            "/proc/self/statm (a lower bound: the allocator reuses memory it already holds; tracemalloc does "
            "not see torch and ru_maxrss is a lifetime high-water mark)"
        )

    def _rss(self) -> int:
        assert self._statm is not None
        self._statm.seek(0)
        return int(self._statm.read().split()[1]) * self._page

    def _poll(self) -> None:
        while not self._stop.wait(_RSS_POLL_S):
            self._peak = max(self._peak, self._rss())

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        elif self._statm is not None:
            self._base = self._peak = self._rss()
            self._stop.clear()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()

    def stop(self) -> int | None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self._base
        if self._thread is None:
            return None
        self._stop.set()
        self._thread.join()
        self._thread = None
        self._peak = max(self._peak, self._rss())
        return self._peak - self._base

    def close(self) -> None:
        if self._statm is not None:
            self._statm.close()
            self._statm = None


def cache_bytes(cache: Any) -> int | None:
    """Bytes held by a ``transformers`` KV cache (``DynamicCache.layers[i].keys/values`` or legacy tuples)."""
    if cache is None:
        return None
    total = 0
    layers = getattr(cache, "layers", None)
    if layers is not None:
        for layer in layers:
            for name in ("keys", "values"):
                t = getattr(layer, name, None)
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
        return total
    if isinstance(cache, (tuple, list)):
        for item in cache:
            for t in item if isinstance(item, (tuple, list)) else (item,):
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
        return total
    return None


__all__ = ["PeakMemory", "cache_bytes"]
