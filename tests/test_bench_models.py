"""The efficiency benchmark on the tiny LLaVA-NeXT and Qwen2-VL presets (vlmcut.bench.runner).

No timing assertions: structure, the analytic FLOPs from the real per-layer token counts (vision crops /
packed patches, decoder-stage schedules), KV-cache bytes, oracles, skipped methods and the CLI.
"""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from vlmcut.bench.flops import kv_cache_bytes, model_shape, prefill_breakdown
from vlmcut.bench.loading import bench_image_size, load_model
from vlmcut.bench.presets import (
    build_preset_model,
    llava_next_num_crops,
    num_image_tokens,
    preset_config,
)
from vlmcut.bench.results import BenchResult
from vlmcut.bench.runner import EXEC_CONVENTION, run_benchmark

NEXT_KEEPS = (32, 16)  # tiny-llava-next: 5 crops of 64 patches, 224 patch tokens + 10 newlines at 213x142
QWEN_SIZE = (112, 112)  # tiny-qwen2-vl: 8 x 8 patches -> 16 merged tokens
QWEN_KEEPS = (6, 4)  # FlowCut keeps 2K merge units in the ViT (< 16: the tower prunes), then K
LLM_LAYERS = 4


def _run(preset: str, methods: tuple[str, ...], keeps: tuple[int, ...], **kw) -> BenchResult:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model is dominated by thread start-up on a busy 2-core machine
    try:
        return run_benchmark(
            preset,
            methods=methods,
            keeps=keeps,
            text_tokens=16,
            repeats=1,
            warmup=0,
            decode_tokens=1,
            progress=False,
            **kw,
        )
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def nxt() -> BenchResult:
    return _run("tiny-llava-next", ("flowcut", "random", "fastv"), NEXT_KEEPS)


@pytest.fixture(scope="module")
def qwen() -> BenchResult:
    return _run("tiny-qwen2-vl", ("flowcut", "fastv", "random"), QWEN_KEEPS, image_size=QWEN_SIZE)


@pytest.fixture(params=["nxt", "qwen"])
def any_result(request) -> BenchResult:
    return request.getfixturevalue(request.param)


def test_every_family_runs(nxt: BenchResult, qwen: BenchResult) -> None:
    assert nxt.meta["family"] == "llava_next" and qwen.meta["family"] == "qwen2_vl"
    assert [r.name for r in nxt.rows] == [
        "unpruned",
        *(f"{m}@{k}" for k in NEXT_KEEPS for m in ("flowcut", "random", "fastv", "oracle")),
    ]
    assert [r.name for r in qwen.rows] == [
        "unpruned",
        *(f"{m}@{k}" for k in QWEN_KEEPS for m in ("flowcut", "fastv", "oracle")),
    ]
    for res in (nxt, qwen):
        for r in res.rows:
            assert len(r.prefill_s) == len(r.vision_s) == len(r.decode_s) == 1
            assert r.prefill_s[0] > 0 and r.vision_s[0] > 0 and r.llm_s[0] > 0
            assert len(r.llm_visual_tokens) == LLM_LAYERS
            if r.method in ("none", "oracle"):
                assert r.select_s == []
            else:  # FlowCut: both stages (tower, decoder layer 1) report to the clock
                assert len(r.select_s) == 1 and 0 < r.select_s[0] < r.prefill_s[0]
                assert r.select_calls >= (2 if r.method == "flowcut" else 1)


def test_unpruned_ratios_are_one(any_result: BenchResult) -> None:
    base = any_result.baseline
    for value in (
        base.speedup,
        base.tflops_ratio,
        base.flops_speedup,
        base.flops_fraction,
        base.vision_ratio,
    ):
        assert value == pytest.approx(1.0)


