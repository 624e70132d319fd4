"""Paired bootstrap intervals for accuracy differences between methods answering the same questions."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Interval", "paired_bootstrap"]


@dataclass(frozen=True)
class Interval:
    """``diff`` = mean(a) - mean(b) with its bootstrap ``level`` interval ``[lo, hi]``."""

    diff: float
    lo: float
    hi: float
    level: float = 0.95

    @property
    def excludes_zero(self) -> bool:
        return self.lo > 0 or self.hi < 0

    def text(self, scale: float = 100.0, digits: int = 1) -> str:
        """``"+1.2 [-0.4, +2.8]"`` (points when ``scale`` is 100)."""
        f = f"{{:+.{digits}f}}"
        return f"{f.format(scale * self.diff)} [{f.format(scale * self.lo)}, {f.format(scale * self.hi)}]"


def paired_bootstrap(
    a: Sequence[float], b: Sequence[float], n_boot: int = 4000, seed: int = 0, level: float = 0.95
) -> Interval:
    """Percentile interval of mean(a - b), resampling *questions* (the same draw for both methods).

    ``a`` and ``b`` are per-question scores (1 = right, 0 = wrong) of two methods on the same questions in
    the same order; pairing removes the question-difficulty variance both share.
    """
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape:
        raise ValueError(
            f"a and b must be per-question scores of the same questions, got {x.shape} and {y.shape}"
        )
    if x.size == 0:
        raise ValueError("no questions to compare; give at least one score per method")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 100:
        raise ValueError(f"n_boot must be an int >= 100, got {n_boot!r}")
    d = x - y
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    for start in range(0, n_boot, 500):  # bounded memory for large sets
        stop = min(n_boot, start + 500)
        idx = rng.integers(0, d.size, size=(stop - start, d.size))
        means[start:stop] = d[idx].mean(axis=1)
    tail = (1 - level) / 2
    lo, hi = np.quantile(means, [tail, 1 - tail])
    return Interval(float(d.mean()), float(lo), float(hi), level)
