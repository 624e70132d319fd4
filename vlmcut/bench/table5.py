"""The paper's Table 5 (prefill time, speed-up, TFLOPs) measured with :func:`vlmcut.bench.runner.run_benchmark`.

Two benchmarks, one per model of Table 5, at full depth, every method the model supports plus the unpruned
and oracle rows:

* LLaVA-1.5-7B: 576 visual tokens, keeps 192 / 128 / 64;
* LLaVA-NeXT-7B: a 672x672 image, so that anyres picks the 2x2 grid plus the base crop (5 crops of 576 =
  the paper's nominal 2880 tokens, + 48 newline tokens), keeps 640 / 320 / 160.

Output (at most 2 folder levels and 8 files, what the device machine sends back): ``table5.md`` and
``table5.json`` (our rows beside the paper's, the targets, what was skipped and why), and per model a folder
with the runner's full ``bench.md`` / ``bench.json`` (no PNG: matplotlib is not needed). ``--dry-run`` runs
the same code on the tiny CPU presets (``tiny``, ``tiny-llava-next``) with float32, 1 round and small keeps,
so that the one GPU call cannot fail on a typo; its targets are printed but mean nothing.

Run it through ``scripts/gpu_table.sh`` (it carries the tested ``transformers`` to the device).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .flops import PAPER_TFLOPS

# ---------------------------------------------------------------------------------------------------------
# The paper's numbers (FlowCut, NeurIPS 2025, Table 5: POPE, one NVIDIA A800)
# ---------------------------------------------------------------------------------------------------------

PAPER_DEVICE = "one NVIDIA A800"
PAPER_SOURCE = "FlowCut (NeurIPS 2025), Table 5"

# Table 5, prefill time in ms, "model/method/tokens" (same keys as flops.PAPER_TFLOPS).
PAPER_PREFILL_MS: dict[str, float] = {
    "llava-1.5-7b/none/576": 102.0,
    "llava-1.5-7b/fastv/64": 87.3,
    "llava-1.5-7b/sparsevlm/64": 90.1,
    "llava-1.5-7b/pdrop/64": 72.5,
    "llava-1.5-7b/visionzip/64": 69.2,
    "llava-1.5-7b/flowcut/64": 62.6,
    "llava-next-7b/none/2880": 206.0,
    "llava-next-7b/fastv/160": 117.0,
    "llava-next-7b/sparsevlm/160": 136.0,
    "llava-next-7b/pdrop/160": 79.5,
    "llava-next-7b/visionzip/160": 69.9,
    "llava-next-7b/flowcut/160": 63.8,
}

# Table 5, prefill speed-up against the unpruned model, as printed (one decimal).
PAPER_SPEEDUP: dict[str, float] = {
    "llava-1.5-7b/none/576": 1.0,
    "llava-1.5-7b/fastv/64": 1.2,
    "llava-1.5-7b/sparsevlm/64": 1.1,
    "llava-1.5-7b/pdrop/64": 1.4,
    "llava-1.5-7b/visionzip/64": 1.5,
    "llava-1.5-7b/flowcut/64": 1.6,
    "llava-next-7b/none/2880": 1.0,
    "llava-next-7b/fastv/160": 1.8,
    "llava-next-7b/sparsevlm/160": 1.5,
    "llava-next-7b/pdrop/160": 2.6,
    "llava-next-7b/visionzip/160": 2.9,
    "llava-next-7b/flowcut/160": 3.2,
}

METHOD_TITLES: dict[str, str] = {
    "none": "unpruned",
    "flowcut": "FlowCut",
    "fastv": "FastV",
    "sparsevlm": "SparseVLM",
    "pdrop": "PDrop",
    "visionzip": "VisionZip",
    "fastervlm": "FasterVLM",
    "random": "random",
    "grid": "grid",
    "oracle": "oracle",
}


@dataclass(frozen=True)
class ModelSpec:
    """One benchmark of the table.

    ``key`` names the paper's model (keys of :data:`PAPER_PREFILL_MS`); ``paper_keeps[i]`` is the keep of
    the paper's scale that ``keeps[i]`` stands for (equal on the full-size presets; the dry run's tiny keeps
    stand for them); ``nominal_tokens`` is the paper's unpruned token count; ``target_keep`` the paper keep
    at which FlowCut's speed-up is checked against the paper's.
    """

    key: str
    title: str
    preset: str
    keeps: tuple[int, ...]
    paper_keeps: tuple[int, ...]
    nominal_tokens: int
    target_keep: int
    image_size: tuple[int, int] | None = None  # (height, width); None: the tower's own size (LLaVA-1.5)

    def paper_key(self, method: str, keep: int | None) -> str | None:
        """The paper's key of a row (``None`` for variants that are not in Table 5)."""
        if method == "none":
            return f"{self.key}/none/{self.nominal_tokens}"
        if keep is None or keep not in self.keeps:
            return None
        key = f"{self.key}/{method}/{self.paper_keeps[self.keeps.index(keep)]}"
        return key if key in PAPER_PREFILL_MS else None

    def keep_for(self, paper_keep: int) -> int:
        return self.keeps[self.paper_keeps.index(paper_keep)]


