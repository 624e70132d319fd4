"""What one benchmark run measured, the issue's targets, and how it is reported (JSON, Markdown, PNG).

:class:`BenchResult` holds one :class:`BenchRow` per variant (the unpruned model, every ``method@keep``, the
oracles); :meth:`BenchResult.finalise` computes the paired ratios against the unpruned row and evaluates the
targets (:class:`TargetCheck`). Nothing here runs a model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

TARGET_SELECTION_OVERHEAD = 0.03  # FlowCut's prefill <= 1.03 x the oracle's
TARGET_VISION_RATIO = 1.05  # FlowCut's vision tower <= 1.05 x the unpruned tower
TARGET_FLOPS_FRACTION = 0.90  # measured prefill speed-up >= 90 % of the analytic (executed) one


def _quartiles(xs: Sequence[float]) -> tuple[float, float]:
    if len(xs) < 2:
        return (xs[0], xs[0]) if xs else (math.nan, math.nan)
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[2]


def _median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else math.nan


@dataclass
class BenchRow:
    """One variant: the unpruned model, a ``method`` at ``keep``, or the oracle at ``keep``.

    Times are seconds, one entry per timed round (``decode_s``: mean per-token time of that round). The
    token schedules are those of the batch's first prompt (TFLOPs and KV bytes cover the whole batch):
    ``vision_tokens`` has one list per encoder pass of the prompt's image (LLaVA-1.5: one; LLaVA-NeXT: one
    per crop, base image first; Qwen2-VL: one, the image's patch tokens before the 2x2 merger), each the
    sequence length entering every encoder layer, global token included; ``llm_visual_tokens`` the visual
    tokens (LLaVA-NeXT: newline tokens included) entering every decoder layer; ``text_tokens`` the other
    prompt tokens, entering every layer. ``tokens_per_layer`` is what ``handle.tokens_per_layer`` reported.
    """

    name: str
    method: str  # "none", a method name, or "oracle"
    keep: int | None
    vision_tokens: list[list[int]]
    llm_visual_tokens: list[int]
    text_tokens: int
    tokens_per_layer: list[int]
    tflops: float  # PAPER_CONVENTION, whole batch
    tflops_parts: dict[str, float]  # PAPER_CONVENTION: vision / projector / llm / lm_head (TFLOPs)
    tflops_exec: float  # EXEC_CONVENTION, whole batch
    kv_bytes_analytic: int
    prefill_s: list[float] = field(default_factory=list)
    vision_s: list[float] = field(default_factory=list)
    llm_s: list[float] = field(default_factory=list)
    decode_s: list[float] = field(default_factory=list)
    kv_bytes: int | None = None
    peak_mem_bytes: list[int] = field(default_factory=list)
    # Time inside the method's selector calls during the prefill (scoring and choosing, not the gathers the
    # oracle also does), one entry per timed round; empty for the unpruned and oracle rows.
    select_s: list[float] = field(default_factory=list)
    select_calls: int = 0  # selector calls in one prefill
    # Filled by BenchResult.finalise(): paired ratios against the unpruned row.
    speedup: float = math.nan
    vision_ratio: float = math.nan
    tflops_ratio: float = math.nan
    flops_speedup: float = math.nan  # EXEC_CONVENTION
    flops_speedup_paper: float = math.nan
    flops_fraction: float = math.nan  # speedup / flops_speedup
    select_share: float = math.nan  # median over rounds of select_s / prefill_s

    @property
    def llm_visual_final(self) -> int:
        """Visual tokens entering the last decoder layer (what is left after every stage)."""
        return self.llm_visual_tokens[-1]

    def stat(self, what: str) -> dict[str, float]:
        """``median``, ``q1``, ``q3``, ``min``, ``max`` of the series ``what`` (e.g. ``"prefill_s"``)."""
        xs = getattr(self, what)
        q1, q3 = _quartiles(xs)
        return {
            "median": _median(xs),
            "q1": q1,
            "q3": q3,
            "min": min(xs) if xs else math.nan,
            "max": max(xs) if xs else math.nan,
        }

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["stats"] = {k: self.stat(k) for k in ("prefill_s", "vision_s", "llm_s", "decode_s", "select_s")}
        d["peak_mem_bytes_median"] = _median(self.peak_mem_bytes) if self.peak_mem_bytes else None
        return d


@dataclass
class TargetCheck:
    """One of the issue's targets, evaluated on this run (``passed=None``: not measurable here, n/a)."""

    name: str
    keep: int
    value: float
    threshold: float
    passed: bool | None
    detail: str

    @property
    def verdict(self) -> str:
        if self.passed is None:
            return "n/a"
        return "PASS" if self.passed else "MISS"


