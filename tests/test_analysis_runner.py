"""vlmcut.analysis.runner / report / cli.analyze on tiny real towers (tests/tiny.py)."""

from __future__ import annotations

import argparse
import base64
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import tiny
import torch

import vlmcut
from vlmcut.analysis.report import analyze_images
from vlmcut.analysis.runner import analyze_tower
from vlmcut.cli.analyze import add_parser

KEEP = 16  # of 64 patches


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # Tiny matmuls are dominated by thread hand-off on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _no_hooks(model: torch.nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def _impls(model: torch.nn.Module) -> list[object]:
    return [m.config._attn_implementation_internal for m in model.modules() if hasattr(m, "config")]


@pytest.fixture(scope="module")
def clip_result() -> tuple[torch.nn.Module, vlmcut.analysis.runner.AnalysisResult]:
    tower = tiny.clip_tower(layers=6, attn="sdpa")
    return tower, analyze_tower(tower, tiny.pixels(batch=2), keep=KEEP)


def test_restores_attention_and_hooks(clip_result) -> None:
    tower, result = clip_result
    assert tower.config._attn_implementation == "sdpa"
    assert set(_impls(tower)) == {"sdpa"}
    assert _no_hooks(tower)
    assert not hasattr(tower, "_output_capturing_hooks_installed")
    assert result.attn_implementation == "sdpa"
    # The tower still works with transformers' own output recording afterwards.
    out = tower(pixel_values=tiny.pixels(batch=1), output_hidden_states=True)
    assert len(out.hidden_states) == 7


def test_restores_on_error() -> None:
    tower = tiny.dinov2_tower(layers=3)
    # Break layer 1 so that the forward fails mid-encoder, with every hook installed.
    tower.encoder.layer[1].attention.k_proj.weight = torch.nn.Parameter(
        torch.zeros(3, 3, dtype=torch.float64)
    )
    with pytest.raises(RuntimeError):
        analyze_tower(tower, tiny.pixels(batch=1), keep=KEEP)
    assert set(_impls(tower)) == {"sdpa"}
    assert _no_hooks(tower)
    assert not hasattr(tower, "_output_capturing_hooks_installed")


def test_metric_ranges_and_shapes(clip_result) -> None:
    _, r = clip_result
    b, layers, n = 2, 6, tiny.GRID * tiny.GRID
    assert r.grid_hw == (tiny.GRID, tiny.GRID) and r.num_layers == layers
    assert r.entropy_ratio.shape == (b, layers)
    assert bool(((r.entropy_ratio >= 0) & (r.entropy_ratio <= 1)).all())
    assert r.inflow.shape == r.outflow.shape == (b, layers, n)
    assert r.criteria.overlap.shape == (b, layers, 3, 3)
    assert bool(((r.criteria.overlap >= 0) & (r.criteria.overlap <= 1)).all())
    for name in (
        "hub_share",
        "focus_is_top_hub",
        "global_hub_overlap",
        "patch_mirror_global",
        "patch_to_cls",
    ):
        x = getattr(r, name)
        assert x.shape == (b, layers) and bool(((x >= 0) & (x <= 1)).all()), name
    assert bool((r.attn_distance >= 0).all())
    norms = r.pruned_value_norm["flowcut"]
    assert len(norms) == layers and norms[0].shape == (b, n)
    counts = [n, *r.tokens_per_layer["flowcut"][:-1]]
    assert [v.shape[-1] for v in norms] == counts  # layer l sees the tokens left after layer l-1
    assert torch.allclose(norms[0], r.value_norm[:, 0])


def test_global_row_matches_eager_attention() -> None:
    tower = tiny.clip_tower(layers=3, attn="eager")
    px = tiny.pixels(batch=1)
    r = analyze_tower(tower, px, keep=KEEP, methods=())
    with torch.no_grad():
        att = tower(pixel_values=px, output_attentions=True).attentions
    row = torch.stack([a.mean(1)[:, 0, 1:] for a in att], 1)
    assert torch.allclose(r.global_attention, row, atol=1e-10)
    assert tower.config._attn_implementation == "eager"


@pytest.mark.parametrize("make", [tiny.clip_tower, tiny.dinov2_tower, tiny.siglip_tower])
def test_kept_indices_match_prune(make) -> None:
    tower = make(layers=4)
    px = tiny.pixels(batch=2)
    r = analyze_tower(tower, px, keep=KEEP, methods=("flowcut", "grid"))
    with vlmcut.prune(tower, "flowcut", keep=KEEP, feature_layer=-1) as handle, torch.no_grad():
        tower(pixel_values=px)
    assert torch.equal(r.kept["flowcut"], handle.kept_indices)
    assert r.kept["grid"].shape == (2, KEEP)
    assert _no_hooks(tower)
    # deterministic
    again = analyze_tower(tower, px, keep=KEEP, methods=("flowcut",))
    assert torch.equal(again.entropy_ratio, r.entropy_ratio) and torch.equal(
        again.kept["flowcut"], r.kept["flowcut"]
    )


def test_report_embeds_pngs(tmp_path: Path) -> None:
    tower = tiny.clip_tower(layers=4)
    images = {f"noise {i}": im for i, im in enumerate(tiny.images(2))}
    html_path = analyze_images(tower, tiny.processor(), images, tmp_path, keep=KEEP, meta={"prompt": "hi"})
    assert html_path == tmp_path / "report.html"
    html = html_path.read_text()
    pngs = sorted(tmp_path.glob("*.png"))
    assert {"fig3_entropy_ratio.png", "fig4_criteria_overlap.png", "fig8_kept_noise_0.png"} <= {
        p.name for p in pngs
    }
    for p in pngs:
        assert base64.b64encode(p.read_bytes()).decode("ascii") in html, p.name
    summary = json.loads((tmp_path / "analysis.json").read_text())
    assert summary["images"] == ["noise 0", "noise 1"]
    assert len(summary["layers"]["entropy ratio"]["mean"]) == 4
    assert summary["meta"]["prompt"] == "hi"
    assert _no_hooks(tower)


def test_cli_on_saved_llava(tmp_path: Path) -> None:
    model_dir = tmp_path / "llava"
    tiny.llava().save_pretrained(model_dir)
    tiny.processor().save_pretrained(model_dir)
    image = tmp_path / "img.png"
    tiny.images(1)[0].save(image)
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "out"
    args = parser.parse_args(
        [
            "analyze",
            "--model",
            str(model_dir),
            "--image",
            str(image),
            "--prompt",
            "what is it",
            "--keep",
            str(KEEP),
            "--out",
            str(out),
        ]
    )
    assert args.func(args) == 0
    summary = json.loads((out / "analysis.json").read_text())
    assert summary["meta"]["prompt"] == "what is it"
    assert summary["feature_layer"] == -2 and summary["consume_layer"] == 2  # 4-layer CLIP, LLaVA default
    assert len(summary["per_image"]["img"]["kept"]["flowcut"]) == KEEP
    assert "what is it" in (out / "report.html").read_text()
    bad = parser.parse_args(["analyze", "--model", str(model_dir), "--out", str(out)])
    assert bad.func(bad) == 2  # no images
