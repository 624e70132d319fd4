"""The efficiency benchmark runner (flowcut.bench.runner) and its CLI, on the tiny preset.

No timing assertions: only structure, analytic consistency and the written files.
"""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

from flowcut.bench.flops import (
    PAPER_CONVENTION,
    kv_cache_bytes,
    model_shape,
    prefill_breakdown,
    prefill_tflops,
)
from flowcut.bench.runner import EXEC_CONVENTION, BenchResult, ReplaySelector, cache_bytes, run_benchmark

KEEPS = (32, 16)  # the tiny tower has 64 patches


@pytest.fixture(scope="module")
def result() -> BenchResult:
    return run_benchmark(
        "tiny",
        methods=("flowcut", "random", "grid"),
        keeps=KEEPS,
        repeats=1,
        warmup=0,
        decode_tokens=2,
        progress=False,
    )


def test_rows(result: BenchResult) -> None:
    names = [r.name for r in result.rows]
    assert names[0] == "unpruned"
    for k in KEEPS:
        for m in ("flowcut", "random", "grid", "oracle"):
            assert f"{m}@{k}" in names
    assert len(names) == 1 + len(KEEPS) * 4
    for r in result.rows:
        assert len(r.prefill_s) == len(r.vision_s) == len(r.llm_s) == 1
        assert len(r.decode_s) == 1
        assert r.prefill_s[0] > 0 and r.vision_s[0] > 0 and r.llm_s[0] > 0
        assert r.vision_s[0] + r.llm_s[0] <= r.prefill_s[0] * 1.001


def test_tflops_fall_with_keep(result: BenchResult) -> None:
    base = result.baseline
    for m in ("flowcut", "random", "grid", "oracle"):
        big, small = result.row(f"{m}@{KEEPS[0]}"), result.row(f"{m}@{KEEPS[1]}")
        assert base.tflops > big.tflops > small.tflops
        assert base.tflops_exec > big.tflops_exec > small.tflops_exec


def test_unpruned_ratios_are_one(result: BenchResult) -> None:
    base = result.baseline
    for value in (
        base.speedup,
        base.tflops_ratio,
        base.flops_speedup,
        base.flops_fraction,
        base.vision_ratio,
    ):
        assert value == pytest.approx(1.0)
    assert base.llm_visual_tokens == 64


def test_oracle_matches_method_tokens(result: BenchResult) -> None:
    for k in KEEPS:
        oracle, fc = result.row(f"oracle@{k}"), result.row(f"flowcut@{k}")
        assert oracle.llm_visual_tokens == fc.llm_visual_tokens == k
        assert oracle.vision_tokens == fc.vision_tokens
        assert oracle.tflops == fc.tflops
        for m in ("random", "grid"):
            assert result.row(f"{m}@{k}").llm_visual_tokens == k


def test_flops_consistency(result: BenchResult) -> None:
    shape = model_shape("tiny")
    base = result.baseline
    assert base.tflops == pytest.approx(prefill_tflops("tiny", text_tokens=base.text_tokens))
    for r in result.rows:
        assert len(r.vision_tokens) == shape.vision.num_layers == len(r.tokens_per_layer)
        # entering layer i+1 = patch tokens after layer i, plus the CLS token
        assert r.vision_tokens[1:] == [t + 1 for t in r.tokens_per_layer[:-1]]
        expected = prefill_tflops(shape, r.vision_tokens, r.llm_visual_tokens, text_tokens=r.text_tokens)
        assert r.tflops == pytest.approx(expected, rel=1e-12)
        parts = prefill_breakdown(shape, r.vision_tokens, r.llm_visual_tokens, text_tokens=r.text_tokens)
        assert sum(r.tflops_parts.values()) == pytest.approx(parts.tflops)
        ex = prefill_tflops(
            shape, r.vision_tokens, r.llm_visual_tokens, text_tokens=r.text_tokens, convention=EXEC_CONVENTION
        )
        assert r.tflops_exec == pytest.approx(ex)
        assert r.tflops_ratio == pytest.approx(r.tflops / base.tflops)
        assert r.flops_speedup == pytest.approx(base.tflops_exec / r.tflops_exec)
        assert r.flops_fraction == pytest.approx(r.speedup / r.flops_speedup)
        # KV cache read from the returned cache = the analytic size (float32: 4 bytes)
        assert r.kv_bytes == r.kv_bytes_analytic
        assert r.kv_bytes == kv_cache_bytes(shape, r.llm_visual_tokens + r.text_tokens, bytes_per_value=4)
    assert PAPER_CONVENTION.lm_head == "all" and EXEC_CONVENTION.lm_head == "last"


def test_targets_listed(result: BenchResult) -> None:
    assert {t.keep for t in result.targets} == set(KEEPS)
    assert len(result.targets) == 3 * len(KEEPS)
    for t in result.targets:
        assert t.verdict in ("PASS", "MISS")
        assert math.isfinite(t.value)


def test_files_written(result: BenchResult, tmp_path) -> None:
    paths = result.save(tmp_path)
    data = json.loads(paths["json"].read_text())
    assert [r["name"] for r in data["rows"]] == [r.name for r in result.rows]
    assert data["meta"]["visual_tokens"] == 64
    assert len(data["targets"]) == len(result.targets)
    md = paths["md"].read_text()
    assert "| unpruned |" in md and "oracle@16" in md and "## Targets" in md
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_replay_selector_and_cache_bytes() -> None:
    steps = {3: torch.tensor([[0, 2]])}
    sel = ReplaySelector(steps, keep=2)
    q = torch.zeros(1, 1, 5, 4)
    assert sel.needs_scores(4) and not sel.needs_scores(2)
    assert sel.step(1, q, q, q, 1.0, True) is None
    assert torch.equal(sel.step(3, q, q, q, 1.0, True), steps[3])
    assert cache_bytes(None) is None
    assert cache_bytes(((torch.zeros(2, 3), torch.zeros(2, 3)),)) == 48


def test_cli(tmp_path, capsys) -> None:
    from flowcut.bench.cli_bench import add_parser

    parser = argparse.ArgumentParser(prog="flowcut")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(
        [
            "bench",
            "--preset",
            "tiny",
            "--keeps",
            "16",
            "--methods",
            "grid",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--decode-tokens",
            "0",
            "--no-oracle",
            "--no-progress",
            "--out",
            str(tmp_path),
        ]
    )
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "grid@16" in out
    assert (tmp_path / "bench.json").is_file() and (tmp_path / "bench.png").is_file()
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "--preset", "tiny", "--model", "x"])


def test_rejects_unknown_method() -> None:
    with pytest.raises(ValueError, match="unknown method"):
        run_benchmark("tiny", methods=("nope",), keeps=(16,), repeats=1, warmup=0, progress=False)