@dataclass
class BenchResult:
    """Everything one :func:`run_benchmark` call measured; :meth:`save` writes JSON, Markdown and a PNG."""

    meta: dict[str, Any]
    rows: list[BenchRow]
    targets: list[TargetCheck] = field(default_factory=list)

    def row(self, name: str) -> BenchRow:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(f"no row {name!r}; rows: {[r.name for r in self.rows]}")

    @property
    def baseline(self) -> BenchRow:
        return self.row("unpruned")

    def finalise(self) -> None:
        """Compute the ratios against the unpruned row (medians of per-round ratios) and the targets."""
        base = self.baseline
        for r in self.rows:
            r.speedup = _paired(base.prefill_s, r.prefill_s)
            r.vision_ratio = _paired(r.vision_s, base.vision_s)
            r.tflops_ratio = r.tflops / base.tflops
            r.flops_speedup = base.tflops_exec / r.tflops_exec
            r.flops_speedup_paper = base.tflops / r.tflops
            r.flops_fraction = r.speedup / r.flops_speedup
            r.select_share = (
                _median([s / p for s, p in zip(r.select_s, r.prefill_s, strict=True)])
                if r.select_s
                else math.nan
            )
        self.targets = self._targets()

    def _targets(self) -> list[TargetCheck]:
        checks: list[TargetCheck] = []
        base = self.baseline
        keeps = sorted(
            {r.keep for r in self.rows if r.method == "flowcut" and r.keep is not None}, reverse=True
        )
        for k in keeps:
            fc = self.row(f"flowcut@{k}")
            oracle = next((r for r in self.rows if r.method == "oracle" and r.keep == k), None)
            if fc.select_s:
                share = fc.select_share
                checks.append(
                    TargetCheck(
                        "selection overhead, measured inside FlowCut's selectors (selection / prefill time)",
                        k,
                        share,
                        TARGET_SELECTION_OVERHEAD,
                        share <= TARGET_SELECTION_OVERHEAD,
                        f"{100 * share:.2f} % ({1e3 * fc.stat('select_s')['median']:.1f} ms in "
                        f"{fc.select_calls} call{'' if fc.select_calls == 1 else 's'}; target <= "
                        f"{100 * TARGET_SELECTION_OVERHEAD:.0f} %)",
                    )
                )
            name = "selection overhead, A/B (flowcut / oracle prefill - 1)"
            if oracle is not None:
                ov = _paired(fc.prefill_s, oracle.prefill_s) - 1.0
                checks.append(
                    TargetCheck(
                        name,
                        k,
                        ov,
                        TARGET_SELECTION_OVERHEAD,
                        ov <= TARGET_SELECTION_OVERHEAD,
                        f"{100 * ov:+.1f} % (target <= {100 * TARGET_SELECTION_OVERHEAD:.0f} %)",
                    )
                )
            else:
                why = self.meta.get("oracle_skipped") or "no oracle row"
                checks.append(
                    TargetCheck(name, k, math.nan, TARGET_SELECTION_OVERHEAD, None, f"n/a (no oracle: {why})")
                )
            vr = _paired(fc.vision_s, base.vision_s)
            checks.append(
                TargetCheck(
                    "vision tower time, flowcut / unpruned",
                    k,
                    vr,
                    TARGET_VISION_RATIO,
                    vr <= TARGET_VISION_RATIO,
                    f"{vr:.3f}x (target <= {TARGET_VISION_RATIO:.2f}x)",
                )
            )
            checks.append(
                TargetCheck(
                    "prefill speed-up / FLOPs speed-up",
                    k,
                    fc.flops_fraction,
                    TARGET_FLOPS_FRACTION,
                    fc.flops_fraction >= TARGET_FLOPS_FRACTION,
                    f"{fc.speedup:.2f}x of {fc.flops_speedup:.2f}x allowed = {100 * fc.flops_fraction:.0f} % "
                    f"(target >= {100 * TARGET_FLOPS_FRACTION:.0f} %)",
                )
            )
        return checks

    # -- output ---------------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict; non-finite floats (ratios of untimed series, n/a targets) become ``None``."""
        return _finite(
            {
                "meta": self.meta,
                "rows": [r.as_dict() for r in self.rows],
                "targets": [{**dataclasses.asdict(t), "verdict": t.verdict} for t in self.targets],
            }
        )

    def to_markdown(self) -> str:
        """The results table, the token schedules, skipped variants and the targets, as Markdown."""
        m = self.meta
        lines = [f"# FlowCut efficiency benchmark: {m['model']}", ""]
        lines.append(
            f"- device: {m['device']} ({m['device_name']}), dtype {m['dtype']}, torch {m['torch']}, "
            f"transformers {m['transformers']}, {m['threads']} CPU threads"
        )
        size = m.get("image_size")
        size_txt = f" ({size[1]}x{size[0]} image, w x h)" if size and m.get("family") != "llava" else ""
        lines.append(
            f"- batch {m['batch_size']}, {m['text_tokens']} text tokens + {m['visual_tokens']} visual tokens "
            f"per sample{size_txt}, {m['repeats']} timed rounds after {m['warmup']} warm-up rounds, variants "
            f"interleaved in a shuffled order every round; {m['decode_tokens']} greedy decode steps per round"
        )
        if m.get("llm_layers_note"):
            lines.append(f"- **{m['llm_layers_note']}**")
        lines.append(
            "- TFLOPs: paper convention (Table 5: 2 x weights x tokens, `lm_head` on every prompt position); "
            "'exec' = attention products counted, `lm_head` on the last position (what the timed forward "
            "runs, `logits_to_keep=1`); the FLOPs-allowed speed-up uses 'exec'; both from the real per-layer "
            "token counts of this run"
        )
        lines.append(
            "- times: median [IQR] over rounds; speed-up = median of per-round paired ratios against the "
            "unpruned model; fraction = measured speed-up / FLOPs-allowed speed-up"
        )
        lines.append(f"- memory: {m['memory_note']}")
        if m.get("selection_note"):
            lines.append(f"- selection: {m['selection_note']}")
        lines.append(f"- oracle: {m['oracle']}")
        lines.append("")
        head = (
            "| variant | LLM visual tokens per layer | TFLOPs (paper) | TFLOPs (exec) | prefill ms | speed-up | "
            "FLOPs speed-up | fraction | vision ms | vision ratio | LLM ms | selection ms (% of prefill) | "
            "decode ms/token | KV MiB | peak mem MiB |"
        )
        lines += [head, "|" + "---|" * (head.count("|") - 1)]
        for r in self.rows:
            p, v, llm, dec = (r.stat(k) for k in ("prefill_s", "vision_s", "llm_s", "decode_s"))
            mem = _median(r.peak_mem_bytes) if r.peak_mem_bytes else None
            lines.append(
                f"| {r.name} | {_runs(r.llm_visual_tokens)} | {r.tflops:.4g} | {r.tflops_exec:.4g} | "
                f"{1e3 * p['median']:.1f} [{1e3 * p['q1']:.1f}, {1e3 * p['q3']:.1f}] | {r.speedup:.2f}x | "
                f"{r.flops_speedup:.2f}x | {100 * r.flops_fraction:.0f} % | {1e3 * v['median']:.1f} | "
                f"{r.vision_ratio:.3f} | {1e3 * llm['median']:.1f} | "
                + (
                    f"{1e3 * r.stat('select_s')['median']:.1f} ({100 * r.select_share:.2f} %)"
                    if r.select_s
                    else "-"
                )
                + " | "
                + (f"{1e3 * dec['median']:.1f}" if r.decode_s else "n/a")
                + f" | {_mib(r.kv_bytes)} | "
                + (f"{mem / 2**20:.0f}" if mem is not None else "n/a")
                + " |"
            )
        lines += [
            "",
            "LLM visual tokens per layer: visual tokens entering each decoder layer (`n x c` = n for c layers"
            + ("; newline tokens included" if m.get("family") == "llava_next" else "")
            + f"), plus {m['text_tokens']} text tokens at every layer.",
            "",
            "Vision tokens entering each encoder layer ("
            + {
                "llava": "global token included",
                "llava_next": "global token included; one list per crop, base image first",
                "qwen2_vl": "patch tokens before the 2x2 merger; no global token",
            }.get(m.get("family", "llava"), "")
            + "):",
            "",
        ]
        for r in self.rows:
            lines.append(f"- {r.name}: {_crops(r.vision_tokens)}")
        if m.get("skipped"):
            lines += ["", "## Skipped", ""]
            lines += [f"- {s}" for s in m["skipped"]]
        if self.targets:
            lines += ["", "## Targets", "", "| target | keep | result | verdict |", "|---|---|---|---|"]
            for t in self.targets:
                lines.append(f"| {t.name} | {t.keep} | {t.detail} | **{t.verdict}** |")
        lines.append("")
        return "\n".join(lines)

    def plot(self, path: str | Path) -> Path:
        """Bar chart: prefill time (vision + rest, IQR whiskers) and measured vs FLOPs-allowed speed-up."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        from matplotlib.figure import Figure

        names = [r.name for r in self.rows]
        x = list(range(len(names)))
        fig = Figure(figsize=(max(8.0, 1.1 * len(names) + 4), 4.8), layout="constrained")
        ax1, ax2 = fig.subplots(1, 2)
        vis = [1e3 * r.stat("vision_s")["median"] for r in self.rows]
        pre = [r.stat("prefill_s") for r in self.rows]
        rest = [max(1e3 * p["median"] - v, 0.0) for p, v in zip(pre, vis, strict=True)]
        err = [
            [1e3 * (p["median"] - p["q1"]) for p in pre],
            [1e3 * (p["q3"] - p["median"]) for p in pre],
        ]
        ax1.bar(x, vis, label="vision tower", color="#4c72b0")
        ax1.bar(x, rest, bottom=vis, label="projector + LLM + rest", color="#dd8452", yerr=err, capsize=3)
        ax1.set_xticks(x, names, rotation=45, ha="right")
        ax1.set_ylabel("prefill time (ms, median, IQR)")
        ax1.set_title("prefill time")
        ax1.legend()
        w = 0.4
        ax2.bar([i - w / 2 for i in x], [r.speedup for r in self.rows], w, label="measured", color="#55a868")
        ax2.bar(
            [i + w / 2 for i in x],
            [r.flops_speedup for r in self.rows],
            w,
            label="FLOPs-allowed",
            color="#c44e52",
        )
        ax2.axhline(1.0, color="black", lw=0.8)
        ax2.set_xticks(x, names, rotation=45, ha="right")
        ax2.set_ylabel("speed-up vs unpruned (x)")
        ax2.set_title("prefill speed-up")
        ax2.legend()
        fig.suptitle(
            f"{self.meta['model']} on {self.meta['device_name']} ({self.meta['dtype']})", fontsize=10
        )
        path = Path(path)
        fig.savefig(path, dpi=110)
        return path

    def save(self, out_dir: str | Path, stem: str = "bench") -> dict[str, Path]:
        """Write ``{stem}.json``, ``{stem}.md`` and ``{stem}.png`` into ``out_dir``; return their paths."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"json": out / f"{stem}.json", "md": out / f"{stem}.md", "png": out / f"{stem}.png"}
        paths["json"].write_text(json.dumps(self.to_json(), indent=2, default=_json_default) + "\n")
        paths["md"].write_text(self.to_markdown())
        self.plot(paths["png"])
        return paths


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, torch.dtype):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _paired(num: Sequence[float], den: Sequence[float]) -> float:
    """Median over rounds of ``num[i] / den[i]``."""
    ratios = [a / b for a, b in zip(num, den, strict=True) if b > 0]
    return _median(ratios) if ratios else math.nan


