"""The efficiency benchmark (vlmcut.bench.runner and the modules it uses) and its CLI, on the tiny LLaVA.

No timing assertions: only structure, analytic consistency and the written files. LLaVA-NeXT and Qwen2-VL:
tests/test_bench_models.py.
"""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

from vlmcut.bench.flops import (
    PAPER_CONVENTION,
    kv_cache_bytes,
    model_shape,
    prefill_breakdown,
    prefill_tflops,
)
from vlmcut.bench.memory import cache_bytes
from vlmcut.bench.oracle import ReplayLLMSelector, ReplaySelector
from vlmcut.bench.results import BenchResult
from vlmcut.bench.runner import EXEC_CONVENTION, run_benchmark
from vlmcut.bench.selection import SelectionClock, timed_spec

KEEPS = (32, 16)  # the tiny tower has 64 patches
METHODS = ("flowcut", "random", "grid", "fastv")
LLM_LAYERS = 4


@pytest.fixture(scope="module")
def result() -> BenchResult:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model is dominated by thread start-up on a busy 2-core machine
    try:
        return run_benchmark(
            "tiny",
            methods=METHODS,
            keeps=KEEPS,
            repeats=1,
            warmup=0,
            decode_tokens=2,
            progress=False,
        )
    finally:
        torch.set_num_threads(before)


def test_rows(result: BenchResult) -> None:
    names = [r.name for r in result.rows]
    assert names[0] == "unpruned"
    for k in KEEPS:
        for m in (*METHODS, "oracle"):
            assert f"{m}@{k}" in names
    assert len(names) == 1 + len(KEEPS) * (len(METHODS) + 1)
    assert result.meta["family"] == "llava" and result.meta["skipped"] == []
    for r in result.rows:
        assert len(r.prefill_s) == len(r.vision_s) == len(r.llm_s) == 1
        assert len(r.decode_s) == 1
        assert r.prefill_s[0] > 0 and r.vision_s[0] > 0 and r.llm_s[0] > 0
        assert r.vision_s[0] + r.llm_s[0] <= r.prefill_s[0] * 1.001


def test_tflops_fall_with_keep(result: BenchResult) -> None:
    base = result.baseline
    for m in (*METHODS, "oracle"):
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
    assert base.llm_visual_tokens == [64] * LLM_LAYERS
    assert base.vision_tokens == [[65] * 6]


def test_unpruned_equals_prefill_breakdown(result: BenchResult) -> None:
    """Counted from the run's own hooks, the unpruned row is flops.prefill_breakdown of the unpruned model."""
    base = result.baseline
    ref = prefill_breakdown("tiny", text_tokens=base.text_tokens)
    assert base.tflops == pytest.approx(ref.tflops, rel=1e-12)
    assert result.meta["unpruned_reference_tflops"] == pytest.approx(ref.tflops, rel=1e-12)
    for part in ("vision", "projector", "llm", "lm_head"):
        assert base.tflops_parts[part] == pytest.approx(getattr(ref, part) / 1e12, rel=1e-12)
    ex = prefill_breakdown("tiny", text_tokens=base.text_tokens, convention=EXEC_CONVENTION)
    assert base.tflops_exec == pytest.approx(ex.tflops, rel=1e-12)


def test_oracle_matches_method_tokens(result: BenchResult) -> None:
    for k in KEEPS:
        oracle, fc = result.row(f"oracle@{k}"), result.row(f"flowcut@{k}")
        assert oracle.llm_visual_tokens == fc.llm_visual_tokens == [k] * LLM_LAYERS
        assert oracle.vision_tokens == fc.vision_tokens
        assert oracle.tflops == fc.tflops
        for m in ("random", "grid"):
            assert result.row(f"{m}@{k}").llm_visual_tokens == [k] * LLM_LAYERS


def test_flops_consistency(result: BenchResult) -> None:
    shape = model_shape("tiny")
    base = result.baseline
    assert base.tflops == pytest.approx(prefill_tflops("tiny", text_tokens=base.text_tokens))
    for r in result.rows:
        (vision,) = r.vision_tokens  # one encoder pass per image
        assert len(vision) == shape.vision.num_layers
        if r.method not in ("none", "fastv"):
            # entering layer i+1 = patch tokens after layer i (what the handle reports), plus the CLS token
            assert vision[1:] == [t + 1 for t in r.tokens_per_layer[:-1]]
        expected = prefill_tflops(shape, vision, r.llm_visual_tokens, text_tokens=r.text_tokens)
        assert r.tflops == pytest.approx(expected, rel=1e-12)
        parts = prefill_breakdown(shape, vision, r.llm_visual_tokens, text_tokens=r.text_tokens)
        assert sum(r.tflops_parts.values()) == pytest.approx(parts.tflops)
        ex = prefill_tflops(
            shape, vision, r.llm_visual_tokens, text_tokens=r.text_tokens, convention=EXEC_CONVENTION
        )
        assert r.tflops_exec == pytest.approx(ex)
        assert r.tflops_ratio == pytest.approx(r.tflops / base.tflops)
        assert r.flops_speedup == pytest.approx(base.tflops_exec / r.tflops_exec)
        assert r.flops_fraction == pytest.approx(r.speedup / r.flops_speedup)
    assert PAPER_CONVENTION.lm_head == "all" and EXEC_CONVENTION.lm_head == "last"