def test_unpruned_equals_prefill_breakdown(nxt: BenchResult, qwen: BenchResult) -> None:
    """The run's own counts of the unpruned model give exactly flops.prefill_breakdown of that model."""
    config = preset_config("tiny-llava-next")
    size = bench_image_size(config)
    assert tuple(nxt.meta["image_size"]) == size == (142, 213)
    base = nxt.baseline
    crops = llava_next_num_crops(config, size)
    assert base.vision_tokens == [[65] * 6] * crops  # every crop whole through the tower, CLS included
    assert base.llm_visual_tokens == [num_image_tokens(config, size)] * LLM_LAYERS  # unpadded + newlines
    assert qwen.baseline.vision_tokens == [[64] * 4]  # packed patches before the merger
    assert qwen.baseline.llm_visual_tokens == [16] * LLM_LAYERS
    for res, preset, image_size in ((nxt, "tiny-llava-next", size), (qwen, "tiny-qwen2-vl", QWEN_SIZE)):
        base = res.baseline
        for conv, value in ((None, base.tflops), (EXEC_CONVENTION, base.tflops_exec)):
            kw = {"convention": conv} if conv is not None else {}
            ref = prefill_breakdown(preset, text_tokens=base.text_tokens, image_size=image_size, **kw)
            assert value == pytest.approx(ref.tflops, rel=1e-12)
        assert res.meta["unpruned_reference_tflops"] == pytest.approx(base.tflops, rel=1e-12)


def test_tflops_fall_with_keep(nxt: BenchResult, qwen: BenchResult) -> None:
    for res, keeps, methods in (
        (nxt, NEXT_KEEPS, ("flowcut", "random", "fastv", "oracle")),
        (qwen, QWEN_KEEPS, ("flowcut", "fastv", "oracle")),
    ):
        base = res.baseline
        for m in methods:
            big, small = res.row(f"{m}@{keeps[0]}"), res.row(f"{m}@{keeps[1]}")
            assert base.tflops > big.tflops > small.tflops, m
            assert base.tflops_exec > big.tflops_exec > small.tflops_exec, m