PAPER_SPECS: tuple[ModelSpec, ...] = (
    ModelSpec("llava-1.5-7b", "LLaVA-1.5-7B", "llava-1.5-7b", (192, 128, 64), (192, 128, 64), 576, 64),
    ModelSpec(
        "llava-next-7b",
        "LLaVA-NeXT-7B",
        "llava-next-7b",
        (640, 320, 160),
        (640, 320, 160),
        2880,
        160,
        (672, 672),  # anyres: 2x2 grid + base crop = 5 x 576
    ),
)
# The same two benchmarks on the CPU toys: 64 patches per crop (112 px, patch 14); 224x224 gives the tiny
# LLaVA-NeXT the same 2x2 grid + base crop (5 x 64 = 320 nominal). Keeps keep the paper's ratios roughly.
DRY_SPECS: tuple[ModelSpec, ...] = (
    ModelSpec("llava-1.5-7b", "LLaVA-1.5-7B (dry run: tiny)", "tiny", (24, 16, 8), (192, 128, 64), 576, 64),
    ModelSpec(
        "llava-next-7b",
        "LLaVA-NeXT-7B (dry run: tiny-llava-next)",
        "tiny-llava-next",
        (72, 36, 18),
        (640, 320, 160),
        2880,
        160,
        (224, 224),
    ),
)


@dataclass(frozen=True)
class RunConfig:
    """How both benchmarks are run."""

    dry_run: bool
    device: str
    dtype: str
    repeats: int
    warmup: int
    decode_tokens: int
    methods: tuple[str, ...]
    seed: int = 0
    threads: int | None = None  # torch CPU threads (None: torch's default)


# ---------------------------------------------------------------------------------------------------------
# Building the table from BenchResults
# ---------------------------------------------------------------------------------------------------------

_NOTE = re.compile(r"^(?P<method>[A-Za-z0-9_]+)(?:@(?P<keep>\d+))?: (?P<reason>.*)$", re.S)


def _num(x: Any, digits: int | None = None) -> float | None:
    """A finite float (rounded to ``digits``) or ``None``."""
    if x is None:
        return None
    x = float(x)
    if not math.isfinite(x):
        return None
    return round(x, digits) if digits is not None else x


def _ms(xs: Sequence[float]) -> dict[str, float | None]:
    """Median, quartiles and IQR of a series of seconds, in ms."""
    import statistics

    if not xs:
        return {"median": None, "q1": None, "q3": None, "iqr": None}
    med = statistics.median(xs)
    if len(xs) < 2:
        q1 = q3 = xs[0]
    else:
        q = statistics.quantiles(xs, n=4, method="inclusive")
        q1, q3 = q[0], q[2]
    return {
        "median": _num(1e3 * med, 3),
        "q1": _num(1e3 * q1, 3),
        "q3": _num(1e3 * q3, 3),
        "iqr": _num(1e3 * (q3 - q1), 3),
    }


def _paper(key: str | None) -> dict[str, Any] | None:
    if key is None or key not in PAPER_PREFILL_MS:
        return None
    return {
        "key": key,
        "prefill_ms": PAPER_PREFILL_MS[key],
        "speedup": PAPER_SPEEDUP[key],
        "tflops": PAPER_TFLOPS.get(key),
    }


