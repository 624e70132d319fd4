"""Methods x budgets through lmms-eval, reported in the paper's Table 1 layout (``vlmcut lmms sweep``).

The model is loaded once; each run attaches one method (``vlmcut.prune``), evaluates every task in-process
with lmms-eval's ``simple_evaluate`` and takes the method off again. Accuracy, retention and agreement are
:class:`vlmcut.eval.runner.EvalResult` s, so the tables are ``vlmcut eval``'s own (``pivot_table``,
``markdown_table``, ``write_reports``); an efficiency table (visual tokens that reached the LLM, prefill
time) is written beside them.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmcut.eval.runner import EvalResult, retention, write_reports
from vlmcut.eval.scenes import normalize_answer

from .export import TASK_PREFIX
from .options import NO_PRUNING, check_method

# The metric read as a task's accuracy, in order of preference (lmms-eval's "<metric>,<filter>" keys).
ACCURACY_KEYS = ("acc,none", "exact_match,none", "accuracy,none", "pope_accuracy,none", "score,none")


@dataclass
class Efficiency:
    """Per run and task: means over its samples."""

    dataset: str
    method: str
    keep: int | float | None
    visual_tokens: float
    visual_tokens_final: float
    prefill_ms: float
    vision_ms: float


def task_accuracy(task_results: dict[str, Any]) -> float:
    """A task's accuracy from lmms-eval's results: the first of :data:`ACCURACY_KEYS`, else its first
    numeric metric that is not a standard error."""
    for key in ACCURACY_KEYS:
        if isinstance(task_results.get(key), (int, float)):
            return float(task_results[key])
    for key, value in task_results.items():
        if "," in key and "stderr" not in key and isinstance(value, (int, float)):
            return float(value)
    raise ValueError(f"no numeric metric in the task's results: {sorted(task_results)}")


def _answer(sample: dict[str, Any], doc: dict[str, Any] | None) -> str:
    resp = sample["filtered_resps"]
    resp = resp[0] if isinstance(resp, list) and resp else resp
    if isinstance(resp, (list, tuple)) or not isinstance(resp, str):
        return json.dumps(resp, default=str)
    if doc is not None and "vocabulary" in doc:
        return normalize_answer(resp, list(doc["vocabulary"]))
    return resp.strip()


def _docs(lm: Any, task: str) -> Any:
    splits = getattr(lm, "task_dict", {}).get(task) or {}
    return next(iter(splits.values()), None) if splits else None


def collect(
    lm: Any, out: dict[str, Any], tasks: Sequence[str], method: str, keep: Any, seconds: float
) -> tuple[list[EvalResult], list[Efficiency]]:
    """One run's :class:`EvalResult` and :class:`Efficiency` per task from ``simple_evaluate``'s output."""
    results, effs = [], []
    for task in tasks:
        samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
        docs = _docs(lm, task)
        per_family: dict[str, list[float]] = defaultdict(list)
        answers = []
        counts: list[dict[str, Any]] = []
        for s in samples:
            doc = docs[s["doc_id"]] if docs is not None else None
            family = str(doc["family"]) if doc is not None and "family" in doc else task
            score = next((s[k.split(",")[0]] for k in ACCURACY_KEYS if k.split(",")[0] in s), None)
            if isinstance(score, (int, float)):
                per_family[family].append(float(score))
            answers.append(_answer(s, doc))
            counts += [c for c in s.get("token_counts") or [] if isinstance(c, dict)]
        accuracy = task_accuracy(out["results"][task])
        fam = {f: sum(v) / len(v) for f, v in sorted(per_family.items())} or {task: accuracy}
        label = "unpruned" if method == NO_PRUNING else method
        results.append(
            EvalResult(
                task, label, None if method == NO_PRUNING else keep, len(samples), accuracy, fam, answers
            )
        )
        results[-1].seconds = seconds

        effs.append(
            Efficiency(
                task,
                label,
                results[-1].keep,
                _mean(counts, "visual_tokens"),
                _mean(counts, "visual_tokens_final"),
                1e3 * _mean(counts, "prefill_s"),
                1e3 * _mean(counts, "vision_s"),
            )
        )
    return results, effs


def _mean(counts: list[dict[str, Any]], key: str) -> float:
    values = [c[key] for c in counts if isinstance(c.get(key), (int, float))]
    return sum(values) / len(values) if values else float("nan")


def efficiency_table(rows: Sequence[Efficiency]) -> str:
    """Markdown: per task and run, visual tokens that entered the LLM, those left after its last pruning
    stage, and the prefill / vision time per sample."""
    head = ["task", "method", "keep", "visual tokens -> LLM", "after LLM pruning", "prefill ms", "vision ms"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        keep = "all" if r.keep is None else str(r.keep)
        cells = [r.dataset, r.method, keep, f"{r.visual_tokens:.1f}", f"{r.visual_tokens_final:.1f}"]
        lines.append("| " + " | ".join([*cells, f"{r.prefill_ms:.1f}", f"{r.vision_ms:.1f}"]) + " |")
    return "\n".join(lines)


def run_sweep(
    model: Any,
    processor: Any,
    tasks: Sequence[str],
    methods: Sequence[str],
    keeps: Sequence[int],
    include_path: str | Path | None = None,
    batch_size: int = 8,
    limit: int | None = None,
    chat: bool = True,
    progress: bool = True,
) -> tuple[list[EvalResult], list[Efficiency]]:
    """The unpruned model once, then every method x keep, on ``tasks`` through lmms-eval; retention and
    agreement are against the unpruned run, per task."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from .model import VlmcutChatLMM, VlmcutLMM

    if isinstance(tasks, str) or not tasks:
        raise ValueError(f"tasks must be a non-empty list of lmms-eval task names, got {tasks!r}")
    if isinstance(methods, str) or not methods:
        raise ValueError(f"methods must be a non-empty list of method names, got {methods!r}")
    for m in methods:
        check_method(m)
    if isinstance(keeps, (int, str)) or not keeps:
        raise ValueError(f"keeps must be a non-empty list of ints >= 1, got {keeps!r}")
    local_only = include_path is not None and all(t.startswith(TASK_PREFIX) for t in tasks)
    manager = TaskManager(
        include_path=None if include_path is None else str(include_path), include_defaults=not local_only
    )
    cls = VlmcutChatLMM if chat else VlmcutLMM
    runs: list[tuple[str, Any]] = [(NO_PRUNING, None)]
    runs += [(m, k) for k in keeps for m in methods if m != NO_PRUNING]
    results: list[EvalResult] = []
    effs: list[Efficiency] = []
    reference: dict[str, EvalResult] = {}
    for method, keep in runs:
        try:
            lm = cls.from_loaded(model, processor, method, keep, batch_size=batch_size)
        except ValueError as err:  # a budget the method cannot reach (e.g. PDrop's first stage)
            print(f"skipped {method}@{keep}: {err}")
            continue
        t0 = time.perf_counter()
        try:
            out = simple_evaluate(
                model=lm,
                tasks=list(tasks),
                task_manager=manager,
                log_samples=True,
                limit=limit,
                batch_size=batch_size,
                force_simple=not chat,
                verbosity="WARNING" if not progress else "INFO",
            )
        except ValueError as err:  # raised at the first forward: e.g. FastV's layer beyond the decoder depth
            print(f"skipped {method}@{keep}: {err}")
            continue
        finally:
            lm.remove()
        if out is None:
            raise RuntimeError(f"lmms-eval returned no results for {method}@{keep}")
        run_results, run_effs = collect(lm, out, tasks, method, keep, time.perf_counter() - t0)
        for r in run_results:
            ref = reference.get(r.dataset)
            if ref is None:
                reference[r.dataset] = r
                r.retention, r.agreement = 1.0, 1.0
            else:
                r.retention = retention(r.per_family, ref.per_family)
                r.agreement = sum(a == b for a, b in zip(r.answers, ref.answers, strict=True)) / max(1, r.n)
        results += run_results
        effs += run_effs
    return results, effs


def write_sweep(
    results: Sequence[EvalResult], effs: Sequence[Efficiency], out_dir: str | Path
) -> dict[str, Path]:
    """``vlmcut eval``'s reports (``lmms-sweep.json`` / ``.md`` / ``.png``) plus the efficiency table, both
    in ``lmms-sweep.md`` and as ``lmms-sweep-efficiency.json``."""
    paths = write_reports(results, out_dir, "lmms-sweep")
    md = paths["md"]
    md.write_text(md.read_text() + "\n**Efficiency** (means per sample)\n\n" + efficiency_table(effs) + "\n")
    paths["efficiency"] = Path(out_dir) / "lmms-sweep-efficiency.json"
    paths["efficiency"].write_text(json.dumps([e.__dict__ for e in effs], indent=1) + "\n")
    return paths