def test_real_per_layer_counts(nxt: BenchResult, qwen: BenchResult) -> None:
    """Pruned rows carry the counts the run produced: crops of different budgets, two-stage schedules."""
    for k in NEXT_KEEPS:
        fc = nxt.row(f"flowcut@{k}")
        assert len(fc.vision_tokens) == 5 and all(c[-1] == k // 2 + 1 for c in fc.vision_tokens)  # K/2 + CLS
        newlines = nxt.baseline.llm_visual_tokens[0] - 224
        assert fc.llm_visual_tokens[2:] == [k + newlines] * (LLM_LAYERS - 2)  # K after decoder layer 1
        assert fc.llm_visual_tokens[0] > fc.llm_visual_tokens[2]
        rnd = nxt.row(f"random@{k}")  # K shared out over the 5 crops: budgets differ by one
        assert sorted({c[-1] - 1 for c in rnd.vision_tokens}) == sorted({k // 5, k // 5 + (k % 5 > 0)})
        assert sum(c[-1] - 1 for c in rnd.vision_tokens) == k
        assert nxt.row(f"oracle@{k}").vision_tokens == fc.vision_tokens
    for k in QWEN_KEEPS:
        fc = qwen.row(f"flowcut@{k}")
        ((*_, last),) = fc.vision_tokens
        assert last == 4 * 2 * k  # 2K whole 2x2 merge units enter the last ViT block
        assert fc.llm_visual_tokens == [2 * k] * 2 + [k] * (LLM_LAYERS - 2)
        assert qwen.row(f"oracle@{k}").llm_visual_tokens == fc.llm_visual_tokens


def test_decoder_stage_method_between(nxt: BenchResult, qwen: BenchResult) -> None:
    """FastV keeps every token in the tower and in decoder layers 0-1, then K: strictly between the unpruned
    model and a method that prunes in the vision stage at the same K."""
    for res, keeps, vision_stage in (
        (nxt, NEXT_KEEPS, ("random", "flowcut")),
        (qwen, QWEN_KEEPS, ("flowcut",)),
    ):
        base = res.baseline
        for k in keeps:
            fastv = res.row(f"fastv@{k}")
            assert fastv.vision_tokens == base.vision_tokens
            assert fastv.llm_visual_tokens[:2] == base.llm_visual_tokens[:2]
            for m in vision_stage:
                other = res.row(f"{m}@{k}")
                assert base.tflops > fastv.tflops > other.tflops
                assert base.tflops_exec > fastv.tflops_exec > other.tflops_exec


def test_kv_bytes_from_cache_equal_per_layer_analytic(any_result: BenchResult) -> None:
    shape = model_shape(
        preset_config("tiny-llava-next" if any_result.meta["family"] == "llava_next" else "tiny-qwen2-vl")
    )
    for r in any_result.rows:
        per_layer = [v + r.text_tokens for v in r.llm_visual_tokens]
        assert r.kv_bytes == r.kv_bytes_analytic == kv_cache_bytes(shape, per_layer, bytes_per_value=4), (
            r.name
        )
    fastv = next(r for r in any_result.rows if r.method == "fastv")
    assert fastv.kv_bytes < any_result.baseline.kv_bytes
    assert fastv.kv_bytes != kv_cache_bytes(
        shape, fastv.llm_visual_final + fastv.text_tokens, bytes_per_value=4
    )


def test_oracle_rows(any_result: BenchResult) -> None:
    for r in any_result.rows:
        if r.method == "oracle":
            fc = any_result.row(f"flowcut@{r.keep}")
            assert r.tflops == fc.tflops and r.tflops_exec == fc.tflops_exec
            assert r.kv_bytes == fc.kv_bytes
    names = {t.name for t in any_result.targets}
    assert "selection overhead, A/B (flowcut / oracle prefill - 1)" in names
    assert "selection overhead, measured inside FlowCut's selectors (selection / prefill time)" in names
    assert all(t.verdict in ("PASS", "MISS") for t in any_result.targets)


def test_qwen_skips_unsupported_method(qwen: BenchResult) -> None:
    assert not any(r.method == "random" for r in qwen.rows)
    (note,) = qwen.meta["skipped"]
    assert note.startswith("random: not supported on Qwen2VLForConditionalGeneration")
    assert "supported methods on Qwen2-VL / Qwen2.5-VL: fastv, flowcut, pdrop, sparsevlm" in note
    assert "## Skipped" in qwen.to_markdown() and note in qwen.to_markdown()


def test_nothing_left_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="nothing to benchmark on Qwen2VLForConditionalGeneration.*random"):
        _run("tiny-qwen2-vl", ("random", "grid"), (4,), image_size=QWEN_SIZE)


def test_load_model_from_directory_picks_the_class(tmp_path) -> None:
    build_preset_model("tiny-qwen2-vl").save_pretrained(tmp_path)
    model, label, note = load_model(tmp_path, layers=2, dtype=torch.float32, device=torch.device("cpu"))
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration"
    assert len(model.model.language_model.layers) == 2 and "2 of 4 decoder layers" in note


def test_cli_qwen_writes_files(tmp_path, capsys) -> None:
    from vlmcut.cli.bench import add_parser

    parser = argparse.ArgumentParser(prog="flowcut")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(
        ["bench", "--preset", "tiny-qwen2-vl", "--image-size", "112", "112", "--keeps", "4"]
        + ["--methods", "flowcut", "grid", "--repeats", "1", "--warmup", "0", "--decode-tokens", "0"]
        + ["--text-tokens", "16", "--no-oracle", "--no-progress", "--out", str(tmp_path)]
    )
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "flowcut@4" in out and "grid: not supported" in out
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["meta"]["family"] == "qwen2_vl" and data["meta"]["image_size"] == [112, 112]
    overhead = next(t for t in data["targets"] if t["name"].startswith("selection overhead, A/B"))
    assert overhead["verdict"] == "n/a" and overhead["value"] is None and "no oracle" in overhead["detail"]
    direct = next(t for t in data["targets"] if t["name"].startswith("selection overhead, measured"))
    assert direct["verdict"] in ("PASS", "MISS") and direct["value"] > 0  # needs no oracle
    assert "n/a (no oracle" in (tmp_path / "bench.md").read_text()
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
