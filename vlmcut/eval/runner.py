"""Run a VLM over a VQA dataset, unpruned or pruned, and report what pruning costs.

Metrics per run: accuracy per question family (and overall), *retention* relative to the unpruned model
(the mean over families of ``acc_method / acc_unpruned``, like the paper's "Avg." column over benchmarks),
and *agreement*: the share of questions answered exactly as the unpruned model answered them.
"""

from __future__ import annotations

import json
import sys
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..api import available_methods, prune
from ..inference import build_prompt, generate_answers
from .scenes import normalize_answer
from .stats import paired_bootstrap
from .store import ResultStore, cell_key, data_fingerprint, options_text


@dataclass
class EvalResult:
    """One (dataset, method, keep) run."""

    dataset: str
    method: str  # "unpruned" for the reference run
    keep: int | None
    n: int
    accuracy: float
    per_family: dict[str, float]
    answers: list[str] = field(default_factory=list, repr=False)
    retention: float | None = None
    agreement: float | None = None
    seconds: float = 0.0
    correct: list[int] = field(default_factory=list, repr=False)  # per question, for paired intervals
    mean_tokens: float | None = None  # visual tokens per image the language model saw (None: all)
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def cell(self) -> str:
        return cell_key(self.method, self.keep, self.options)

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("answers")
        d.pop("correct")
        return d

    def row(self, fingerprint: str) -> dict[str, Any]:
        """What a :class:`~vlmcut.eval.store.ResultStore` keeps of this run."""
        return {"cell": self.cell, "fingerprint": fingerprint, **asdict(self)}

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> EvalResult:
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in row.items() if k in names})