def model_table(
    spec: ModelSpec,
    result: Any | None,
    methods: Sequence[str],
    error: str | None = None,
    bench_dir: str | None = None,
) -> dict[str, Any]:
    """One model's part of ``table5.json`` from a finalised :class:`~vlmcut.bench.results.BenchResult`.

    ``methods``: the methods that were asked for; every ``method x keep`` (and the oracle per keep) either
    has a row or is listed under ``skipped`` with a reason. ``result=None`` with ``error``: the model failed.
    """
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    meta: dict[str, Any] = {}
    if result is not None:
        meta = result.meta
        for r in result.rows:
            paper_keep = spec.paper_keeps[spec.keeps.index(r.keep)] if r.keep in spec.keeps else None
            mem = sorted(r.peak_mem_bytes)
            rows.append(
                {
                    "name": r.name,
                    "method": r.method,
                    "keep": r.keep,
                    "paper_keep": paper_keep,
                    "llm_visual_tokens_first": r.llm_visual_tokens[0] if r.llm_visual_tokens else None,
                    "llm_visual_tokens_last": r.llm_visual_tokens[-1] if r.llm_visual_tokens else None,
                    "prefill_ms": _ms(r.prefill_s),
                    "vision_ms": _ms(r.vision_s)["median"],
                    "speedup": _num(r.speedup, 4),
                    "flops_speedup": _num(r.flops_speedup, 4),
                    "flops_fraction": _num(r.flops_fraction, 4),
                    "tflops": _num(r.tflops),
                    "tflops_exec": _num(r.tflops_exec),
                    "peak_mem_mib": _num(mem[len(mem) // 2] / 2**20, 1) if mem else None,
                    "paper": _paper(spec.paper_key(r.method, r.keep)),
                }
            )
    have = {(r["method"], r["keep"]) for r in rows}
    notes: dict[tuple[str, int | None], str] = {}
    for note in meta.get("skipped", []):
        m = _NOTE.match(str(note))
        if m:
            keep = int(m["keep"]) if m["keep"] else None
            notes[(m["method"], keep)] = m["reason"].strip()
    for keep in spec.keeps:
        for method in [*methods, "oracle"]:
            if (method, keep) in have:
                continue
            if error is not None:
                reason = f"not run: the benchmark failed ({error})"
            elif method == "oracle":
                if "flowcut" not in methods:
                    reason = "the oracle replays FlowCut's choices and flowcut was not asked for"
                elif ("flowcut", keep) not in have:
                    reason = f"flowcut@{keep} was skipped, so there is nothing to replay"
                else:
                    reason = str(meta.get("oracle_skipped") or "no oracle row (no reason given)")
            else:
                reason = notes.get((method, keep)) or notes.get((method, None)) or "no row (no reason given)"
            skipped.append({"method": method, "keep": keep, "reason": reason})
    return {
        "key": spec.key,
        "title": spec.title,
        "preset": spec.preset,
        "keeps": list(spec.keeps),
        "paper_keeps": list(spec.paper_keeps),
        "nominal_tokens": spec.nominal_tokens,
        "image_size": list(spec.image_size) if spec.image_size else meta.get("image_size"),
        "visual_tokens": meta.get("visual_tokens"),
        "text_tokens": meta.get("text_tokens"),
        "llm_layers": meta.get("llm_layers"),
        "device_name": meta.get("device_name"),
        "dtype": meta.get("dtype"),
        "attn_implementation": meta.get("attn_implementation"),
        "torch": meta.get("torch"),
        "transformers": meta.get("transformers"),
        "bench_dir": bench_dir,
        "error": error,
        "rows": rows,
        "skipped": skipped,
    }


def targets(models: Sequence[dict[str, Any]], specs: Sequence[ModelSpec], meaningful: bool) -> list[dict]:
    """The issue's targets: FlowCut's prefill speed-up at the paper's keep >= the paper's (1.6x on
    LLaVA-1.5 at 64, 3.2x on LLaVA-NeXT at 160), and FlowCut's speed-up >= 90 % of the FLOPs-allowed one
    (the row's ``flops_fraction``) at every keep."""
    from .results import TARGET_FLOPS_FRACTION

    out: list[dict[str, Any]] = []
    for spec, table in zip(specs, models, strict=True):
        by_keep = {r["keep"]: r for r in table["rows"] if r["method"] == "flowcut"}
        paper = PAPER_SPEEDUP[f"{spec.key}/flowcut/{spec.target_keep}"]
        keep = spec.keep_for(spec.target_keep)
        row = by_keep.get(keep)
        value = row["speedup"] if row else None
        out.append(
            _target(
                f"FlowCut prefill speed-up >= paper's {paper:.1f}x",
                spec,
                keep,
                spec.target_keep,
                value,
                paper,
                "x",
                meaningful,
            )
        )
        for keep, paper_keep in zip(spec.keeps, spec.paper_keeps, strict=True):
            row = by_keep.get(keep)
            out.append(
                _target(
                    f"FlowCut speed-up >= {100 * TARGET_FLOPS_FRACTION:.0f} % of the FLOPs-allowed one",
                    spec,
                    keep,
                    paper_keep,
                    row["flops_fraction"] if row else None,
                    TARGET_FLOPS_FRACTION,
                    "%",
                    meaningful,
                    row,
                )
            )
    return out


def _target(
    name: str,
    spec: ModelSpec,
    keep: int,
    paper_keep: int,
    value: float | None,
    threshold: float,
    unit: str,
    meaningful: bool,
    row: dict[str, Any] | None = None,
) -> dict[str, Any]:
    if value is None:
        passed, verdict = None, "n/a"
        detail = f"no flowcut@{keep} row"
    else:
        passed = value >= threshold
        verdict = "PASS" if passed else "MISS"
        if unit == "%":
            detail = f"{100 * value:.0f} % (target >= {100 * threshold:.0f} %)"
            if row is not None and row["speedup"] is not None and row["flops_speedup"] is not None:
                detail = f"{row['speedup']:.2f}x of {row['flops_speedup']:.2f}x allowed = " + detail
        else:
            detail = f"{value:.2f}x (target >= {threshold:.1f}x)"
    return {
        "name": name,
        "model": spec.key,
        "keep": keep,
        "paper_keep": paper_keep,
        "value": value,
        "threshold": threshold,
        "passed": passed,
        "verdict": verdict,
        "meaningful": meaningful,
        "detail": detail,
    }


def build_table(
    specs: Sequence[ModelSpec], tables: Sequence[dict[str, Any]], cfg: RunConfig, env: dict[str, Any]
) -> dict[str, Any]:
    """The whole ``table5.json``: run settings, the models' tables, the targets."""
    meaningful = not cfg.dry_run
    return {
        "mode": "dry-run" if cfg.dry_run else "paper",
        "meaningful": meaningful,
        "note": None
        if meaningful
        else "dry run on tiny CPU models: checks the code path and the output format; the numbers mean nothing",
        "paper": {"source": PAPER_SOURCE, "device": PAPER_DEVICE},
        "settings": {
            "device": cfg.device,
            "dtype": cfg.dtype,
            "repeats": cfg.repeats,
            "warmup": cfg.warmup,
            "decode_tokens": cfg.decode_tokens,
            "methods": list(cfg.methods),
            "seed": cfg.seed,
            "threads": cfg.threads,
        },
        "env": env,
        "models": {t["key"]: t for t in tables},
        "targets": targets(tables, specs[: len(tables)], meaningful),
    }


# ---------------------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------------------


def _f(x: float | None, fmt: str, none: str = "-") -> str:
    return none if x is None else format(x, fmt)


def _variant(row: dict[str, Any]) -> str:
    title = METHOD_TITLES.get(row["method"], row["method"])
    return title if row["keep"] is None else f"{title} @{row['keep']}"


def _tokens(row: dict[str, Any]) -> str:
    a, b = row["llm_visual_tokens_first"], row["llm_visual_tokens_last"]
    return "-" if a is None else (str(a) if a == b else f"{a} -> {b}")


def render_markdown(table: dict[str, Any]) -> str:
    """``table5.md``: per model our rows beside the paper's, what was skipped, the targets."""
    s, env = table["settings"], table["env"]
    lines = [f"# Table 5 reproduction ({table['mode']})", ""]
    if not table["meaningful"]:
        lines += [f"**{table['note']}.**", ""]
    lines += [
        f"- ours: {env.get('device_name')} ({s['device']}), {s['dtype']}, SDPA, random weights from the "
        f"presets' configs, full depth; torch {env.get('torch')}, transformers {env.get('transformers')}, "
        f"Python {env.get('python')}",
        f"- {s['repeats']} timed rounds after {s['warmup']} warm-up rounds, every variant once per round in a "
        f"shuffled order; {s['decode_tokens']} greedy decode steps after each prefill; prefill = one forward "
        "with the image (median [IQR] over rounds); speed-up = median of per-round ratios to the unpruned "
        "model; FLOPs-allowed = executed-FLOPs ratio; fraction = speed-up / FLOPs-allowed",
        "- TFLOPs: the paper's convention (2 x weights x tokens, `lm_head` on every prompt position), from "
        "the run's real per-layer token counts; peak memory: above the weights (CUDA `max_memory_allocated`; "
        "on CPU the RSS growth)",
        f"- paper: {table['paper']['source']}, POPE, {table['paper']['device']}; trained weights and real "
        "images. Its LLaVA-NeXT token count (2880) is nominal; its TFLOPs match a 640x427 POPE image "
        "(2144 tokens, see vlmcut/bench/flops.py), while this run uses a 672x672 image (2880 + 48 newline "
        "tokens), so our unpruned LLaVA-NeXT prefill is larger than the paper's",
        "",
    ]
    for key, m in table["models"].items():
        lines.append(f"## {m['title']}")
        lines.append("")
        size = m.get("image_size")
        lines.append(
            f"preset `{m['preset']}`, {m.get('llm_layers')} decoder layers, {m.get('visual_tokens')} visual "
            f"tokens + {m.get('text_tokens')} text tokens"
            + (f", image {size[1]}x{size[0]} (w x h)" if size and key != "llava-1.5-7b" else "")
            + f"; keeps {', '.join(map(str, m['keeps']))}"
            + (
                f" (standing for the paper's {', '.join(map(str, m['paper_keeps']))})"
                if m["keeps"] != m["paper_keeps"]
                else ""
            )
            + (f"; full output: `{m['bench_dir']}/bench.md`" if m.get("bench_dir") else "")
        )
        lines.append("")
        if m.get("error"):
            lines += [f"**failed: {m['error']}**", ""]
        if m["rows"]:
            head = (
                "| variant | LLM visual tokens | prefill ms | IQR ms | speed-up | FLOPs-allowed | fraction | "
                "TFLOPs | vision ms | peak mem MiB | paper ms | paper speed-up | paper TFLOPs |"
            )
            lines += [head, "|" + "---|" * (head.count("|") - 1)]
            for r in m["rows"]:
                p, pp = r["prefill_ms"], r["paper"]
                lines.append(
                    f"| {_variant(r)} | {_tokens(r)} | {_f(p['median'], '.1f')} | "
                    f"{_f(p['iqr'], '.1f')} [{_f(p['q1'], '.1f')}, {_f(p['q3'], '.1f')}] | "
                    f"{_f(r['speedup'], '.2f')}x | {_f(r['flops_speedup'], '.2f')}x | "
                    f"{_f(None if r['flops_fraction'] is None else 100 * r['flops_fraction'], '.0f')} % | "
                    f"{_f(r['tflops'], '.3g')} | {_f(r['vision_ms'], '.1f')} | {_f(r['peak_mem_mib'], '.0f')} | "
                    + (
                        f"{pp['prefill_ms']:g} | {pp['speedup']:.1f}x | {_f(pp['tflops'], 'g')} |"
                        if pp
                        else "| | |"
                    )
                )
            lines.append("")
        if m["skipped"]:
            lines += ["Skipped:", ""]
            lines += [f"- {x['method']}@{x['keep']}: {x['reason']}" for x in m["skipped"]]
            lines.append("")
    lines += ["## Targets", ""]
    if not table["meaningful"]:
        lines += ["**Not meaningful: dry run on tiny CPU models.**", ""]
    lines += ["| target | model | keep | result | verdict |", "|---|---|---|---|---|"]
    for t in table["targets"]:
        keep = f"{t['keep']}" + (f" (paper {t['paper_keep']})" if t["keep"] != t["paper_keep"] else "")
        verdict = f"**{t['verdict']}**" + ("" if t["meaningful"] else " (not meaningful)")
        lines.append(f"| {t['name']} | {t['model']} | {keep} | {t['detail']} | {verdict} |")
    lines.append("")
    return "\n".join(lines)


def render_summary(table: dict[str, Any]) -> str:
    """The short plain-text table printed last on stdout."""
    out = [
        f"Table 5 ({table['mode']}) on {table['env'].get('device_name')}, {table['settings']['dtype']}"
        + ("" if table["meaningful"] else " -- DRY RUN, numbers not meaningful"),
        f"{'model':14s} {'variant':16s} {'prefill ms':>10s} {'IQR':>7s} {'x':>6s} {'FLOPs x':>7s} "
        f"{'TFLOPs':>7s} {'paper ms':>8s} {'paper x':>7s} {'paper TF':>8s}",
    ]
    for key, m in table["models"].items():
        if m.get("error"):
            out.append(f"{key:14s} FAILED: {m['error']}")
        for r in m["rows"]:
            p, pp = r["prefill_ms"], r["paper"] or {}
            out.append(
                f"{key:14s} {_variant(r):16s} {_f(p['median'], '10.1f', ' ' * 9 + '-')} "
                f"{_f(p['iqr'], '7.1f', ' ' * 6 + '-')} {_f(r['speedup'], '6.2f', ' ' * 5 + '-')} "
                f"{_f(r['flops_speedup'], '7.2f', ' ' * 6 + '-')} {_f(r['tflops'], '7.3g', ' ' * 6 + '-')} "
                f"{_f(pp.get('prefill_ms'), '8g', ' ' * 8)} {_f(pp.get('speedup'), '7.1f', ' ' * 7)} "
                f"{_f(pp.get('tflops'), '8g', ' ' * 8)}".rstrip()
            )
        n = len(m["skipped"])
        if n:
            out.append(f"{key:14s} ({n} variant{'s' if n > 1 else ''} skipped: see table5.md)")
    tag = "" if table["meaningful"] else "  [not meaningful: dry run]"
    for t in table["targets"]:
        out.append(f"{t['verdict']:4s}  {t['model']} @{t['keep']}: {t['name']}: {t['detail']}{tag}")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------------------


def _write_bench(result: Any, folder: Path) -> None:
    """The runner's full output, ``bench.md`` and ``bench.json`` (no PNG, so no matplotlib)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "bench.md").write_text(result.to_markdown())
    (folder / "bench.json").write_text(json.dumps(result.to_json(), indent=2, default=str) + "\n")


def _write_table(table: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "table5.json").write_text(json.dumps(table, indent=2) + "\n")
    (out / "table5.md").write_text(render_markdown(table))


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or "(no message)"
    return f"{type(e).__name__}: {text[:600]}"


def _env(cfg: RunConfig) -> dict[str, Any]:
    import torch
    import transformers

    name = platform.machine()
    if cfg.device == "cuda" and torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
    return {
        "device_name": name,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
    }


def check_transformers() -> str | None:
    """A message when the installed ``transformers`` is outside the declared range, else ``None``."""
    from ..compat import outside_tested_range

    problem = outside_tested_range()
    if problem is None:
        return None
    return f"{problem}; carry the locked wheel in .whl/ (see scripts/gpu_table.sh) or pass --any-transformers"


def run(
    cfg: RunConfig, specs: Sequence[ModelSpec], out: Path, log: Any = sys.stderr
) -> tuple[dict[str, Any], list[str]]:
    """Run the benchmarks one after the other; rewrite ``table5.*`` after each (a run cut short keeps what
    it finished). Returns the table and one error line per failed model."""
    import torch

    from .runner import run_benchmark

    env = _env(cfg)
    tables: list[dict[str, Any]] = []
    errors: list[str] = []
    for spec in specs:
        t0 = time.perf_counter()
        print(
            f"[table5] {spec.key}: preset {spec.preset}, keeps {list(spec.keeps)}, {cfg.device} {cfg.dtype}",
            file=log,
            flush=True,
        )
        result, error = None, None
        try:
            result = run_benchmark(
                spec.preset,
                methods=cfg.methods,
                keeps=spec.keeps,
                image_size=spec.image_size,
                repeats=cfg.repeats,
                warmup=cfg.warmup,
                decode_tokens=cfg.decode_tokens,
                dtype=cfg.dtype,
                device=cfg.device,
                oracle=True,
                seed=cfg.seed,
                progress=False,
            )
        except Exception as e:  # one model failing must not lose the other's results
            error = _one_line(e)
            errors.append(f"{spec.key}: {error}")
        bench_dir = spec.preset
        if result is not None:
            env["device_name"] = result.meta.get("device_name") or env["device_name"]
            _write_bench(result, out / bench_dir)
        table = model_table(spec, result, cfg.methods, error, bench_dir if result is not None else None)
        table["elapsed_s"] = round(time.perf_counter() - t0, 1)
        tables.append(table)
        del result
        gc.collect()
        if cfg.device == "cuda" and torch.cuda.is_available():
            torch.cuda.empty_cache()
        _write_table(build_table(specs, tables, cfg, env), out)
        print(
            f"[table5] {spec.key}: {'FAILED ' + error if error else 'done'} in {table['elapsed_s']:.0f} s, "
            f"{len(table['rows'])} rows, {len(table['skipped'])} skipped",
            file=log,
            flush=True,
        )
    return build_table(specs, tables, cfg, env), errors


def build_parser() -> argparse.ArgumentParser:
    from ..api import available_methods

    p = argparse.ArgumentParser(
        prog="python -m vlmcut.bench.table5",
        description=(
            "The paper's Table 5 on a GPU: LLaVA-1.5-7B (keeps 192/128/64) and LLaVA-NeXT-7B (672x672, "
            "keeps 640/320/160), full depth, random weights, every method plus the unpruned and oracle "
            "rows; writes table5.md / table5.json and each model's bench.md / bench.json into --out. "
            "--dry-run: the same on the tiny CPU presets (float32, 1 round)."
        ),
    )
    p.add_argument("--dry-run", action="store_true", help="tiny presets on CPU; targets not meaningful")
    p.add_argument("--out", default=None, help="output folder (default: $OUT, else out/table5)")
    p.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default cuda (dry run: cpu)")
    p.add_argument(
        "--dtype",
        choices=["bfloat16", "float16", "float32"],
        default=None,
        help="default bfloat16 (dry run: float32)",
    )
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 5; dry run 1)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up rounds (default 2; dry run 1)")
    p.add_argument("--decode-tokens", type=int, default=None, help="decode steps (default 8; dry run 1)")
    p.add_argument(
        "--methods",
        nargs="+",
        choices=available_methods(),
        default=None,
        help="default: every method (the runner skips those a model cannot run, with a note)",
    )
    p.add_argument(
        "--models",
        nargs="+",
        choices=[s.key for s in PAPER_SPECS],
        default=None,
        help="default: both",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's; dry run 1, ~10x faster for the toys on a busy machine)",
    )
    p.add_argument(
        "--any-transformers", action="store_true", help="run outside the tested transformers range"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from ..api import available_methods

        dry = bool(args.dry_run)
        cfg = RunConfig(
            dry_run=dry,
            device=args.device or ("cpu" if dry else "cuda"),
            dtype=args.dtype or ("float32" if dry else "bfloat16"),
            repeats=args.repeats if args.repeats is not None else (1 if dry else 5),
            warmup=args.warmup if args.warmup is not None else (1 if dry else 2),
            decode_tokens=args.decode_tokens if args.decode_tokens is not None else (1 if dry else 8),
            methods=tuple(dict.fromkeys(args.methods or available_methods())),
            seed=args.seed,
            threads=args.threads if args.threads is not None else (1 if dry else None),
        )
        specs = [
            s for s in (DRY_SPECS if dry else PAPER_SPECS) if args.models is None or s.key in args.models
        ]
        out = Path(args.out or os.environ.get("OUT") or "out/table5")
        if not args.any_transformers:
            msg = check_transformers()
            if msg:
                raise RuntimeError(msg)
        if cfg.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise RuntimeError("no CUDA device here; use --dry-run (CPU, tiny presets) or --device cpu")
        if cfg.threads is not None:
            import torch

            torch.set_num_threads(cfg.threads)
        table, errors = run(cfg, specs, out)
    except KeyboardInterrupt:
        print("table5: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        print(f"table5: error: {_one_line(e)}", file=sys.stderr)
        return 1
    print(f"wrote {out / 'table5.md'}, {out / 'table5.json'} and per model bench.md / bench.json")
    print(render_summary(table), flush=True)
    for line in errors:
        print(f"table5: error: {line}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