def test_decoder_stage_method_between_unpruned_and_vision_stage(result: BenchResult) -> None:
    """FastV (K=2) runs the whole tower and decoder layers 0-1 on every token, then K: by construction its
    TFLOPs lie strictly between the unpruned model and a vision-stage method at the same K."""
    base = result.baseline
    for k in KEEPS:
        fastv = result.row(f"fastv@{k}")
        assert fastv.vision_tokens == base.vision_tokens
        assert fastv.llm_visual_tokens == [64, 64] + [k] * (LLM_LAYERS - 2)
        for vision_stage in ("random", "flowcut"):
            other = result.row(f"{vision_stage}@{k}")
            assert base.tflops > fastv.tflops > other.tflops
            assert base.tflops_exec > fastv.tflops_exec > other.tflops_exec
    assert "64 x 2, 16 x 2" in result.to_markdown()  # the compact per-layer LLM schedule


def test_kv_bytes_from_cache_equal_per_layer_analytic(result: BenchResult) -> None:
    shape = model_shape("tiny")
    for r in result.rows:
        per_layer = [v + r.text_tokens for v in r.llm_visual_tokens]
        assert r.kv_bytes == r.kv_bytes_analytic == kv_cache_bytes(shape, per_layer, bytes_per_value=4)
    fastv = result.row(f"fastv@{KEEPS[1]}")
    # a constant count (what the last layer sees, or the first) would be wrong for a decoder-stage method
    for n in (fastv.llm_visual_tokens[0], fastv.llm_visual_final):
        assert fastv.kv_bytes != kv_cache_bytes(shape, n + fastv.text_tokens, bytes_per_value=4)


def test_targets_listed(result: BenchResult) -> None:
    assert {t.keep for t in result.targets} == set(KEEPS)
    # per keep: selection share measured in the selectors, the A/B against the oracle, tower ratio, fraction
    assert len(result.targets) == 4 * len(KEEPS)
    for k in KEEPS:
        direct = next(t for t in result.targets if t.keep == k and "inside" in t.name)
        fc = result.row(f"flowcut@{k}")
        assert direct.value == pytest.approx(fc.select_s[0] / fc.prefill_s[0])
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


def test_replay_selectors_and_cache_bytes() -> None:
    steps = {3: torch.tensor([[0, 2]])}
    sel = ReplaySelector(steps, keep=2)
    q = torch.zeros(1, 1, 5, 4)
    assert sel.needs_scores(4) and not sel.needs_scores(2)
    assert sel.step(1, q, q, q, 1.0, True) is None
    assert torch.equal(sel.step(3, q, q, q, 1.0, True), steps[3])
    assert torch.equal(sel.step(3, q, q, q, 1.0, False, group=4), steps[3])  # Qwen2-VL merge units
    mask = torch.tensor([[True, False, True]])
    llm = ReplayLLMSelector([1], {1: mask})
    assert llm.prune_layers(4, 100) == [1]

    class Ctx:
        layer = 1
        visual = torch.zeros(1, 3, dtype=torch.bool)

    assert torch.equal(llm.select(Ctx()), mask)
    Ctx.visual = torch.zeros(1, 5, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="recorded mask"):
        llm.select(Ctx())
    assert cache_bytes(None) is None
    assert cache_bytes(((torch.zeros(2, 3), torch.zeros(2, 3)),)) == 48


def test_cli(tmp_path, capsys) -> None:
    from vlmcut.cli.bench import add_parser

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
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "--preset", "no-such-preset"])


def test_rejects_unknown_method() -> None:
    with pytest.raises(ValueError, match="unknown method"):
        run_benchmark("tiny", methods=("nope",), keeps=(16,), repeats=1, warmup=0, progress=False)
    with pytest.raises(ValueError, match="keeps must be ints"):
        run_benchmark("tiny", methods=("grid",), keeps=(0,), repeats=1, warmup=0, progress=False)


def test_selection_time_is_measured_in_the_selectors(result: BenchResult) -> None:
    """Every method row times its selector calls; the unpruned and oracle rows (nothing to choose) do not."""
    from vlmcut.bench.presets import preset_config

    vision = preset_config("tiny").vision_config
    consumed = vision.num_hidden_layers - 2  # vision_feature_layer -2: FlowCut scores every layer before it
    for r in result.rows:
        if r.method in ("none", "oracle"):
            assert r.select_s == [] and r.select_calls == 0 and math.isnan(r.select_share)
            continue
        assert len(r.select_s) == 1 and 0 < r.select_s[0] < r.prefill_s[0]
        assert r.select_share == pytest.approx(r.select_s[0] / r.prefill_s[0])
        expected = {"fastv": 1, "flowcut": consumed, "random": consumed, "grid": consumed}[r.method]
        assert r.select_calls == expected, r.name  # FastV: one ranking at its layer K - 1
    md = result.to_markdown()
    assert "selection ms (% of prefill)" in md and "wall clock around each call" in md