def _check_count(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {minimum}, got {type(value).__name__} ({value!r})")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    return value


def _check_samples(samples: Sequence[Any], dataset: str) -> None:
    if len(samples) == 0:
        raise ValueError(f"no samples to evaluate for dataset {dataset!r}; ask for at least one (n >= 1)")


def _batches(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, file=sys.stderr, leave=False)


@torch.no_grad()
def predict(
    model: Any,
    processor: Any,
    samples: Sequence[Any],
    batch_size: int = 8,
    max_new_tokens: int = 4,
    progress: bool = True,
    desc: str = "eval",
) -> list[str]:
    """Greedy answers (normalised to the dataset vocabulary) for ``samples`` (``VQASample``s)."""
    _check_count("batch_size", batch_size)
    _check_count("max_new_tokens", max_new_tokens)
    tok = processor.tokenizer
    old_side = tok.padding_side
    tok.padding_side = "left"  # generation continues every row at its end
    bar = _progress(len(samples), desc, progress)
    answers: list[str] = []
    try:
        for batch in _batches(samples, batch_size):
            prompts = [build_prompt(processor, s.prompt()) for s in batch]
            texts = generate_answers(model, processor, [s.image for s in batch], prompts, max_new_tokens)
            answers += [normalize_answer(t, s.vocabulary) for t, s in zip(texts, batch, strict=True)]
            if bar is not None:
                bar.update(len(batch))
    finally:
        tok.padding_side = old_side
        if bar is not None:
            bar.close()
    return answers


def correct_answers(samples: Sequence[Any], answers: Sequence[str]) -> list[int]:
    """1 where an answer matches the gold answer after normalisation, else 0 (per question, in order)."""
    return [int(a == normalize_answer(s.answer, s.vocabulary)) for s, a in zip(samples, answers, strict=True)]


def score_answers(samples: Sequence[Any], answers: Sequence[str]) -> tuple[float, dict[str, float]]:
    """Overall and per-family accuracy (exact match after normalisation)."""
    hits: dict[str, list[float]] = defaultdict(list)
    for s, c in zip(samples, correct_answers(samples, answers), strict=True):
        hits[s.family].append(float(c))
    per_family = {f: sum(v) / len(v) for f, v in sorted(hits.items())}
    overall = sum(sum(v) for v in hits.values()) / max(1, len(samples))
    return overall, per_family


def retention(per_family: dict[str, float], reference: dict[str, float]) -> float:
    """Mean over families of accuracy relative to the reference (families the reference gets 0 on skip)."""
    ratios = [per_family[f] / reference[f] for f in reference if reference[f] > 0 and f in per_family]
    return sum(ratios) / len(ratios) if ratios else float("nan")


def evaluate(
    model: Any,
    processor: Any,
    samples: Sequence[Any],
    dataset: str,
    method: str | None = None,
    keep: int | str | None = None,
    reference: EvalResult | None = None,
    batch_size: int = 8,
    progress: bool = True,
    **options: Any,
) -> EvalResult:
    """Evaluate ``model`` on ``samples``: unpruned when ``method`` is None, else pruned for the run only.

    ``mean_tokens`` is the mean number of visual tokens per image the language model saw: ``keep`` for a
    fixed budget, the mean of the per-image counts for ``keep="auto"``.
    """
    if (method is None) != (keep is None):
        raise ValueError("give both method and keep for a pruned run, or neither for the unpruned one")
    _check_samples(samples, dataset)
    _check_count("batch_size", batch_size)
    if reference is not None and reference.n != len(samples):
        raise ValueError(
            f"the reference run has {reference.n} answers but {len(samples)} samples were given; evaluate "
            f"the reference on the same samples"
        )
    t0 = time.perf_counter()
    label = "unpruned" if method is None else cell_key(method, keep, options)
    mean_tokens: float | None = None
    if method is None:
        answers = predict(model, processor, samples, batch_size, progress=progress, desc=f"{dataset} {label}")
    else:
        with prune(model, method, keep=keep, **options) as handle:
            answers = predict(
                model, processor, samples, batch_size, progress=progress, desc=f"{dataset} {label}"
            )
            counts = getattr(handle, "image_token_counts", None)
            if counts:
                mean_tokens = sum(counts) / len(counts)
            elif isinstance(keep, int):
                mean_tokens = float(keep)
    acc, fam = score_answers(samples, answers)
    result = EvalResult(
        dataset,
        method or "unpruned",
        keep,
        len(samples),
        acc,
        fam,
        answers,
        correct=correct_answers(samples, answers),
        mean_tokens=mean_tokens,
        options=dict(options),
    )
    result.seconds = time.perf_counter() - t0
    if reference is not None:
        _compare(result, reference)
    return result


def _compare(result: EvalResult, reference: EvalResult) -> None:
    result.retention = retention(result.per_family, reference.per_family)
    result.agreement = sum(a == b for a, b in zip(result.answers, reference.answers, strict=True)) / max(
        1, len(result.answers)
    )


Cell = tuple[str, "int | str", dict[str, Any]]  # (method, keep, options)


def sweep(
    model: Any,
    processor: Any,
    datasets: dict[str, Sequence[Any]],
    methods: Sequence[str],
    keeps: Sequence[int] = (128, 64, 32, 16),
    batch_size: int = 8,
    progress: bool = True,
    out: str | Path | None = None,
    model_id: str = "model",
    extra: Sequence[Cell] = (),
) -> list[EvalResult]:
    """Unpruned once per dataset, then every method x keep (method-major) and the ``extra`` cells against it.

    With ``out`` the sweep is resumable: each finished cell is appended to ``<out>/cells/<dataset>.jsonl``
    and cells already there (same questions, same ``model_id``) are read back instead of rerun. A budget
    a method cannot reach is recorded as skipped, with the reason, and not retried.
    """
    if not datasets:
        raise ValueError("datasets is empty; give at least one {name: samples}")
    if isinstance(methods, str) or not methods:
        raise ValueError(f"methods must be a non-empty list of method names, got {methods!r}")
    unknown = [m for m in methods if not isinstance(m, str) or m not in available_methods()]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; available: {available_methods()}")
    if isinstance(keeps, (int, str)) or not keeps:
        raise ValueError(f"keeps must be a non-empty list of ints >= 1, got {keeps!r}")
    for keep in keeps:
        _check_count("keeps", keep)
    _check_count("batch_size", batch_size)
    for name, samples in datasets.items():
        _check_samples(samples, name)
    cells: list[Cell] = [(m, k, {}) for m in methods for k in keeps] + [(m, k, dict(o)) for m, k, o in extra]
    store = None if out is None else ResultStore(out, model_id)
    results: list[EvalResult] = []
    for name, samples in datasets.items():
        fingerprint = data_fingerprint(samples)
        done = {} if store is None else store.load(name, fingerprint)
        if done:
            print(
                f"{name}: {len(done)} cell(s) already in {store.path(name)}; running the rest",
                file=sys.stderr,
            )

        cell = _CellRunner(model, processor, samples, name, batch_size, progress, store, fingerprint, done)
        ref = cell.run(None, None, {}, None)
        assert ref is not None
        ref.retention, ref.agreement = 1.0, 1.0
        results.append(ref)
        for method, keep, options in cells:
            result = cell.run(method, keep, options, ref)
            if result is not None:
                results.append(result)
    return results


@dataclass
class _CellRunner:
    """Runs (or reads back) the cells of one dataset of a sweep, storing each as it finishes."""

    model: Any
    processor: Any
    samples: Sequence[Any]
    dataset: str
    batch_size: int
    progress: bool
    store: ResultStore | None
    fingerprint: str
    done: dict[str, dict[str, Any]]

    def run(
        self, method: str | None, keep: Any, options: dict[str, Any], ref: EvalResult | None
    ) -> EvalResult | None:
        key = "unpruned" if method is None else cell_key(method, keep, options)
        if key in self.done:
            row = self.done[key]
            if row.get("skipped"):
                print(f"skipped {self.dataset} {key}: {row['skipped']}")
                return None
            return EvalResult.from_row(row)
        try:
            result = evaluate(
                self.model,
                self.processor,
                self.samples,
                self.dataset,
                method,
                keep,
                ref,
                self.batch_size,
                self.progress,
                **options,
            )
        except ValueError as err:  # a budget the method cannot reach (e.g. PDrop's first stage)
            print(f"skipped {self.dataset} {key}: {err}")
            if self.store is not None:
                self.store.append(
                    self.dataset, {"cell": key, "fingerprint": self.fingerprint, "skipped": str(err)}
                )
            return None
        if self.store is not None:
            self.store.append(self.dataset, result.row(self.fingerprint))
        return result


def interval_vs(results: Sequence[EvalResult], result: EvalResult, baseline: str = "flowcut") -> Any:
    """Paired bootstrap interval of ``result``'s accuracy minus ``baseline``'s at the same budget."""
    base = next(
        (
            r
            for r in results
            if r.dataset == result.dataset
            and r.method == baseline
            and r.keep == result.keep
            and not r.options
        ),
        None,
    )
    if base is None or base is result or not base.correct or len(base.correct) != len(result.correct):
        return None
    return paired_bootstrap(result.correct, base.correct)


def pivot_table(results: Sequence[EvalResult], baseline: str = "flowcut") -> str:
    """The paper's Table 1 layout: per dataset, one row per method, one column per kept-token budget.

    Cells are ``accuracy (retention)``, then, for every method but ``baseline``, its accuracy difference
    to ``baseline`` on the same questions in points with a paired bootstrap 95 % interval; ``n/a`` where a
    method cannot reach the budget. Runs with extra options (e.g. ``keep="auto"``) are left to
    :func:`markdown_table`.
    """
    blocks = []
    for name in sorted({r.dataset for r in results}):
        rows = [r for r in results if r.dataset == name and not r.options and isinstance(r.keep, int | None)]
        ref = next((r for r in rows if r.method == "unpruned"), None)
        keeps = sorted({r.keep for r in rows if r.keep is not None}, reverse=True)
        methods = list(dict.fromkeys(r.method for r in rows if r.method != "unpruned"))
        n = rows[0].n
        head = ["method", *(f"{k} tokens" for k in keeps)]
        title = f"**{name}** (n={n}; unpruned accuracy {100 * ref.accuracy:.1f}%)" if ref else f"**{name}**"
        if any(m == baseline for m in methods) and len(methods) > 1:
            title += (
                f"; cells: accuracy (retention), difference to {baseline} in points [paired bootstrap 95% CI]"
            )
        lines = [title, ""]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for m in methods:
            cells = []
            for k in keeps:
                r = next((x for x in rows if x.method == m and x.keep == k), None)
                if r is None:
                    cells.append("n/a")
                    continue
                cell = f"{100 * r.accuracy:.1f}"
                if r.retention is not None:
                    cell += f" ({100 * r.retention:.0f}%)"
                ci = interval_vs(rows, r, baseline) if m != baseline else None
                if ci is not None:
                    cell += f" {ci.text()}" + ("*" if ci.excludes_zero else "")
                cells.append(cell)
            lines.append("| " + " | ".join([m, *cells]) + " |")
        if any("]*" in line for line in lines):
            lines += ["", "\\* the interval excludes zero."]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def markdown_table(results: Sequence[EvalResult]) -> str:
    """One row per run: dataset, method, tokens, accuracy per family, accuracy, retention, agreement."""
    families = sorted({f for r in results for f in r.per_family})
    head = ["data", "method", "tokens", *families, "acc", "retention", "agreement"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        fam = [f"{100 * r.per_family[f]:.1f}" if f in r.per_family else "-" for f in families]
        ret = "-" if r.retention is None else f"{100 * r.retention:.1f}%"
        agr = "-" if r.agreement is None else f"{100 * r.agreement:.1f}%"
        tokens = "all" if r.keep is None else str(r.keep)
        if r.mean_tokens is not None and r.mean_tokens != r.keep:
            tokens += f" (mean {r.mean_tokens:.1f})"
        method = f"{r.method}[{options_text(r.options)}]" if r.options else r.method
        lines.append(
            "| " + " | ".join([r.dataset, method, tokens, *fam, f"{100 * r.accuracy:.1f}", ret, agr]) + " |"
        )
    return "\n".join(lines)


def write_reports(results: Sequence[EvalResult], out_dir: str | Path, stem: str = "eval") -> dict[str, Path]:
    """``<stem>.json`` (summaries + answers), ``<stem>.md`` and, for sweeps, ``<stem>.png``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{stem}.json", "md": out / f"{stem}.md"}
    paths["json"].write_text(
        json.dumps([{**r.summary(), "answers": r.answers} for r in results], indent=1) + "\n"
    )
    text = markdown_table(results) + "\n"
    if len({r.keep for r in results if r.keep is not None}) > 1:
        text = pivot_table(results) + "\n\n" + text
    paths["md"].write_text(text)
    if len({r.keep for r in results if r.keep is not None}) > 1:
        paths["png"] = plot_sweep(results, out / f"{stem}.png")
    return paths


def _series(r: EvalResult) -> str:
    """A plot line for runs with options: one per method and options, ``keep="auto"`` runs of every
    ``mass`` on one line."""
    if r.keep == "auto":
        rest = {k: v for k, v in r.options.items() if k != "mass"}
        return f"{r.method} keep=auto" + (f" {rest}" if rest else "")
    return f"{r.method} {options_text(r.options)}"


def plot_sweep(results: Sequence[EvalResult], path: str | Path) -> Path:
    """Accuracy against kept tokens, one line per method and dataset (like the paper's Table 1 trend)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    datasets = sorted({r.dataset for r in results})
    fig = Figure(figsize=(5 * len(datasets), 3.6), dpi=100)
    for i, name in enumerate(datasets):
        ax = fig.add_subplot(1, len(datasets), i + 1)
        rows = [r for r in results if r.dataset == name]
        ref = next((r for r in rows if r.method == "unpruned"), None)
        for m in sorted({r.method for r in rows if r.method != "unpruned" and not r.options}):
            pts = sorted(
                (r.mean_tokens or r.keep, r.accuracy) for r in rows if r.method == m and not r.options
            )
            ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="o", label=m)
        for label in sorted({_series(r) for r in rows if r.options}):
            pts = sorted(
                (r.mean_tokens, r.accuracy)
                for r in rows
                if r.options and _series(r) == label and r.mean_tokens
            )
            ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="s", linestyle=":", label=label)
        if ref is not None:
            ax.axhline(100 * ref.accuracy, color="gray", linestyle="--", label="unpruned")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("visual tokens per image (mean)")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(name)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    return path
