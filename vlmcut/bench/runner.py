"""End-to-end efficiency benchmark: unpruned vs pruned vs oracle, timed A/B and counted analytically.

:func:`run_benchmark` builds (or loads) one vision-language model -- LLaVA-1.5, LLaVA-NeXT or Qwen2-VL --
and measures, for the unpruned model, every ``method x keep`` and one **oracle** per ``keep``:

* analytic TFLOPs of the prefill (vision tower + projector + LLM + ``lm_head``) from the *real* per-layer
  token counts of the run, read by hooks in an untimed set-up pass: the sequence length entering every
  encoder layer of every encoder pass (an image; a LLaVA-NeXT crop; a Qwen2-VL image's packed patches,
  from the block's ``cu_seqlens``, before the 2x2 merger) and the tokens entering every decoder layer
  (methods that prune inside the LLM -- FastV, PDrop, SparseVLM, FlowCut's LLaVA-NeXT / Qwen2-VL second
  stage -- shrink it at their layers: ``handle.llm_record.kept_positions``). They are counted with
  :data:`vlmcut.bench.flops.PAPER_CONVENTION` (the paper's Table 5 accounting: ``lm_head`` on every prompt
  position, no attention products) and with an *executed* convention (:data:`EXEC_CONVENTION`: attention
  products counted, ``lm_head`` on the last position only, which is what the timed forward with
  ``logits_to_keep=1`` runs). The FLOPs-allowed speed-up is computed with the executed convention. The
  unpruned row equals :func:`vlmcut.bench.flops.prefill_breakdown` of the unpruned model;
* prefill wall time (one forward with the image, ``use_cache=True``, ``logits_to_keep=1``), the vision
  tower's share and the language model's share (:class:`vlmcut.bench.timing.StageTimer`);
* decode time per token (greedy forward steps on the returned KV cache);
* KV-cache bytes (read from the returned cache; cross-checked with :func:`vlmcut.bench.flops.kv_cache_bytes`
  on the per-layer token counts: a decoder-stage method caches fewer tokens in its later layers; with
  ``batch_size > 1`` the cache also holds the padding / filler columns that the analytic count leaves out);
* peak memory: CUDA ``max_memory_allocated`` above the weights; on CPU the peak resident-set growth
  during the prefill, sampled from ``/proc/self/statm`` every few ms (a lower bound: the allocator may
  reuse memory it already holds; ``tracemalloc`` does not see torch's allocations and ``ru_maxrss`` is a
  process-lifetime high-water mark, useless once a bigger variant has run);
* selection time: the time spent inside each method's selector calls during the timed prefill
  (:class:`SelectionClock`: wall clock on CPU, CUDA events on a GPU; the selectors are wrapped by
  :func:`timed_spec`, which costs two clock reads per call). It is the direct measure of a method's
  selection overhead; the A/B against the oracle (below) is the end-to-end cross-check, but on a shared CPU
  its noise (several %) is larger than the overhead it measures.

Timing protocol: ``warmup`` untimed rounds, then ``repeats`` rounds; every round runs every variant once,
in a freshly shuffled order (seeded), attaching the pruning hooks just before and removing them just after
the variant's own calls, so slow drifts of a shared machine hit all variants alike. Ratios against the
unpruned model are medians of the per-round (paired) ratios.

A method the model does not support (Qwen2-VL: only ``flowcut``, ``fastv``, ``pdrop``, ``sparsevlm``), or a
budget a staged method cannot reach, is skipped in the set-up pass with a note in ``meta["skipped"]`` and
the Markdown; a ``ValueError`` is raised only when nothing is left to compare.

The oracle
----------
"The same model fed exactly the kept tokens, without the selection work": the oracle runs the same vision
tower on the same image, with a *fixed, precomputed* index gather after exactly the layers where FlowCut
pruned (the indices FlowCut chose for this input, recorded once in a set-up pass), so every encoder layer
sees the same number of tokens as with FlowCut. LLaVA-1.5: the language model receives a prompt that
already has exactly ``K`` placeholders per image. LLaVA-NeXT and Qwen2-VL (two-stage FlowCut): FlowCut's
decoder-layer-1 keep mask is replayed too (no scoring); LLaVA-NeXT gets the prompt already cut to the
packed layout; Qwen2-VL's attachment has no entry for an already compacted prompt, so its oracle still
does the prompt surgery (M-RoPE ids, compaction) that FlowCut does, and its overhead is the scoring alone.
The oracle keeps the same hook plumbing (q/k/v capture, gather) and skips only FlowCut's scoring, so
``selection overhead = flowcut prefill / oracle prefill - 1`` is the cost of choosing the tokens. Its
TFLOPs equal FlowCut's (the scoring itself is ``O(T)`` per layer and not counted).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import platform
import random
import statistics
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..api import METHODS, MethodSpec, _prune, available_methods, prune
from ..compat import CACHE_KWARG, cache_from_output
from ..methods.flowcut import FlowCutConfig
from ..methods.llm_base import LLMContext, LLMSelection
from ..models.llava import LlavaAttachment
from ..models.llava_next import LlavaNextAttachment
from ..models.llm import DecoderPruner
from ..models.qwen2_vl import QWEN_METHODS, QwenAttachment
from ..models.vit import tower_spec
from .flops import (
    DENSE_CONVENTION,
    PAPER_CONVENTION,
    PAPER_NEXT_IMAGE_SIZE,
    FlopsConvention,
    ModelShape,
    PrefillFlops,
    kv_cache_bytes,
    model_shape,
    prefill_breakdown,
)
from .presets import (
    PRESETS,
    build_preset_model,
    default_image_size,
    example_inputs,
    get_preset,
    model_class_for,
)

# What the timed prefill executes: dense attention products in the tower and the LLM, last-position logits.
EXEC_CONVENTION: FlopsConvention = DENSE_CONVENTION

TARGET_SELECTION_OVERHEAD = 0.03  # FlowCut's prefill <= 1.03 x the oracle's
TARGET_VISION_RATIO = 1.05  # FlowCut's vision tower <= 1.05 x the unpruned tower
TARGET_FLOPS_FRACTION = 0.90  # measured prefill speed-up >= 90 % of the analytic (executed) one

_RSS_POLL_S = 0.005


# ---------------------------------------------------------------------------------------------------------
# Result containers
# ---------------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------------
# The oracle: a replay of FlowCut's gathers, no scoring
# ---------------------------------------------------------------------------------------------------------


class _RecordingSelector:
    """Wraps an encoder selector and records the indices it returns per layer (for the oracle's replay).

    One record per pass (``start``): a tower that runs one image at a time (FlowCut's per-image counts)
    makes one pass per image, and the replay repeats them in the same order. ``group`` (Qwen2-VL's merge
    units) is passed on; the recorded indices then count units."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.keep = inner.keep
        self.per_image_passes = bool(getattr(inner, "per_image_passes", False))
        self.passes: list[dict[int, torch.Tensor]] = []

    @property
    def steps(self) -> dict[int, torch.Tensor]:
        """The last pass's record."""
        return self.passes[-1] if self.passes else {}

    def start(self, consume_layer: int) -> None:
        self.passes.append({})
        self.inner.start(consume_layer)

    def needs_scores(self, num_patches: int) -> bool:
        return self.inner.needs_scores(num_patches)

    def step(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        scale: float,
        has_cls: bool,
        group: int = 1,
    ) -> torch.Tensor | None:
        extra = {"group": group} if group != 1 else {}
        idx = self.inner.step(layer, q, k, v, scale, has_cls, **extra)
        if idx is not None:
            if not isinstance(idx, torch.Tensor):
                raise TypeError("the oracle replays index gathers; token merging cannot be replayed")
            self.passes[-1][layer] = idx.detach().clone()
        return idx


class ReplaySelector:
    """Oracle encoder selector: returns precomputed indices after the recorded layers; computes nothing.

    ``steps[layer]``: ``(B, n)`` indices the recorded selector returned at ``layer`` (patches, or merge units
    when the model passes ``group``). A list of such records replays one per pass, in order and cyclically
    (``per_image_passes``: the tower then runs one image at a time, as it did while recording)."""

    def __init__(
        self,
        steps: dict[int, torch.Tensor] | list[dict[int, torch.Tensor]],
        keep: int,
        per_image_passes: bool = False,
    ) -> None:
        self.passes = steps if isinstance(steps, list) else [steps]
        self.steps: dict[int, torch.Tensor] = self.passes[0] if self.passes else {}
        self.keep = keep
        self.per_image_passes = per_image_passes
        self._next = 0

    def start(self, consume_layer: int) -> None:
        if self.passes:
            self.steps = self.passes[self._next % len(self.passes)]
            self._next += 1

    def needs_scores(self, num_patches: int) -> bool:
        return num_patches > self.keep

    def step(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        scale: float,
        has_cls: bool,
        group: int = 1,
    ) -> torch.Tensor | None:
        return self.steps.get(layer)


class _RecordingLLMSelector:
    """Wraps a language-model selector and records its prune layers and keep masks (for the replay)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.layers: list[int] = []
        self.masks: dict[int, torch.Tensor] = {}

    def prune_layers(self, num_layers: int, num_visual: int) -> list[int]:
        self.layers = [int(i) for i in self.inner.prune_layers(num_layers, num_visual)]
        self.masks = {}
        return list(self.layers)

    def select(self, ctx: LLMContext) -> torch.Tensor | None:
        keep = self.inner.select(ctx)
        if isinstance(keep, LLMSelection):
            if keep.hidden is not None:
                raise TypeError(
                    "the oracle replays keep masks; a selector that rewrites tokens cannot be replayed"
                )
            keep = keep.keep
        if keep is not None:
            self.masks[ctx.layer] = keep.detach().clone()
        return keep


class ReplayLLMSelector:
    """Oracle language-model selector: the recorded ``(B, T)`` keep masks at the recorded layers; computes
    nothing."""

    def __init__(self, layers: Sequence[int], masks: dict[int, torch.Tensor]) -> None:
        self.layers = list(layers)
        self.masks = masks

    def prune_layers(self, num_layers: int, num_visual: int) -> list[int]:
        return list(self.layers)

    def select(self, ctx: LLMContext) -> torch.Tensor | None:
        keep = self.masks.get(ctx.layer)
        if keep is not None and keep.shape != ctx.visual.shape:
            raise RuntimeError(
                f"oracle replay at decoder layer {ctx.layer}: recorded mask {tuple(keep.shape)} for a sequence "
                f"of {tuple(ctx.visual.shape)}"
            )
        return keep


# ---------------------------------------------------------------------------------------------------------
# Selection time, measured inside the selectors
# ---------------------------------------------------------------------------------------------------------


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
    its signature (model adapters inspect it, e.g. Qwen2-VL's check for merge-unit support)."""

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

    def wrap(make: Callable[[Any, int], Any] | None) -> Callable[[Any, int], Any] | None:
        if make is None:
            return None

        def build(cfg: Any, keep: int) -> Any:
            inner = make(cfg, keep)
            return None if inner is None else _TimedSelector(inner, clock)

        return build

    return dataclasses.replace(
        spec,
        make_selector=wrap(spec.make_selector),
        make_llm_selector=wrap(spec.make_llm_selector),
        make_second_stage=wrap(spec.make_second_stage),
    )


# ---------------------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------------------


class _PeakMemory:
    """Peak memory above the level at :meth:`start`: CUDA allocator stats, or sampled RSS on Linux."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._base = 0
        self._peak = 0
        self._page = 4096
        try:
            import os

            self._page = os.sysconf("SC_PAGE_SIZE")
            self._statm = open("/proc/self/statm", "rb")  # noqa: SIM115 - closed in stop()
        except (OSError, ValueError, AttributeError):
            self._statm = None

    @property
    def available(self) -> bool:
        return self.device.type == "cuda" or self._statm is not None

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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class _Sample:
    prefill_s: float
    vision_s: float
    llm_s: float
    decode_s: float | None
    kv_bytes: int | None
    peak_mem: int | None
    select_s: float
    select_calls: int


def _measure(
    model: nn.Module,
    vision: nn.Module,
    llm: nn.Module,
    inputs: dict[str, torch.Tensor],
    decode_tokens: int,
    device: torch.device,
    memory: _PeakMemory,
    logits_to_keep: bool,
    clock: SelectionClock,
) -> _Sample:
    """One prefill (timed as a whole, per stage, and inside the selectors that ``clock`` watches) and
    ``decode_tokens`` greedy steps on its cache."""
    from .timing import StageTimer

    extra: dict[str, Any] = {"use_cache": True}
    if logits_to_keep:
        extra["logits_to_keep"] = 1
    with torch.inference_mode():
        with StageTimer(vision, llm) as timer:
            clock.reset()
            memory.start()
            _sync(device)
            t0 = time.perf_counter()
            out = model(**inputs, **extra)
            _sync(device)
            prefill = time.perf_counter() - t0
            peak = memory.stop()
        select_s, select_calls = clock.seconds(), clock.calls
        cache = cache_from_output(out)
        kv = cache_bytes(cache)
        decode: float | None = None
        if decode_tokens > 0:
            token = out.logits[:, -1].argmax(dim=-1, keepdim=True)
            steps = []
            for _ in range(decode_tokens):
                _sync(device)
                t0 = time.perf_counter()
                step = model(input_ids=token, **{CACHE_KWARG: cache}, **extra)
                _sync(device)
                steps.append(time.perf_counter() - t0)
                cache = cache_from_output(step)
                token = step.logits[:, -1].argmax(dim=-1, keepdim=True)
            decode = statistics.median(steps)
    return _Sample(
        prefill_s=prefill,
        vision_s=sum(timer.times.vision),
        llm_s=timer.times.prefill,
        decode_s=decode,
        kv_bytes=kv,
        peak_mem=peak,
        select_s=select_s,
        select_calls=select_calls,
    )


# ---------------------------------------------------------------------------------------------------------
# Token counts of one forward
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Parts:
    """The modules of a supported model the benchmark times and counts."""

    family: str  # "llava" | "llava_next" | "qwen2_vl"
    vision: nn.Module  # timed as the vision stage
    vision_layers: list[nn.Module]  # CLIP encoder layers / Qwen2-VL ViT blocks
    llm: nn.Module
    llm_layers: list[nn.Module]
    image_token_id: int


def model_family(model: nn.Module) -> str:
    """``"llava"``, ``"llava_next"`` or ``"qwen2_vl"`` for the model classes the benchmark runs; a
    ``TypeError`` naming them otherwise."""
    from transformers import (
        LlavaForConditionalGeneration,
        LlavaNextForConditionalGeneration,
        Qwen2VLForConditionalGeneration,
    )

    for cls, family in (
        (LlavaForConditionalGeneration, "llava"),
        (LlavaNextForConditionalGeneration, "llava_next"),
        (Qwen2VLForConditionalGeneration, "qwen2_vl"),
    ):
        if isinstance(model, cls):
            return family
    raise TypeError(
        f"{type(model).__name__}: the benchmark supports LlavaForConditionalGeneration, "
        f"LlavaNextForConditionalGeneration and Qwen2VLForConditionalGeneration (the models with the lm_head)"
    )


def _model_parts(model: nn.Module) -> _Parts:
    family = model_family(model)
    inner = model.model
    config = model.config
    if family == "qwen2_vl":
        vision = inner.visual
        vision_layers = list(vision.blocks)
    else:
        vision = inner.vision_tower
        vision_layers = tower_spec(vision).layers
    image_id = getattr(config, "image_token_id", None)
    if image_id is None:
        image_id = config.image_token_index
    llm = inner.language_model
    return _Parts(family, vision, vision_layers, llm, list(llm.layers), int(image_id))


@dataclass(frozen=True)
class _Prompt:
    """Real token counts of one prompt of the batch in one forward."""

    vision: list[list[int]]  # per encoder pass (image / crop): sequence entering every encoder layer
    llm_visual: list[int]  # visual tokens entering every decoder layer
    text: int  # non-visual tokens (every decoder layer)


class _TokenCounter:
    """Forward hooks (set-up passes only, never while timing) that record the real token counts.

    * every encoder layer's input: CLIP ``(n, T, D)`` = ``n`` sequences of ``T``; a Qwen2-VL block's packed
      ``(T, D)`` split by its ``cu_seqlens`` (one segment per image), as the pruning hooks hand them over;
    * the language model's input: real tokens per row (its 2-D ``attention_mask``);
    * after every decoder layer, how many prune stages ``llm_record()`` holds (``LLMPassRecord``; ``None``
      for methods that do not prune in the LLM), so that each stage's ``kept_positions`` is tied to the
      layer at whose output it was cut.
    """

    def __init__(self, parts: _Parts, llm_record: Callable[[], Any]) -> None:
        self.parts = parts
        self.llm_record = llm_record
        self.calls: list[list[list[int]]] = []  # per tower call, per layer: sequence lengths
        self.valid: torch.Tensor | None = None  # (B, T) real tokens entering the language model
        self.stages_after: list[int] = []
        self._layer_calls = 0  # encoder layer calls in the current tower call
        self._handles: list[Any] = []

    def __enter__(self) -> _TokenCounter:
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
        if self.parts.family == "qwen2_vl":
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

    def prompts(self, text: Sequence[int]) -> list[_Prompt]:
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
            _Prompt(per_row[r], [int(t[r]) - int(text[r]) for t in totals], int(text[r]))
            for r in range(batch)
        ]


def _count(
    model: nn.Module,
    parts: _Parts,
    inputs: dict[str, torch.Tensor],
    text: Sequence[int],
    llm_record: Callable[[], Any],
    logits_to_keep: bool,
) -> list[_Prompt]:
    """One untimed forward of ``model`` (pruning attached by the caller) with the counting hooks on."""
    with _TokenCounter(parts, llm_record) as counter:
        _forward(model, inputs, logits_to_keep)
    return counter.prompts(text)


def _batch_flops(shape: ModelShape, prompts: Sequence[_Prompt], convention: FlopsConvention) -> PrefillFlops:
    """:func:`prefill_breakdown` of every prompt (its own vision passes and decoder schedule), summed."""
    parts = [
        prefill_breakdown(
            shape, p.vision, p.llm_visual, text_tokens=p.text, num_crops=len(p.vision), convention=convention
        )
        for p in prompts
    ]
    return PrefillFlops(
        *(sum(getattr(x, f.name) for x in parts) for f in dataclasses.fields(PrefillFlops))  # type: ignore[arg-type]
    )


def _make_row(
    name: str,
    method: str,
    keep: int | None,
    prompts: Sequence[_Prompt],
    shape: ModelShape,
    tokens_per_layer: Sequence[int],
    bytes_per_value: int,
) -> BenchRow:
    paper = _batch_flops(shape, prompts, PAPER_CONVENTION)
    ex = _batch_flops(shape, prompts, EXEC_CONVENTION)
    first = prompts[0]
    return BenchRow(
        name=name,
        method=method,
        keep=keep,
        vision_tokens=[list(s) for s in first.vision],
        llm_visual_tokens=list(first.llm_visual),
        text_tokens=first.text,
        tokens_per_layer=list(tokens_per_layer),
        tflops=paper.tflops,
        tflops_parts={k: getattr(paper, k) / 1e12 for k in ("vision", "projector", "llm", "lm_head")},
        tflops_exec=ex.tflops,
        kv_bytes_analytic=sum(
            kv_cache_bytes(shape, [v + p.text for v in p.llm_visual], bytes_per_value=bytes_per_value)
            for p in prompts
        ),
    )


# ---------------------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------------------


@dataclass
class _Variant:
    row: BenchRow
    inputs: dict[str, torch.Tensor]
    attach: Callable[[], Any]  # -> handle-like with .remove(), or None
    timed: bool = False  # its selectors report to the run's SelectionClock


def _resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        out = getattr(torch, dtype)
    except AttributeError:
        out = None
    if not isinstance(out, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r} (float32, bfloat16, float16)")
    return out


def load_model(
    model_or_preset: str | Path | nn.Module,
    layers: int | None,
    dtype: torch.dtype,
    device: torch.device,
    seed: int = 0,
) -> tuple[nn.Module, str, str | None]:
    """The model to benchmark, its display name, and a note when the LLM was shortened.

    ``model_or_preset``: a preset name (random weights from its config), a local Hugging Face LLaVA,
    LLaVA-NeXT or Qwen2-VL directory (the class is picked from its ``config.json``), or a ready
    ``LlavaForConditionalGeneration`` / ``LlavaNextForConditionalGeneration`` /
    ``Qwen2VLForConditionalGeneration`` (used as is; ``layers`` must be ``None``).
    """
    if isinstance(model_or_preset, nn.Module):
        if layers is not None:
            raise ValueError("layers can only shorten a preset or a model loaded from a directory")
        return model_or_preset, type(model_or_preset).__name__, None
    name = str(model_or_preset)
    if name in PRESETS:
        full = int(get_preset(name).build(None).text_config.num_hidden_layers)
        model = build_preset_model(
            name, num_llm_layers=layers, dtype=dtype, device=device, attn_implementation="sdpa", seed=seed
        )
        label = f"preset {name} (random weights)"
    else:
        path = Path(name)
        if not path.is_dir():
            raise ValueError(
                f"{name!r} is neither a preset ({', '.join(PRESETS)}) nor a local model directory"
            )
        from transformers import AutoConfig

        cls = model_class_for(AutoConfig.from_pretrained(path))
        model = cls.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
        model = model.to(device).eval()
        full = int(model.config.text_config.num_hidden_layers)
        if layers is not None:
            lm = model.model.language_model
            if not 1 <= layers <= len(lm.layers):
                raise ValueError(f"layers must be in 1..{len(lm.layers)}, got {layers}")
            lm.layers = nn.ModuleList(list(lm.layers)[:layers])
            model.config.text_config.num_hidden_layers = layers
        label = f"{path.name} ({path})"
    note = None
    if layers is not None and layers != full:
        note = (
            f"LLM shortened to {layers} of {full} decoder layers (FLOPs and times cover the shortened model; "
            f"the vision tower and projector are full size)"
        )
    return model, label, note


def bench_image_size(config: Any, image_size: Sequence[int] | None = None) -> tuple[int, int]:
    """``(height, width)`` of the benchmark's image: ``image_size`` if given; LLaVA-NeXT: the paper's
    640x427 POPE image (:data:`~vlmcut.bench.flops.PAPER_NEXT_IMAGE_SIZE`) scaled by the crop size / 336
    (so a toy tower gets the same 2x2-grid-plus-unpadding geometry); otherwise the tower's square size
    (LLaVA-1.5: fixed; Qwen2-VL: 448x448, 256 merged tokens)."""
    if image_size is not None:
        h, w = (int(x) for x in image_size)
        if h < 1 or w < 1:
            raise ValueError(f"image_size must be two positive ints (height, width), got {image_size!r}")
        return h, w
    if config.model_type == "llava_next":
        scale = int(config.vision_config.image_size) / 336
        return round(PAPER_NEXT_IMAGE_SIZE[0] * scale), round(PAPER_NEXT_IMAGE_SIZE[1] * scale)
    return default_image_size(config)


def run_benchmark(
    model_or_preset: str | Path | nn.Module,
    methods: Sequence[str] = ("flowcut", "random", "grid"),
    keeps: Sequence[int] = (128, 64),
    *,
    layers: int | None = None,
    image_size: Sequence[int] | None = None,
    text_tokens: int = 65,
    repeats: int = 5,
    warmup: int = 2,
    decode_tokens: int = 8,
    batch_size: int = 1,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    oracle: bool = True,
    seed: int = 0,
    progress: bool = True,
) -> BenchResult:
    """Benchmark pruning methods against the unpruned model and the oracle (see the module docstring).

    Args:
        model_or_preset: a preset name (``"llava-1.5-7b"``, ``"llava-next-7b"``, ``"qwen2-vl-7b"``, ``"tiny"``,
            ``"tiny-llava-next"``, ``"tiny-qwen2-vl"``; random weights), a local LLaVA / LLaVA-NeXT /
            Qwen2-VL directory, or a ``Llava[Next]ForConditionalGeneration`` /
            ``Qwen2VLForConditionalGeneration`` instance.
        methods: pruning methods (``vlmcut.available_methods()``); those the model does not support are
            skipped with a note in ``meta["skipped"]`` (Qwen2-VL: ``flowcut``, ``fastv``, ``pdrop``,
            ``sparsevlm``), as are budgets a staged method cannot reach.
        keeps: visual tokens per image to keep (LLaVA-NeXT: patch tokens per image, newlines not counted;
            Qwen2-VL: merged tokens).
        layers: shorten the language model to this many decoder layers (presets / directories only).
        image_size: ``(height, width)`` of the image (LLaVA-NeXT: crop grid and unpadding; Qwen2-VL: patch
            grid); default :func:`bench_image_size` (NeXT: the paper's 640x427, Qwen2-VL: 448x448).
        text_tokens: text tokens of the prompt besides the image placeholders (65: a POPE prompt).
        repeats: timed rounds; warmup: untimed rounds before them.
        decode_tokens: greedy decode steps after every prefill (0: skip decode timing).
        batch_size: images (= prompts) per forward.
        dtype: parameter dtype; default float32 on CPU, bfloat16 on CUDA.
        device: ``"cpu"`` or ``"cuda"``.
        oracle: add one oracle row per keep (needs ``"flowcut"`` in ``methods``).
        seed: seeds the weights, the inputs and the order of variants in each round.
        progress: show a tqdm progress bar (and print skipped variants to stderr as they are found).

    Returns:
        A :class:`BenchResult` (already finalised: ratios and targets filled in).

    Raises:
        ValueError: unknown methods, bad counts, or no variant left to compare with the unpruned model.
        TypeError: a model class the benchmark does not run.
    """
    unknown = sorted(set(methods) - set(available_methods()))
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; available: {available_methods()}")
    if repeats < 1 or warmup < 0 or decode_tokens < 0 or batch_size < 1:
        raise ValueError("repeats >= 1, warmup >= 0, decode_tokens >= 0 and batch_size >= 1 are required")
    bad = [k for k in keeps if isinstance(k, bool) or not isinstance(k, int) or k < 1]
    if bad:
        raise ValueError(f"keeps must be ints >= 1 (visual tokens per image), got {bad}")
    methods, keeps = list(dict.fromkeys(methods)), list(dict.fromkeys(keeps))  # one row per variant
    dev = torch.device(device)
    torch_dtype = _resolve_dtype(dtype, dev)
    model, label, note = load_model(model_or_preset, layers, torch_dtype, dev, seed=seed)
    parts = _model_parts(model)
    family = parts.family
    config = model.config
    shape = model_shape(config)
    if family == "llava" and image_size is not None:
        raise ValueError(
            "image_size applies to LLaVA-NeXT (crop grid) and Qwen2-VL (patch grid); LLaVA-1.5 resizes every "
            "image to its tower's square size"
        )
    size = bench_image_size(config, image_size)
    param = next(model.parameters())
    inputs = example_inputs(
        config, text_tokens=text_tokens, image_size=size, batch_size=batch_size, seed=seed, dtype=param.dtype
    )
    inputs = {k: v.to(dev) for k, v in inputs.items()}
    is_image = inputs["input_ids"] == parts.image_token_id
    per_image = int(is_image[0].sum())
    text = ((~is_image) & inputs["attention_mask"].bool()).sum(dim=1).tolist()
    import inspect

    logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters

    def row_of(
        name: str, method: str, keep: int | None, prompts: list[_Prompt], tpl: Sequence[int]
    ) -> BenchRow:
        return _make_row(name, method, keep, prompts, shape, tpl, param.element_size())

    def note_skip(msg: str) -> None:
        skipped.append(msg)
        if progress:
            print(f"vlmcut bench: skipped {msg}", file=sys.stderr)

    base = _count(model, parts, inputs, text, lambda: None, logits_to_keep)
    clock = SelectionClock(dev)
    variants: list[_Variant] = [_Variant(row_of("unpruned", "none", None, base, []), inputs, lambda: None)]
    skipped: list[str] = []
    refused: set[str] = set()
    oracle_skipped: str | None = None
    if not oracle:
        oracle_skipped = "disabled (oracle=False / --no-oracle)"
    elif "flowcut" not in methods:
        oracle_skipped = "it replays FlowCut's choices; add flowcut to the methods"

    for keep in keeps:
        # One untimed pass per method to learn its real per-layer token counts for the FLOPs model.
        for method in methods:
            if method in refused:
                continue
            if family == "qwen2_vl" and method not in QWEN_METHODS:
                refused.add(method)
                note_skip(
                    f"{method}: not supported on {type(model).__name__}, which supports "
                    f"{', '.join(QWEN_METHODS)} ({method} would prune single vision tokens; the 2x2 patch "
                    f"merger needs whole merge units)"
                )
                continue
            try:
                handle = prune(model, method, keep=keep)
            except ValueError as e:  # e.g. a keep the model cannot honour
                note_skip(f"{method}@{keep}: {e}")
                continue
            try:
                prompts = _count(model, parts, inputs, text, lambda h=handle: h.llm_record, logits_to_keep)
            except ValueError as e:  # e.g. a budget a staged method cannot reach
                note_skip(f"{method}@{keep}: {e}")
                continue
            finally:
                handle.remove()
            row = row_of(f"{method}@{keep}", method, keep, prompts, handle.tokens_per_layer)
            spec = timed_spec(METHODS[method], clock)
            variants.append(
                _Variant(
                    row,
                    inputs,
                    lambda method=method, keep=keep, spec=spec: _prune(model, method, spec, keep=keep),
                    timed=True,
                )
            )
        if oracle_skipped is None and any(v.row.name == f"flowcut@{keep}" for v in variants):
            variants.append(_ORACLES[family](model, parts, inputs, keep, text, row_of, logits_to_keep))
    if len(variants) == 1:
        raise ValueError(
            f"nothing to benchmark on {type(model).__name__} besides the unpruned model: "
            + "; ".join(skipped)
        )

    rounds = warmup + repeats
    rng = random.Random(seed)
    memory = _PeakMemory(dev)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=rounds * len(variants), desc="vlmcut bench", unit="run")
    try:
        for rnd in range(rounds):
            order = list(variants)
            rng.shuffle(order)
            for var in order:
                if bar is not None:
                    bar.set_postfix_str(
                        f"{'warm-up' if rnd < warmup else 'round'} {rnd + 1}/{rounds} {var.row.name}"
                    )
                handle = var.attach()
                try:
                    sample = _measure(
                        model,
                        parts.vision,
                        parts.llm,
                        var.inputs,
                        decode_tokens,
                        dev,
                        memory,
                        logits_to_keep,
                        clock,
                    )
                finally:
                    if handle is not None:
                        handle.remove()
                if rnd >= warmup:
                    r = var.row
                    r.prefill_s.append(sample.prefill_s)
                    r.vision_s.append(sample.vision_s)
                    r.llm_s.append(sample.llm_s)
                    if sample.decode_s is not None:
                        r.decode_s.append(sample.decode_s)
                    r.kv_bytes = sample.kv_bytes
                    if sample.peak_mem is not None:
                        r.peak_mem_bytes.append(sample.peak_mem)
                    if var.timed:
                        r.select_s.append(sample.select_s)
                        r.select_calls = sample.select_calls
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        memory_available = memory.available
        memory.close()

    import transformers

    if dev.type == "cuda":
        device_name = torch.cuda.get_device_name(dev)
        memory_note = "CUDA max_memory_allocated during the prefill, above the memory held before it"
    else:
        device_name = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    device_name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        memory_note = (
            "peak RSS growth during the prefill, sampled every 5 ms from /proc/self/statm (a lower bound: "
            "the allocator reuses memory it already holds; tracemalloc does not see torch and ru_maxrss "
            "is a lifetime high-water mark)"
            if memory_available
            else "n/a: no /proc/self/statm on this OS (tracemalloc does not see torch's allocations)"
        )
    reference = prefill_breakdown(
        shape, None, None, text_tokens=text[0], image_size=None if family == "llava" else size
    )
    meta: dict[str, Any] = {
        "model": label,
        "family": family,
        "model_class": type(model).__name__,
        "llm_layers": int(shape.lm.num_layers),
        "llm_layers_note": note,
        "methods": list(methods),
        "keeps": list(keeps),
        "skipped": skipped,
        "image_size": list(size),
        "device": str(dev),
        "device_name": device_name,
        "dtype": str(torch_dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "batch_size": batch_size,
        "text_tokens": text[0],
        "visual_tokens": per_image,
        "repeats": repeats,
        "warmup": warmup,
        "decode_tokens": decode_tokens,
        "logits_to_keep": logits_to_keep,
        "attn_implementation": getattr(config, "_attn_implementation", None),
        "memory_note": memory_note,
        "selection_note": "time inside each method's selector calls during the prefill (scoring and choosing; "
        + ("CUDA events around each call" if dev.type == "cuda" else "wall clock around each call")
        + "); the tensor surgery that follows a choice is not in it (the oracle does the same surgery)",
        "seed": seed,
        # flops.prefill_breakdown of the unpruned model (paper convention, whole batch): the unpruned row
        # counted from the run's own token counts must equal it
        "unpruned_reference_tflops": batch_size * reference.tflops,
        "oracle": (f"none, {oracle_skipped}" if oracle_skipped is not None else ORACLE_DESCRIPTIONS[family]),
        "oracle_skipped": oracle_skipped,
    }
    result = BenchResult(meta=meta, rows=[v.row for v in variants])
    result.finalise()
    return result


# ---------------------------------------------------------------------------------------------------------
# Oracle variants, one per family
# ---------------------------------------------------------------------------------------------------------

ORACLE_DESCRIPTIONS: dict[str, str] = {
    "llava": "vision tower with FlowCut's recorded per-layer gathers replayed (no scoring) + LLM on a prompt "
    "that already has K placeholders per image",
    "llava_next": "every crop through the tower with FlowCut's recorded per-layer gathers replayed, the prompt "
    "already cut to the packed layout, FlowCut's decoder-layer-1 keep mask replayed (no scoring)",
    "qwen2_vl": "ViT with FlowCut's recorded merge-unit gathers replayed, FlowCut's decoder-layer-1 keep mask "
    "replayed (no scoring); the prompt surgery (M-RoPE ids, compaction) runs as with FlowCut, because the Qwen "
    "attachment takes only the processor's full prompt",
}

_RowMaker = Callable[[str, str, "int | None", "list[_Prompt]", Sequence[int]], BenchRow]


def _forward(model: nn.Module, inputs: dict[str, torch.Tensor], logits_to_keep: bool) -> None:
    with torch.inference_mode():
        model(**inputs, use_cache=False, **({"logits_to_keep": 1} if logits_to_keep else {}))


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is b
    return a.shape == b.shape and bool(torch.equal(a.cpu(), b.cpu()))


def _check_replay(what: str, recorded: Any, replayed: Any, llm_rec: Any, llm_rep: Any) -> None:
    """The replay must keep exactly FlowCut's tokens, in the tower and in the language model (``llm_rec`` /
    ``llm_rep``: ``LLMPassRecord``, or ``None`` where nothing prunes there)."""
    if not _same(recorded.kept_indices, replayed.kept_indices):
        raise RuntimeError(f"{what} oracle replay did not reproduce FlowCut's kept indices")
    if list(recorded.tokens_per_layer) != list(replayed.tokens_per_layer):
        raise RuntimeError(f"{what} oracle replay did not reproduce FlowCut's per-layer token counts")
    a = [] if llm_rec is None else llm_rec.kept_positions
    b = [] if llm_rep is None else llm_rep.kept_positions
    if len(a) != len(b) or not all(_same(x, y) for x, y in zip(a, b, strict=True)):
        raise RuntimeError(f"{what} oracle replay did not reproduce FlowCut's language-model stage")


def _verified_oracle(
    what: str,
    model: nn.Module,
    parts: _Parts,
    prompt: dict[str, torch.Tensor],
    text: Sequence[int],
    attach: Callable[[], Any],
    record: Any,
    llm_record: Any,
    row_of: _RowMaker,
    keep: int,
    logits_to_keep: bool,
) -> _Variant:
    """Run the replay ``attach`` once on ``prompt`` with the counting hooks, check that it keeps exactly the
    recorded tokens (in the tower, and in the language model where ``llm_record`` holds a stage), and build
    the oracle variant."""
    check = attach()
    try:
        prompts = _count(model, parts, prompt, text, lambda: check.llm_record, logits_to_keep)
        _check_replay(what, record, check.record, llm_record, check.llm_record)
    finally:
        check.remove()
    row = row_of(f"oracle@{keep}", "oracle", keep, prompts, record.tokens_per_layer)
    return _Variant(row, prompt, attach)


def _oracle_llava(
    model: nn.Module,
    parts: _Parts,
    inputs: dict[str, torch.Tensor],
    keep: int,
    text: Sequence[int],
    row_of: _RowMaker,
    logits_to_keep: bool,
) -> _Variant:
    """LLaVA-1.5: record FlowCut's gathers once; replay them in the tower on a prompt of ``K`` placeholders."""
    spec, cfg = METHODS["flowcut"], FlowCutConfig(keep=keep)
    recorder: dict[str, _RecordingSelector] = {}

    def make_recording(k: int) -> _RecordingSelector:
        recorder["sel"] = _RecordingSelector(spec.make_selector(cfg, k))
        return recorder["sel"]

    att = LlavaAttachment(model, make_recording, keep)
    try:
        _forward(model, inputs, logits_to_keep)
        record = att.record
    finally:
        att.remove()
    # the passes of the one recorded forward (one per image when the tower ran one image at a time)
    passes, per_image = recorder["sel"].passes, recorder["sel"].per_image_passes
    prompt = dict(inputs)  # the processor's prompt: the replaying attachment cuts it, as FlowCut's does

    def attach() -> LlavaAttachment:
        return LlavaAttachment(model, lambda k: ReplaySelector(passes, k, per_image), keep)

    return _verified_oracle(
        "LLaVA", model, parts, prompt, text, attach, record, None, row_of, keep, logits_to_keep
    )


def _oracle_llava_next(
    model: nn.Module,
    parts: _Parts,
    inputs: dict[str, torch.Tensor],
    keep: int,
    text: Sequence[int],
    row_of: _RowMaker,
    logits_to_keep: bool,
) -> _Variant:
    """LLaVA-NeXT: FlowCut's two stages recorded (per-crop tower gathers, the decoder-layer-1 keep mask) and
    replayed on a prompt already cut to the packed layout."""
    spec, cfg = METHODS["flowcut"], FlowCutConfig(keep=keep)
    encoders: dict[int, _RecordingSelector] = {}
    stages: list[_RecordingLLMSelector] = []

    def make_recording(budget: int) -> _RecordingSelector:
        encoders[budget] = _RecordingSelector(spec.make_selector(cfg, budget))
        return encoders[budget]

    def make_stage(lm: nn.Module) -> DecoderPruner:
        stages.append(_RecordingLLMSelector(spec.make_second_stage(cfg, keep)))
        return DecoderPruner(lm, stages[-1])

    att = LlavaNextAttachment(model, make_recording, keep, two_stage=True, make_llm_stage=make_stage)
    try:
        _forward(model, inputs, logits_to_keep)
        record, llm_record = att.record, att.llm_record
    finally:
        att.remove()
    steps = {b: (r.passes, r.per_image_passes) for b, r in encoders.items()}
    llm_layers, llm_masks = stages[-1].layers, stages[-1].masks
    prompt = dict(inputs)  # the processor's prompt: the replaying attachment cuts it, as FlowCut's does

    def attach() -> LlavaNextAttachment:
        return LlavaNextAttachment(
            model,
            lambda b: ReplaySelector(steps[b][0], b, steps[b][1]) if b in steps else ReplaySelector({}, b),
            keep,
            two_stage=True,
            make_llm_stage=lambda lm: DecoderPruner(lm, ReplayLLMSelector(llm_layers, llm_masks)),
        )

    return _verified_oracle(
        "LLaVA-NeXT", model, parts, prompt, text, attach, record, llm_record, row_of, keep, logits_to_keep
    )


class _ReplayFactory:
    """Encoder selectors for :class:`QwenAttachment`: the ``i``-th one of a forward replays the ``i``-th
    recorded scoring group (the attachment makes them in group order, one per group it prunes)."""

    def __init__(self, steps: list[dict[int, torch.Tensor]]) -> None:
        self.steps = steps
        self.calls = 0

    def __call__(self, budget: int) -> ReplaySelector:
        steps = self.steps[self.calls % len(self.steps)] if self.steps else {}
        self.calls += 1
        return ReplaySelector(steps, budget)


def _oracle_qwen(
    model: nn.Module,
    parts: _Parts,
    inputs: dict[str, torch.Tensor],
    keep: int,
    text: Sequence[int],
    row_of: _RowMaker,
    logits_to_keep: bool,
) -> _Variant:
    """Qwen2-VL: FlowCut's merge-unit gathers (per scoring group) and decoder-layer-1 keep mask, replayed."""
    spec, cfg = METHODS["flowcut"], FlowCutConfig(keep=keep)
    encoders: list[_RecordingSelector] = []
    stages: dict[int, _RecordingLLMSelector] = {}

    def make_recording(budget: int) -> _RecordingSelector:
        encoders.append(_RecordingSelector(spec.make_selector(cfg, budget)))
        return encoders[-1]

    def make_stage(target: int) -> _RecordingLLMSelector:
        stages[target] = _RecordingLLMSelector(spec.make_second_stage(cfg, target))
        return stages[target]

    att = QwenAttachment(model, keep, make_recording, make_stage)
    encoders.clear()  # the constructor's probe
    try:
        _forward(model, inputs, logits_to_keep)
        record, llm_record = att.record, att.llm_record
    finally:
        att.remove()
    steps = [r.steps for r in encoders]
    recorded = {t: (r.layers, r.masks) for t, r in stages.items()}

    def attach() -> QwenAttachment:
        factory = _ReplayFactory(steps)
        out = QwenAttachment(model, keep, factory, lambda t: ReplayLLMSelector(*recorded[t]))
        factory.calls = 0  # forget the constructor's probe
        return out

    return _verified_oracle(
        "Qwen2-VL", model, parts, inputs, text, attach, record, llm_record, row_of, keep, logits_to_keep
    )


_ORACLES: dict[str, Callable[..., _Variant]] = {
    "llava": _oracle_llava,
    "llava_next": _oracle_llava_next,
    "qwen2_vl": _oracle_qwen,
}


def print_summary(result: BenchResult, paths: dict[str, Path] | None = None) -> None:
    """Print the Markdown table and the PASS/MISS lines."""
    print(result.to_markdown())
    if paths:
        for kind, p in paths.items():
            print(f"wrote {kind}: {p}")


__all__ = [
    "EXEC_CONVENTION",
    "ORACLE_DESCRIPTIONS",
    "BenchResult",
    "BenchRow",
    "ReplayLLMSelector",
    "ReplaySelector",
    "SelectionClock",
    "TargetCheck",
    "bench_image_size",
    "cache_bytes",
    "load_model",
    "model_family",
    "print_summary",
    "run_benchmark",
    "timed_spec",
]
