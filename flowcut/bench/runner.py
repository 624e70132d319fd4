"""End-to-end efficiency benchmark: unpruned vs pruned vs oracle LLaVA, timed A/B and counted analytically.

:func:`run_benchmark` builds (or loads) one LLaVA model and measures, for the unpruned model, every
``method x keep`` and one **oracle** per ``keep``:

* analytic TFLOPs of the prefill (vision tower + projector + LLM + ``lm_head``) from the *real* per-layer
  token counts of the run (``handle.tokens_per_layer``), with :data:`flowcut.bench.flops.PAPER_CONVENTION`
  (the paper's Table 5 accounting: ``lm_head`` on every prompt position, no attention products) and with
  an *executed* convention (:data:`EXEC_CONVENTION`: attention products counted, ``lm_head`` on the last
  position only, which is what the timed forward with ``logits_to_keep=1`` runs). The FLOPs-allowed
  speed-up is computed with the executed convention;
* prefill wall time (one forward with the image, ``use_cache=True``, ``logits_to_keep=1``), the vision
  tower's share and the language model's share (:class:`flowcut.bench.timing.StageTimer`);
* decode time per token (greedy forward steps on the returned KV cache);
* KV-cache bytes (read from the returned cache; cross-checked with :func:`flowcut.bench.flops.kv_cache_bytes`);
* peak memory: CUDA ``max_memory_allocated`` above the weights; on CPU the peak resident-set growth
  during the prefill, sampled from ``/proc/self/statm`` every few ms (a lower bound: the allocator may
  reuse memory it already holds; ``tracemalloc`` does not see torch's allocations and ``ru_maxrss`` is a
  process-lifetime high-water mark, useless once a bigger variant has run).

Timing protocol: ``warmup`` untimed rounds, then ``repeats`` rounds; every round runs every variant once,
in a freshly shuffled order (seeded), attaching the pruning hooks just before and removing them just after
the variant's own calls, so slow drifts of a shared machine hit all variants alike. Ratios against the
unpruned model are medians of the per-round (paired) ratios.

The oracle
----------
"The same model fed exactly the kept tokens, without the selection work": the oracle runs the same vision
tower on the same image, with a *fixed, precomputed* index gather after exactly the layers where FlowCut
pruned (the indices FlowCut chose for this input, recorded once in a set-up pass), so every encoder layer
sees the same number of tokens as with FlowCut, and the language model receives a prompt that already has
exactly ``K`` placeholders per image. It keeps the same hook plumbing (q/k/v capture, gather) and skips
only FlowCut's scoring, so ``selection overhead = flowcut prefill / oracle prefill - 1`` is the cost of
choosing the tokens. Its TFLOPs equal FlowCut's (the scoring itself is ``O(T)`` per layer and not counted).
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import random
import statistics
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..api import available_methods, prune
from ..methods.flowcut import FlowCutConfig, FlowCutSelector
from ..models.llava import LlavaAttachment, compact_prompt, llava_parts, placeholder_drop_mask
from .flops import (
    DENSE_CONVENTION,
    PAPER_CONVENTION,
    FlopsConvention,
    kv_cache_bytes,
    model_shape,
    prefill_breakdown,
)
from .presets import PRESETS, build_preset_model, example_inputs, get_preset

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

    Times are seconds, one entry per timed round (``decode_s``: mean per-token time of that round).
    ``vision_tokens`` is the sequence length entering every encoder layer (global token included);
    ``tokens_per_layer`` the patch tokens after every layer (what ``handle.tokens_per_layer`` reports).
    """

    name: str
    method: str  # "none", a method name, or "oracle"
    keep: int | None
    llm_visual_tokens: int
    text_tokens: int
    vision_tokens: list[int]
    tokens_per_layer: list[int]
    tflops: float  # PAPER_CONVENTION, whole batch
    tflops_parts: dict[str, float]  # PAPER_CONVENTION: vision / projector / llm / lm_head (TFLOPs)
    tflops_exec: float  # EXEC_CONVENTION, whole batch
    prefill_s: list[float] = field(default_factory=list)
    vision_s: list[float] = field(default_factory=list)
    llm_s: list[float] = field(default_factory=list)
    decode_s: list[float] = field(default_factory=list)
    kv_bytes: int | None = None
    kv_bytes_analytic: int | None = None
    peak_mem_bytes: list[int] = field(default_factory=list)
    # Filled by BenchResult.finalise(): paired ratios against the unpruned row.
    speedup: float = math.nan
    vision_ratio: float = math.nan
    tflops_ratio: float = math.nan
    flops_speedup: float = math.nan  # EXEC_CONVENTION
    flops_speedup_paper: float = math.nan
    flops_fraction: float = math.nan  # speedup / flops_speedup

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
        d["stats"] = {k: self.stat(k) for k in ("prefill_s", "vision_s", "llm_s", "decode_s")}
        d["peak_mem_bytes_median"] = _median(self.peak_mem_bytes) if self.peak_mem_bytes else None
        return d


