"""The quality-frontier report of a sweep: where each method stands against FlowCut, per question family,
and what ``keep="auto"`` buys over fixed budgets, every difference with a paired bootstrap 95 % interval."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .runner import EvalResult, pivot_table
from .stats import paired_bootstrap
from .store import options_text

__all__ = ["auto_table", "family_table", "frontier_report"]


def _fixed(results: Sequence[EvalResult], dataset: str) -> list[EvalResult]:
    return [r for r in results if r.dataset == dataset and not r.options and isinstance(r.keep, int)]


def family_table(results: Sequence[EvalResult], families: Sequence[str], baseline: str = "flowcut") -> str:
    """Per budget, every method's accuracy difference to ``baseline`` on each question family (points,
    paired 95 % interval over that family's questions); ``*`` where the interval excludes zero."""
    dataset = results[0].dataset
    rows = _fixed(results, dataset)
    names = sorted(set(families))
    lines = [
        f"**{dataset}**: difference to {baseline} per family, points [95% CI] "
        f"(questions: {', '.join(f'{f} {families.count(f)}' for f in names)})",
        "",
        "| budget | method | " + " | ".join(names) + " |",
        "|" + "---|" * (len(names) + 2),
    ]
    for keep in sorted({r.keep for r in rows}, reverse=True):
        base = next((r for r in rows if r.method == baseline and r.keep == keep), None)
        if base is None:
            continue
        acc = [
            f"{100 * _mean([c for c, f in zip(base.correct, families, strict=True) if f == name]):.1f}"
            for name in names
        ]
        lines.append(f"| {keep} | {baseline} (accuracy) | " + " | ".join(acc) + " |")
        for r in rows:
            if r.keep != keep or r.method == baseline:
                continue
            cells = []
            for name in names:
                idx = [i for i, f in enumerate(families) if f == name]
                iv = paired_bootstrap([r.correct[i] for i in idx], [base.correct[i] for i in idx])
                cells.append(iv.text(digits=0) + ("*" if iv.excludes_zero else ""))
            lines.append(f"| {keep} | {r.method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def auto_table(results: Sequence[EvalResult], baseline: str = "flowcut") -> str:
    """Every ``keep="auto"`` cell against every fixed budget of ``baseline``: its mean visual tokens per
    image, the token change, and the paired accuracy difference (auto - fixed)."""
    blocks = []
    for dataset in sorted({r.dataset for r in results}):
        autos = [r for r in results if r.dataset == dataset and r.keep == "auto"]
        fixed = [r for r in _fixed(results, dataset) if r.method == baseline]
        if not autos or not fixed:
            continue
        lines = [
            f"**{dataset}**: {baseline} keep='auto' vs fixed budgets (accuracy difference auto - fixed, "
            f"points [95% CI])",
            "",
            "| auto cell | mean tokens | accuracy | " + " | ".join(f"vs {r.keep}" for r in fixed) + " |",
            "|" + "---|" * (3 + len(fixed)),
        ]
        for a in sorted(autos, key=lambda r: r.mean_tokens or 0):
            cells = []
            for f in fixed:
                iv = paired_bootstrap(a.correct, f.correct)
                change = 100 * ((a.mean_tokens or 0) / f.keep - 1)
                cells.append(f"{iv.text()}{'*' if iv.excludes_zero else ''}, tokens {change:+.0f}%")
            opts = options_text(a.options)
            lines.append(
                f"| {opts} | {a.mean_tokens:.1f} | {100 * a.accuracy:.1f} | " + " | ".join(cells) + " |"
            )
        fixed_acc = ", ".join(f"{r.keep}: {100 * r.accuracy:.1f}" for r in fixed)
        lines += ["", f"Fixed-budget {baseline} accuracy: {fixed_acc}. \\* the interval excludes zero."]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def variant_table(results: Sequence[EvalResult]) -> str:
    """Cells run with extra options at a fixed budget (e.g. ``padding=compete``) against the same method and
    budget with its defaults: accuracy of both and the paired difference (default - variant)."""
    lines = [
        "| data | budget | method | variant | default accuracy | variant accuracy | default - variant, points [95% CI] |",
        "|---|---|---|---|---|---|---|",
    ]
    for v in results:
        if not v.options or not isinstance(v.keep, int):
            continue
        base = next(
            (
                r
                for r in results
                if r.dataset == v.dataset and r.method == v.method and r.keep == v.keep and not r.options
            ),
            None,
        )
        if base is None:
            continue
        iv = paired_bootstrap(base.correct, v.correct)
        opts = options_text(v.options)
        lines.append(
            f"| {v.dataset} | {v.keep} | {v.method} | {opts} | {100 * base.accuracy:.1f} | {100 * v.accuracy:.1f} "
            f"| {iv.text()}{'*' if iv.excludes_zero else ''} |"
        )
    return "\n".join(lines) if len(lines) > 2 else ""


def frontier_report(
    results: Sequence[EvalResult], families: dict[str, Sequence[str]], out: str | Path | None = None
) -> str:
    """The whole report (Markdown): Table 1 with intervals, per-family differences, the auto frontier."""
    parts = ["## Accuracy with paired 95% intervals against FlowCut", "", pivot_table(results)]
    tables = []
    for dataset in sorted({r.dataset for r in results}):
        fam = families.get(dataset)
        rows = [r for r in results if r.dataset == dataset]
        if fam is not None and rows and all(len(r.correct) == len(fam) for r in rows if r.correct):
            tables.append(family_table(rows, list(fam)))
    if tables:
        parts += ["", "## Per question family", "", "\n\n".join(tables)]
    variants = variant_table(results)
    if variants:
        parts += ["", "## Option variants against the defaults", "", variants]
    auto = auto_table(results)
    if auto:
        parts += ["", "## keep='auto' against fixed budgets", "", auto]
    text = "\n".join(parts) + "\n"
    if out is not None:
        Path(out).write_text(text)
    return text


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")