def test_timed_spec_is_transparent() -> None:
    """The timing wrapper returns what the selector returns, forwards its other attributes, and counts calls."""
    from vlmcut.api import METHODS

    clock = SelectionClock(torch.device("cpu"))
    spec = timed_spec(METHODS["flowcut"], clock)
    assert spec.make_llm_selector is None and spec.name == "flowcut"
    cfg = METHODS["flowcut"].config_cls(keep=4)
    timed, plain = spec.make_selector(cfg, 4), METHODS["flowcut"].make_selector(cfg, 4)
    assert timed.keep == plain.keep == 4 and timed.needs_scores(9) and not timed.needs_scores(4)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 9, 8) for _ in range(3))
    for sel in (timed, plain):
        sel.start(2)
    got = [timed.step(i, q, k, v, 0.35, True) for i in range(2)]
    want = [plain.step(i, q, k, v, 0.35, True) for i in range(2)]
    assert got[-1] is not None and torch.equal(got[-1], want[-1])
    assert (got[0] is None) == (want[0] is None)
    assert clock.calls == 2 and clock.seconds() > 0
    clock.reset()
    assert clock.calls == 0 and clock.seconds() == 0.0


def test_oracle_replays_per_image_passes_exactly() -> None:
    """FlowCut runs the tower one image at a time (per-image counts); the oracle records every pass and
    replays them in order, so its outputs equal FlowCut's bitwise on a batch whose images disagree."""
    import tiny

    from vlmcut.bench.oracle import RecordingSelector
    from vlmcut.methods.flowcut import FlowCutConfig, FlowCutSelector
    from vlmcut.models.vit import EncoderPruner, tower_spec

    model = tiny.clip_tower(layers=10, seed=5)
    xs = tiny.pixels(3, seed=5)
    spec = tower_spec(model)
    recorder = RecordingSelector(FlowCutSelector(FlowCutConfig(keep=6), keep=6))
    pruner = EncoderPruner(spec, recorder, consume_layer=9)
    with torch.no_grad():
        ref = model(xs, output_hidden_states=True)
    record = pruner.record
    pruner.remove()
    assert len(recorder.passes) == 3 and recorder.per_image_passes
    widths = {tuple(sorted((layer, idx.shape[1]) for layer, idx in p.items())) for p in recorder.passes}
    assert len(widths) > 1, widths  # the images really keep different counts on the way
    replay = EncoderPruner(spec, ReplaySelector(recorder.passes, 6, per_image_passes=True), consume_layer=9)
    try:
        with torch.no_grad():
            for _ in range(2):  # cyclic: every forward replays the same passes
                out = model(xs, output_hidden_states=True)
                assert torch.equal(replay.record.kept_indices, record.kept_indices)
                assert replay.record.tokens_per_layer == record.tokens_per_layer
                for a, b in zip(out.hidden_states, ref.hidden_states, strict=True):
                    assert torch.equal(a, b)
    finally:
        replay.remove()


def test_oracle_records_and_replays_through_prune() -> None:
    """One mechanism for every family: FlowCut's selectors are recorded through ``vlmcut.prune`` and replayed
    through it (LLaVA-NeXT: one vision selector per crop budget plus the decoder-layer-1 stage); the replay
    keeps exactly FlowCut's tokens, a record it does not reproduce is reported, and a replay whose selectors
    are not asked for in the recorded order is refused before it runs."""
    import dataclasses

    from vlmcut.api import METHODS as REGISTRY
    from vlmcut.bench.loading import bench_image_size
    from vlmcut.bench.oracle import record_choices
    from vlmcut.bench.presets import build_preset_model, example_inputs
    from vlmcut.bench.tokens import forward_once

    model = build_preset_model("tiny-llava-next")
    inputs = example_inputs(model.config, text_tokens=16, image_size=bench_image_size(model.config))
    rec = record_choices(model, REGISTRY["flowcut"], 16, lambda: forward_once(model, inputs, True))
    assert len(rec.vision) >= 1 and len(rec.llm) == 1 and len(rec.llm_kept_positions) == 1
    assert all(r is not None and r.passes for _, r in rec.vision[1:])  # budgets beyond the first: used
    with rec.attach(model) as handle:
        forward_once(model, inputs, True)
        rec.verify(handle)
        assert handle.method == "flowcut" and handle.tokens_per_layer == rec.tokens_per_layer
        with pytest.raises(RuntimeError, match="did not reproduce flowcut's language-model stage"):
            dataclasses.replace(rec, llm_kept_positions=[]).verify(handle)
    with pytest.raises(RuntimeError, match="asked for a budget of"):
        dataclasses.replace(rec, keep=8).attach(model)
    with rec.attach(model) as handle:  # the refused replay left nothing attached
        forward_once(model, inputs, True)
        rec.verify(handle)