@dataclass
class TargetCheck:
    """One of the issue's targets, evaluated on this run."""

    name: str
    keep: int
    value: float
    threshold: float
    passed: bool
    detail: str

    @property
    def verdict(self) -> str:
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
            if oracle is not None:
                ov = _paired(fc.prefill_s, oracle.prefill_s) - 1.0
                checks.append(
                    TargetCheck(
                        "selection overhead (flowcut / oracle prefill - 1)",
                        k,
                        ov,
                        TARGET_SELECTION_OVERHEAD,
                        ov <= TARGET_SELECTION_OVERHEAD,
                        f"{100 * ov:+.1f} % (target <= {100 * TARGET_SELECTION_OVERHEAD:.0f} %)",
                    )
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
        return {
            "meta": self.meta,
            "rows": [r.as_dict() for r in self.rows],
            "targets": [{**dataclasses.asdict(t), "verdict": t.verdict} for t in self.targets],
        }

    def to_markdown(self) -> str:
        """The results table, the token schedules and the targets, as Markdown."""
        m = self.meta
        lines = [f"# FlowCut efficiency benchmark: {m['model']}", ""]
        lines.append(
            f"- device: {m['device']} ({m['device_name']}), dtype {m['dtype']}, torch {m['torch']}, "
            f"transformers {m['transformers']}, {m['threads']} CPU threads"
        )
        lines.append(
            f"- batch {m['batch_size']}, {m['text_tokens']} text tokens + {m['visual_tokens']} visual tokens "
            f"per sample, {m['repeats']} timed rounds after {m['warmup']} warm-up rounds, variants interleaved "
            f"in a shuffled order every round; {m['decode_tokens']} greedy decode steps per round"
        )
        if m.get("llm_layers_note"):
            lines.append(f"- **{m['llm_layers_note']}**")
        lines.append(
            "- TFLOPs: paper convention (Table 5: 2 x weights x tokens, `lm_head` on every prompt position); "
            "'exec' = attention products counted, `lm_head` on the last position (what the timed forward "
            "runs, `logits_to_keep=1`); the FLOPs-allowed speed-up uses 'exec'"
        )
        lines.append(
            "- times: median [IQR] over rounds; speed-up = median of per-round paired ratios against the "
            "unpruned model; fraction = measured speed-up / FLOPs-allowed speed-up"
        )
        lines.append(f"- memory: {m['memory_note']}")
        lines.append("")
        head = (
            "| variant | LLM visual tokens | TFLOPs (paper) | TFLOPs (exec) | prefill ms | speed-up | "
            "FLOPs speed-up | fraction | vision ms | vision ratio | LLM ms | decode ms/token | KV MiB | "
            "peak mem MiB |"
        )
        lines += [head, "|" + "---|" * (head.count("|") - 1)]
        for r in self.rows:
            p, v, llm, dec = (r.stat(k) for k in ("prefill_s", "vision_s", "llm_s", "decode_s"))
            mem = _median(r.peak_mem_bytes) if r.peak_mem_bytes else None
            lines.append(
                f"| {r.name} | {r.llm_visual_tokens} | {r.tflops:.4g} | {r.tflops_exec:.4g} | "
                f"{1e3 * p['median']:.1f} [{1e3 * p['q1']:.1f}, {1e3 * p['q3']:.1f}] | {r.speedup:.2f}x | "
                f"{r.flops_speedup:.2f}x | {100 * r.flops_fraction:.0f} % | {1e3 * v['median']:.1f} | "
                f"{r.vision_ratio:.3f} | {1e3 * llm['median']:.1f} | "
                + (f"{1e3 * dec['median']:.1f}" if r.decode_s else "n/a")
                + f" | {_mib(r.kv_bytes)} | "
                + (f"{mem / 2**20:.0f}" if mem is not None else "n/a")
                + " |"
            )
        lines += [
            "",
            "Vision tokens entering each encoder layer (global token included; `n x c` = n for c layers):",
            "",
        ]
        for r in self.rows:
            lines.append(f"- {r.name}: {_runs(r.vision_tokens)}")
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
    if isinstance(o, float) and not math.isfinite(o):
        return None
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


# ---------------------------------------------------------------------------------------------------------
# The oracle: a replay of FlowCut's gathers, no scoring
# ---------------------------------------------------------------------------------------------------------


class _RecordingSelector:
    """Wraps a selector and records the indices it returns per layer (for the oracle's replay)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.keep = inner.keep
        self.steps: dict[int, torch.Tensor] = {}

    def start(self, consume_layer: int) -> None:
        self.steps = {}
        self.inner.start(consume_layer)

    def needs_scores(self, num_patches: int) -> bool:
        return self.inner.needs_scores(num_patches)

    def step(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, has_cls: bool
    ) -> torch.Tensor | None:
        idx = self.inner.step(layer, q, k, v, scale, has_cls)
        if idx is not None:
            self.steps[layer] = idx.detach().clone()
        return idx


class ReplaySelector:
    """Oracle selector: returns precomputed indices after the recorded layers; computes nothing."""

    def __init__(self, steps: dict[int, torch.Tensor], keep: int) -> None:
        self.steps = steps
        self.keep = keep

    def start(self, consume_layer: int) -> None:
        pass

    def needs_scores(self, num_patches: int) -> bool:
        return num_patches > self.keep

    def step(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, has_cls: bool
    ) -> torch.Tensor | None:
        return self.steps.get(layer)


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


def _measure(
    model: nn.Module,
    vision: nn.Module,
    llm: nn.Module,
    inputs: dict[str, torch.Tensor],
    decode_tokens: int,
    device: torch.device,
    memory: _PeakMemory,
    logits_to_keep: bool,
) -> _Sample:
    """One prefill (timed as a whole and per stage) and ``decode_tokens`` greedy steps on its cache."""
    from .timing import StageTimer

    extra: dict[str, Any] = {"use_cache": True}
    if logits_to_keep:
        extra["logits_to_keep"] = 1
    with torch.inference_mode():
        with StageTimer(vision, llm) as timer:
            memory.start()
            _sync(device)
            t0 = time.perf_counter()
            out = model(**inputs, **extra)
            _sync(device)
            prefill = time.perf_counter() - t0
            peak = memory.stop()
        cache = out.past_key_values
        kv = cache_bytes(cache)
        decode: float | None = None
        if decode_tokens > 0:
            token = out.logits[:, -1].argmax(dim=-1, keepdim=True)
            steps = []
            for _ in range(decode_tokens):
                _sync(device)
                t0 = time.perf_counter()
                step = model(input_ids=token, past_key_values=cache, **extra)
                _sync(device)
                steps.append(time.perf_counter() - t0)
                cache = step.past_key_values
                token = step.logits[:, -1].argmax(dim=-1, keepdim=True)
            decode = statistics.median(steps)
    return _Sample(
        prefill_s=prefill,
        vision_s=sum(timer.times.vision),
        llm_s=timer.times.prefill,
        decode_s=decode,
        kv_bytes=kv,
        peak_mem=peak,
    )


# ---------------------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------------------


@dataclass
class _Variant:
    row: BenchRow
    inputs: dict[str, torch.Tensor]
    attach: Callable[[], Any]  # -> handle-like with .remove() (and maybe .tokens_per_layer), or None


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

    ``model_or_preset``: a preset name (random weights from its config), a local Hugging Face LLaVA
    directory, or a ready ``LlavaForConditionalGeneration`` (used as is; ``layers`` must be ``None``).
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
        from transformers import LlavaForConditionalGeneration

        model = LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
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


def _vision_in(tokens_per_layer: Sequence[int], num_patches: int, has_cls: bool) -> list[int]:
    """Sequence length entering every encoder layer, from the patch counts after every layer."""
    g = int(has_cls)
    return [num_patches + g] + [t + g for t in list(tokens_per_layer)[:-1]]


def run_benchmark(
    model_or_preset: str | Path | nn.Module,
    methods: Sequence[str] = ("flowcut", "random", "grid"),
    keeps: Sequence[int] = (128, 64),
    *,
    layers: int | None = None,
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
        model_or_preset: a preset name (``"llava-1.5-7b"``, ``"tiny"``...; random weights), a local LLaVA
            directory, or a ``LlavaForConditionalGeneration`` instance. Only LLaVA(-1.5) is supported.
        methods: pruning methods (``flowcut.available_methods()``).
        keeps: visual tokens per image to keep.
        layers: shorten the language model to this many decoder layers (presets / directories only).
        text_tokens: text tokens of the prompt besides the image placeholders (65: a POPE prompt).
        repeats: timed rounds; warmup: untimed rounds before them.
        decode_tokens: greedy decode steps after every prefill (0: skip decode timing).
        batch_size: images (= prompts) per forward.
        dtype: parameter dtype; default float32 on CPU, bfloat16 on CUDA.
        device: ``"cpu"`` or ``"cuda"``.
        oracle: add one oracle row per keep (needs ``"flowcut"`` in ``methods``).
        seed: seeds the weights, the inputs and the order of variants in each round.
        progress: show a tqdm progress bar.

    Returns:
        A :class:`BenchResult` (already finalised: ratios and targets filled in).
    """
    unknown = sorted(set(methods) - set(available_methods()))
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; available: {available_methods()}")
    if repeats < 1 or warmup < 0 or decode_tokens < 0 or batch_size < 1:
        raise ValueError("repeats >= 1, warmup >= 0, decode_tokens >= 0 and batch_size >= 1 are required")
    dev = torch.device(device)
    torch_dtype = _resolve_dtype(dtype, dev)
    model, label, note = load_model(model_or_preset, layers, torch_dtype, dev, seed=seed)
    parts = llava_parts(model)
    if parts is None:
        raise TypeError(
            f"{type(model).__name__}: the benchmark supports LLaVA (LlavaForConditionalGeneration) only, "
            f"as flowcut.prune does today"
        )
    outer, inner = parts
    if outer is not model or not hasattr(model, "lm_head"):
        raise TypeError("pass a LlavaForConditionalGeneration (the model with the lm_head)")
    config = model.config
    vision, llm = inner.vision_tower, inner.language_model
    shape = model_shape(config)
    param = next(model.parameters())
    inputs = example_inputs(
        config, text_tokens=text_tokens, batch_size=batch_size, seed=seed, dtype=param.dtype
    )
    inputs = {k: v.to(dev) for k, v in inputs.items()}
    image_id = int(config.image_token_index)
    per_image = int((inputs["input_ids"][0] == image_id).sum())
    n_text = int(inputs["input_ids"].shape[1]) - per_image
    num_patches = int(shape.vision.patches_per_image or 0)
    has_cls = shape.vision.has_cls
    num_layers = shape.vision.num_layers
    pad = getattr(config.text_config, "pad_token_id", None)
    pad = 0 if pad is None else int(pad)
    import inspect

    logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters

    def make_row(name: str, method: str, keep: int | None, tpl: list[int], llm_visual: int) -> BenchRow:
        vin = _vision_in(tpl, num_patches, has_cls)
        paper = prefill_breakdown(shape, vin, llm_visual, text_tokens=n_text, convention=PAPER_CONVENTION)
        ex = prefill_breakdown(shape, vin, llm_visual, text_tokens=n_text, convention=EXEC_CONVENTION)
        return BenchRow(
            name=name,
            method=method,
            keep=keep,
            llm_visual_tokens=llm_visual,
            text_tokens=n_text,
            vision_tokens=vin,
            tokens_per_layer=list(tpl),
            tflops=batch_size * paper.tflops,
            tflops_parts={
                k: batch_size * getattr(paper, k) / 1e12 for k in ("vision", "projector", "llm", "lm_head")
            },
            tflops_exec=batch_size * ex.tflops,
            kv_bytes_analytic=kv_cache_bytes(
                shape, llm_visual + n_text, bytes_per_value=param.element_size(), batch_size=batch_size
            ),
        )

    variants: list[_Variant] = [
        _Variant(
            make_row("unpruned", "none", None, [num_patches] * num_layers, per_image), inputs, lambda: None
        )
    ]
    memory = _PeakMemory(dev)

    for keep in keeps:
        # One untimed pass per method to learn its real per-layer token counts for the FLOPs model.
        for method in methods:
            with prune(model, method, keep=keep) as handle, torch.inference_mode():
                model(**inputs, use_cache=False, **({"logits_to_keep": 1} if logits_to_keep else {}))
            tpl = handle.tokens_per_layer
            llm_visual = min(keep, per_image)
            row = make_row(f"{method}@{keep}", method, keep, tpl, llm_visual)
            variants.append(
                _Variant(row, inputs, lambda method=method, keep=keep: prune(model, method, keep=keep))
            )
        if oracle and "flowcut" in methods:
            variants.append(
                _oracle_variant(model, inputs, keep, per_image, image_id, pad, make_row, logits_to_keep)
            )

    rounds = warmup + repeats
    rng = random.Random(seed)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=rounds * len(variants), desc="flowcut bench", unit="run")
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
                        model, vision, llm, var.inputs, decode_tokens, dev, memory, logits_to_keep
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
    meta: dict[str, Any] = {
        "model": label,
        "llm_layers": int(shape.lm.num_layers),
        "llm_layers_note": note,
        "methods": list(methods),
        "keeps": list(keeps),
        "device": str(dev),
        "device_name": device_name,
        "dtype": str(torch_dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "batch_size": batch_size,
        "text_tokens": n_text,
        "visual_tokens": per_image,
        "repeats": repeats,
        "warmup": warmup,
        "decode_tokens": decode_tokens,
        "logits_to_keep": logits_to_keep,
        "attn_implementation": getattr(config, "_attn_implementation", None),
        "memory_note": memory_note,
        "seed": seed,
        "oracle": "vision tower with FlowCut's recorded per-layer gathers replayed (no scoring) + LLM on K "
        "placeholders per image",
    }
    result = BenchResult(meta=meta, rows=[v.row for v in variants])
    result.finalise()
    return result


def _oracle_variant(
    model: nn.Module,
    inputs: dict[str, torch.Tensor],
    keep: int,
    per_image: int,
    image_id: int,
    pad: int,
    make_row: Callable[..., BenchRow],
    logits_to_keep: bool,
) -> _Variant:
    """Record FlowCut's per-layer gathers on ``inputs`` once and build the oracle variant replaying them."""
    recorder: dict[str, _RecordingSelector] = {}

    def make_recording(k: int) -> _RecordingSelector:
        recorder["sel"] = _RecordingSelector(FlowCutSelector(FlowCutConfig(keep=keep), keep=k))
        return recorder["sel"]

    att = LlavaAttachment(model, make_recording, keep)
    try:
        with torch.inference_mode():
            model(**inputs, use_cache=False, **({"logits_to_keep": 1} if logits_to_keep else {}))
        record = att.record
    finally:
        att.remove()
    steps = recorder["sel"].steps
    keep_patches = att.keep_patches
    kept = min(keep, per_image)
    drop = placeholder_drop_mask(inputs["input_ids"], image_id, per_image, kept)
    compact, _ = compact_prompt(dict(inputs), drop, pad)
    assert int((compact["input_ids"] == image_id).sum()) == kept * inputs["input_ids"].shape[0]

    class _OracleHandle:
        def __init__(self) -> None:
            self.att = LlavaAttachment(model, lambda k: ReplaySelector(steps, k), keep)

        def remove(self) -> None:
            self.att.remove()

    # Sanity: the replay keeps exactly FlowCut's tokens.
    check = _OracleHandle()
    try:
        with torch.inference_mode():
            model(**compact, use_cache=False, **({"logits_to_keep": 1} if logits_to_keep else {}))
        replay = check.att.record
    finally:
        check.remove()
    if record.kept_indices is not None and not torch.equal(replay.kept_indices, record.kept_indices):
        raise RuntimeError("oracle replay did not reproduce FlowCut's kept indices")
    if replay.tokens_per_layer != record.tokens_per_layer:
        raise RuntimeError("oracle replay did not reproduce FlowCut's per-layer token counts")
    assert keep_patches >= 1
    row = make_row(f"oracle@{keep}", "oracle", keep, list(record.tokens_per_layer), kept)
    return _Variant(row, compact, _OracleHandle)


def print_summary(result: BenchResult, paths: dict[str, Path] | None = None) -> None:
    """Print the Markdown table and the PASS/MISS lines."""
    print(result.to_markdown())
    if paths:
        for kind, p in paths.items():
            print(f"wrote {kind}: {p}")


__all__ = [
    "EXEC_CONVENTION",
    "BenchResult",
    "BenchRow",
    "ReplaySelector",
    "TargetCheck",
    "cache_bytes",
    "load_model",
    "print_summary",
    "run_benchmark",
]
