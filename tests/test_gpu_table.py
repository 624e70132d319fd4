"""scripts/gpu_table.sh and vlmcut.bench.table5: the paper's Table 5 run, checked on CPU.

The dry run goes through the same script and module as the GPU call (tiny presets, float32, 1 round), so
the one device call cannot fail on a typo; here only the output format is asserted, never timings.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from vlmcut.bench.flops import PAPER_TFLOPS
from vlmcut.bench.presets import llava_next_num_crops, num_image_tokens, preset_config
from vlmcut.bench.results import TARGET_FLOPS_FRACTION, BenchResult, BenchRow
from vlmcut.bench.table5 import (
    DRY_SPECS,
    PAPER_PREFILL_MS,
    PAPER_SPECS,
    PAPER_SPEEDUP,
    RunConfig,
    build_table,
    model_table,
    render_markdown,
    render_summary,
)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_table.sh"
MAX_FILES = 8  # what the device machine sends back


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHON"] = sys.executable
    env.pop("OUT", None)
    return env


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    out = tmp_path_factory.mktemp("table5") / "out"
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", str(out)],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, (
        f"dry run failed ({proc.returncode}):\n{proc.stderr[-3000:]}\n{proc.stdout[-2000:]}"
    )
    return out, proc


@pytest.fixture(scope="module")
def table(dry_run: tuple[Path, subprocess.CompletedProcess[str]]) -> dict[str, Any]:
    return json.loads((dry_run[0] / "table5.json").read_text())


# ---------------------------------------------------------------------------------------------------------
# The dry run, end to end
# ---------------------------------------------------------------------------------------------------------


def test_dry_run_files(dry_run: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    out, _ = dry_run
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert len(files) <= MAX_FILES, files
    assert all(len(f.parts) - 1 <= 2 for f in files), files  # at most 2 folder levels below $OUT
    expected = {Path("table5.md"), Path("table5.json")}
    for spec in DRY_SPECS:
        expected |= {Path(spec.preset, "bench.md"), Path(spec.preset, "bench.json")}
    assert expected <= set(files), files
    assert not [f for f in files if f.suffix == ".png"]
    for spec in DRY_SPECS:  # the runner's full output, parseable
        bench = json.loads((out / spec.preset / "bench.json").read_text())
        assert bench["meta"]["keeps"] == list(spec.keeps)
        assert "# FlowCut efficiency benchmark" in (out / spec.preset / "bench.md").read_text()


def test_dry_run_json_covers_every_variant(table: dict[str, Any]) -> None:
    assert table["mode"] == "dry-run" and table["meaningful"] is False
    assert set(table["models"]) == {"llava-1.5-7b", "llava-next-7b"}
    methods = table["settings"]["methods"]
    assert len(methods) >= 8  # every method vlmcut has
    assert table["settings"]["device"] == "cpu" and table["settings"]["dtype"] == "float32"
    for spec in DRY_SPECS:
        m = table["models"][spec.key]
        assert m["error"] is None and m["preset"] == spec.preset
        assert m["bench_dir"] == spec.preset
        rows = {(r["method"], r["keep"]): r for r in m["rows"]}
        skipped = {(s["method"], s["keep"]): s["reason"] for s in m["skipped"]}
        assert ("none", None) in rows
        assert ("flowcut", spec.keeps[0]) in rows and ("oracle", spec.keeps[0]) in rows
        for keep in spec.keeps:
            for method in [*methods, "oracle"]:
                ran, skip = (method, keep) in rows, (method, keep) in skipped
                assert ran != skip, (spec.key, method, keep)
                if skip:
                    assert skipped[(method, keep)].strip() and "no reason" not in skipped[(method, keep)]
        assert len(rows) + len(skipped) == 1 + len(spec.keeps) * (len(methods) + 1)
        for r in m["rows"]:
            p = r["prefill_ms"]
            assert p["median"] > 0 and p["q1"] <= p["median"] <= p["q3"] and p["iqr"] >= 0
            assert r["tflops"] > 0 and r["vision_ms"] > 0 and r["speedup"] > 0
            assert r["flops_speedup"] >= 1.0 - 1e-9 and math.isclose(
                r["flops_fraction"], r["speedup"] / r["flops_speedup"], rel_tol=1e-3
            )
            assert r["peak_mem_mib"] is not None


def test_dry_run_paper_columns(table: dict[str, Any]) -> None:
    for spec in DRY_SPECS:
        m = table["models"][spec.key]
        base = next(r for r in m["rows"] if r["method"] == "none")
        key = f"{spec.key}/none/{spec.nominal_tokens}"
        assert base["paper"] == {
            "key": key,
            "prefill_ms": PAPER_PREFILL_MS[key],
            "speedup": 1.0,
            "tflops": PAPER_TFLOPS[key],
        }
        seen = 0
        for r in m["rows"]:
            if r["method"] == "none":
                continue
            key = f"{spec.key}/{r['method']}/{r['paper_keep']}"
            if key in PAPER_PREFILL_MS:
                seen += 1
                assert r["paper"]["prefill_ms"] == PAPER_PREFILL_MS[key]
                assert r["paper"]["speedup"] == PAPER_SPEEDUP[key]
                assert r["paper"]["tflops"] == PAPER_TFLOPS[key]
            else:
                assert r["paper"] is None, r
        # FlowCut, FastV, VisionZip run on the toys at the keep that stands for the paper's
        assert seen >= 3, spec.key


def test_dry_run_targets_and_outputs(
    dry_run: tuple[Path, subprocess.CompletedProcess[str]], table: dict[str, Any]
) -> None:
    out, proc = dry_run
    targets = table["targets"]
    assert len(targets) == sum(1 + len(s.keeps) for s in DRY_SPECS)
    speed = [t for t in targets if "paper's" in t["name"]]
    assert [(t["model"], t["paper_keep"], t["threshold"]) for t in speed] == [
        ("llava-1.5-7b", 64, 1.6),
        ("llava-next-7b", 160, 3.2),
    ]
    for t in targets:
        assert t["meaningful"] is False
        assert t["verdict"] == ("PASS" if t["value"] >= t["threshold"] else "MISS")
    frac = [t for t in targets if "FLOPs-allowed" in t["name"]]
    assert frac and all(t["threshold"] == TARGET_FLOPS_FRACTION for t in frac)

    md = (out / "table5.md").read_text()
    assert "Not meaningful" in md and "| paper ms | paper speed-up | paper TFLOPs |" in md
    for m in table["models"].values():
        for s in m["skipped"]:
            assert f"- {s['method']}@{s['keep']}: {s['reason']}" in md
    assert md.count("(not meaningful)") == len(targets)

    lines = proc.stdout.strip().splitlines()
    assert any("DRY RUN" in line for line in lines)
    tail = lines[-len(targets) :]  # the summary ends with the targets
    assert all(line.split()[0] in {"PASS", "MISS", "n/a"} for line in tail), tail
    assert all(line.endswith("[not meaningful: dry run]") for line in tail), tail
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------------------------
# Cheap checks: constants, specs, the table builder on a hand-made result, errors
# ---------------------------------------------------------------------------------------------------------


def test_paper_constants_agree() -> None:
    assert set(PAPER_PREFILL_MS) == set(PAPER_SPEEDUP) == set(PAPER_TFLOPS)
    for key, ms in PAPER_PREFILL_MS.items():
        model = key.split("/")[0]
        base = next(v for k, v in PAPER_PREFILL_MS.items() if k.startswith(f"{model}/none/"))
        assert round(base / ms, 1) == PAPER_SPEEDUP[key], key  # Table 5 prints one decimal


def test_specs_geometry() -> None:
    llava, nxt = PAPER_SPECS
    assert num_image_tokens(llava.preset) == 576 and llava.image_size is None
    cfg = preset_config(nxt.preset)
    assert llava_next_num_crops(cfg, nxt.image_size) == 5  # 2x2 grid + base crop
    assert num_image_tokens(cfg, nxt.image_size) == 2880 + 48  # + one newline per grid row
    for full, dry in zip(PAPER_SPECS, DRY_SPECS, strict=True):
        assert full.key == dry.key and dry.paper_keeps == full.keeps
        assert full.target_keep in full.keeps and dry.keep_for(full.target_keep) in dry.keeps
    tiny, tiny_next = DRY_SPECS
    assert max(tiny.keeps) < num_image_tokens(tiny.preset)
    assert llava_next_num_crops(preset_config(tiny_next.preset), tiny_next.image_size) == 5
    assert max(tiny_next.keeps) < num_image_tokens(tiny_next.preset, tiny_next.image_size)


def _row(name: str, method: str, keep: int | None, prefill: float, tflops: float) -> BenchRow:
    return BenchRow(
        name=name,
        method=method,
        keep=keep,
        vision_tokens=[[577] * 24],
        llm_visual_tokens=[576 if keep is None else keep] * 32,
        text_tokens=65,
        tokens_per_layer=[],
        tflops=tflops,
        tflops_parts={},
        tflops_exec=tflops,
        kv_bytes_analytic=0,
        prefill_s=[prefill, prefill * 1.1, prefill * 0.9],
        vision_s=[0.01, 0.011, 0.009],
        llm_s=[prefill] * 3,
        peak_mem_bytes=[2**20, 2**21, 2**22],
    )


def test_table_builder_on_a_hand_made_result() -> None:
    spec = PAPER_SPECS[0]
    rows = [
        _row("unpruned", "none", None, 0.100, 8.8),
        _row("flowcut@64", "flowcut", 64, 0.050, 2.0),  # 2.0x of 4.4x allowed
        _row("fastv@64", "fastv", 64, 0.080, 2.2),
        _row("oracle@64", "oracle", 64, 0.049, 2.0),
        _row("random@192", "random", 192, 0.07, 3.0),
    ]
    skipped = ["pdrop@64: the first stage alone averages too much", "flowcut@192: budget out of reach"]
    result = BenchResult(meta={"skipped": skipped, "oracle_skipped": None, "visual_tokens": 576}, rows=rows)
    result.finalise()
    methods = ("flowcut", "fastv", "pdrop", "random")
    m = model_table(spec, result, methods, bench_dir="llava-1.5-7b")
    by = {(r["method"], r["keep"]): r for r in m["rows"]}
    assert by[("flowcut", 64)]["speedup"] == pytest.approx(2.0)
    assert by[("flowcut", 64)]["flops_fraction"] == pytest.approx(2.0 / 4.4, rel=1e-3)
    assert by[("flowcut", 64)]["prefill_ms"] == {"median": 50.0, "q1": 47.5, "q3": 52.5, "iqr": 5.0}
    assert by[("flowcut", 64)]["peak_mem_mib"] == 2.0
    assert by[("fastv", 64)]["paper"]["prefill_ms"] == 87.3
    assert by[("random", 192)]["paper"] is None and by[("oracle", 64)]["paper"] is None
    reasons = {(s["method"], s["keep"]): s["reason"] for s in m["skipped"]}
    assert reasons[("pdrop", 64)] == "the first stage alone averages too much"
    assert reasons[("flowcut", 192)] == "budget out of reach"
    assert "flowcut@192 was skipped" in reasons[("oracle", 192)]
    assert reasons[("fastv", 128)] == "no row (no reason given)"
    assert len(m["rows"]) + len(m["skipped"]) == 1 + 3 * (len(methods) + 1)

    cfg = RunConfig(False, "cuda", "bfloat16", 5, 2, 8, methods)
    table = build_table(PAPER_SPECS[:1], [m], cfg, {"device_name": "NVIDIA H200", "torch": "x"})
    t = {(x["name"].split()[1], x["keep"]): x for x in table["targets"]}
    assert t[("prefill", 64)]["verdict"] == "PASS" and t[("prefill", 64)]["value"] == pytest.approx(2.0)
    assert t[("speed-up", 64)]["verdict"] == "MISS"  # 45 % of the FLOPs-allowed speed-up
    assert t[("speed-up", 192)]["verdict"] == "n/a"  # no flowcut@192 row
    assert all(x["meaningful"] for x in table["targets"])
    md = render_markdown(table)
    assert "| FastV @64 |" in md and "| 87.3 | 1.2x | 2.26 |" in md and "Not meaningful" not in md
    assert "- pdrop@64: the first stage alone averages too much" in md
    summary = render_summary(table)
    assert any(line.startswith("n/a") and "@192" in line for line in summary.splitlines())
    assert "DRY RUN" not in summary

    failed = model_table(spec, None, methods, error="OutOfMemoryError: CUDA out of memory")
    assert failed["rows"] == [] and len(failed["skipped"]) == 3 * (len(methods) + 1)
    assert all("OutOfMemoryError" in s["reason"] for s in failed["skipped"])


def test_cli_help_and_one_line_errors() -> None:
    env = _env()
    env["PYTHONPATH"] = str(ROOT)
    ok = subprocess.run(
        [sys.executable, "-m", "vlmcut.bench.table5", "--help"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0 and "--dry-run" in ok.stdout
    import torch

    if torch.cuda.is_available():
        pytest.skip("the no-CUDA error needs a machine without CUDA")
    bad = subprocess.run(
        [sys.executable, "-m", "vlmcut.bench.table5", "--out", "/nonexistent-never-written"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 1
    err = [line for line in bad.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("table5: error:") and "CUDA" in err[0], bad.stderr
    assert not Path("/nonexistent-never-written").exists()


def test_script_is_documented_and_ignored() -> None:
    text = SCRIPT.read_text()
    assert text.splitlines()[0] == "#!/usr/bin/env bash" and "set -euo pipefail" in text
    assert 'carry [".whl"]' in text and "timeout_s 600" in text and "--no-index --no-deps" in text
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    assert "/.whl/" in (ROOT / ".gitignore").read_text().splitlines()
    bad = subprocess.run(["bash", str(SCRIPT), "--bogus"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "usage:" in bad.stderr