def _mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.1f}"


def _runs(xs: Iterable[int]) -> str:
    out: list[list[int]] = []
    for x in xs:
        if out and out[-1][0] == x:
            out[-1][1] += 1
        else:
            out.append([x, 1])
    return ", ".join(f"{v} x {c}" if c > 1 else str(v) for v, c in out)


def _crops(seqs: Sequence[Sequence[int]]) -> str:
    """Per-crop schedules, identical ones grouped: ``577 x 24`` or ``3 crops: 577 x 4, 41 x 2; 2 crops: ...``."""
    if len(seqs) == 1:
        return _runs(seqs[0])
    groups = Counter(tuple(s) for s in seqs)  # first-seen order
    return "; ".join(f"{n} crop{'s' if n > 1 else ''}: {_runs(s)}" for s, n in groups.items())


def _finite(o: Any) -> Any:
    """``o`` with every non-finite float replaced by ``None`` (strict JSON has no NaN)."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    return o


def print_summary(result: BenchResult, paths: dict[str, Path] | None = None) -> None:
    """Print the Markdown table and the PASS/MISS lines."""
    print(result.to_markdown())
    if paths:
        for kind, p in paths.items():
            print(f"wrote {kind}: {p}")


__all__ = [
    "TARGET_FLOPS_FRACTION",
    "TARGET_SELECTION_OVERHEAD",
    "TARGET_VISION_RATIO",
    "BenchResult",
    "BenchRow",
    "TargetCheck",
    "print_summary",
]
