"""Resumable evaluation results: one JSON line per finished (dataset, method, budget) cell.

A sweep over eight methods x three budgets x two 500-question sets is hours of CPU, so every cell is appended
to ``<dir>/cells/<dataset>.jsonl`` (flushed and synced) the moment it finishes, and a rerun of the same
command skips the cells already there. One file per dataset lets two processes sweep two datasets into the
same directory at once. Every line carries the fingerprint of the questions and of the model it was made
with; a store made with other questions or another model is refused rather than silently mixed.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["ResultStore", "cell_key", "data_fingerprint", "options_text"]


def data_fingerprint(samples: Sequence[Any]) -> str:
    """A short hash of the questions (ids, texts, answers, in order): paired comparisons need the same ones."""
    digest = hashlib.sha256()
    for s in samples:
        digest.update(f"{s.sample_id}\x1f{s.question}\x1f{s.answer}\x1e".encode())
    return f"{len(samples)}:{digest.hexdigest()[:16]}"


def options_text(options: dict[str, Any]) -> str:
    """``"mass=0.4,min_keep=8"``: a run's extra options, sorted by name."""
    return ",".join(f"{k}={options[k]}" for k in sorted(options))


def cell_key(method: str, keep: int | str | None, options: dict[str, Any] | None = None) -> str:
    """``"unpruned"``, ``"flowcut@64"``, ``"flowcut@auto[mass=0.9]"``: a cell's name inside one dataset."""
    if method == "unpruned":
        return "unpruned"
    text = f"{method}@{keep}"
    if options:
        text += f"[{options_text(options)}]"
    return text


class ResultStore:
    """The cells of one results directory, read once and appended to as cells finish."""

    def __init__(self, directory: str | Path, model_id: str) -> None:
        self.dir = Path(directory) / "cells"
        self.model_id = model_id

    def path(self, dataset: str) -> Path:
        return self.dir / f"{dataset}.jsonl"

    def load(self, dataset: str, fingerprint: str) -> dict[str, dict[str, Any]]:
        """The finished cells of ``dataset``; refuses a file made with other questions or another model."""
        path = self.path(dataset)
        cells: dict[str, dict[str, Any]] = {}
        if path.exists():
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line cut short when a run was killed mid-write
                    warnings.warn(
                        f"{path}:{number}: unreadable line ignored (that cell will be rerun)", stacklevel=2
                    )
                    continue
                if row.get("fingerprint") != fingerprint or row.get("model") != self.model_id:
                    raise ValueError(
                        f"{path} holds results for other questions or another model (its line {number}: "
                        f"questions {row.get('fingerprint')}, model {row.get('model')}; this run: questions "
                        f"{fingerprint}, model {self.model_id}); give another --out or delete that file"
                    )
                cells[row["cell"]] = row
        return cells

    def append(self, dataset: str, row: dict[str, Any]) -> None:
        """Write one finished cell and make it durable before the next one starts."""
        self.dir.mkdir(parents=True, exist_ok=True)
        data = (json.dumps({**row, "model": self.model_id}) + "\n").encode()
        # One write() on an O_APPEND descriptor: two processes appending cells of the same dataset (say, a
        # second sweep adding keep="auto" cells) never interleave inside a line.
        fd = os.open(self.path(dataset), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            written = os.write(fd, data)
            if written != len(data):
                raise OSError(f"short write to {self.path(dataset)} ({written} of {len(data)} bytes)")
            os.fsync(fd)
        finally:
            os.close(fd)

    @staticmethod
    def read_all(directory: str | Path) -> Iterable[dict[str, Any]]:
        """Every readable cell of every dataset in ``directory`` (for reports; no checks)."""
        for path in sorted((Path(directory) / "cells").glob("*.jsonl")):
            for line in path.read_text().splitlines():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    continue
