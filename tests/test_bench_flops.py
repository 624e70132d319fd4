"""Analytic FLOPs model and model-shape presets (vlmcut.bench.flops, vlmcut.bench.presets).

All fast: configs only, full-size models are built on the meta device, only the tiny presets run.
"""

from __future__ import annotations

import time

import pytest
import torch

from vlmcut.bench.flops import (
    DENSE_CONVENTION,
    FASTV_FORMULA_CONVENTION,
    PAPER_CONVENTION,
    PAPER_NEXT_IMAGE_SIZE,
    PAPER_TEXT_TOKENS,
    FlopsConvention,
    decode_flops,
    drop_schedule,
    flowcut_vision_schedule,
    kv_cache_bytes,
    llm_prefill_flops,
    model_shape,
    paper_table5,
    prefill_breakdown,
    prefill_tflops,
    vision_flops,
)
from vlmcut.bench.presets import (
    build_preset_model,
    example_inputs,
    list_presets,
    llava_next_num_crops,
    llava_next_num_image_tokens,
    num_image_tokens,
    preset_config,
)

# Table 5 of the paper (TFLOPs).
PAPER_KEY_ROWS = {
    ("llava-1.5-7b", "none"): 8.82,
    ("llava-1.5-7b", "flowcut"): 1.95,
    ("llava-next-7b", "none"): 31.03,
    ("llava-next-7b", "flowcut"): 4.29,
    ("llava-1.5-7b", "visionzip"): 2.03,
    ("llava-next-7b", "visionzip"): 4.72,
}


@pytest.fixture
def one_thread():
    """A tiny model is dominated by thread start-up on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------------------
# The paper's numbers
# ---------------------------------------------------------------------------------------------------------


def test_paper_table5_within_5_percent():
    rows = {(r.model, r.method): r for r in paper_table5()}
    for key, paper in PAPER_KEY_ROWS.items():
        row = rows[key]
        assert row.paper == paper
        assert abs(row.ours / paper - 1) < 0.05, str(row)


def test_paper_numbers_from_the_public_api():
    """The four headline numbers straight from prefill_tflops, as a user would compute them."""
    shape = model_shape("llava-1.5-7b")
    v, layers = shape.vision, shape.lm.num_layers
    assert v.feature_layer == 22 and v.num_layers == 24
    base = prefill_tflops("llava-1.5-7b")
    fc = prefill_tflops("llava-1.5-7b", flowcut_vision_schedule(576, 64, 24, 22))
    assert base == pytest.approx(8.82, rel=0.05)
    assert fc == pytest.approx(1.95, rel=0.05)

    next_base = prefill_tflops("llava-next-7b", image_size=PAPER_NEXT_IMAGE_SIZE)
    # FlowCut two-stage (release): K/2 = 80 per crop in CLIP, 5 crops -> 400 tokens into decoder layers
    # 0-1, K = 160 from layer 2 on.
    next_fc = prefill_tflops(
        "llava-next-7b",
        flowcut_vision_schedule(576, 80, 24, 22),
        drop_schedule(layers, 5 * 80, {1: 160}),
        image_size=PAPER_NEXT_IMAGE_SIZE,
    )
    assert next_base == pytest.approx(31.03, rel=0.05)
    assert next_fc == pytest.approx(4.29, rel=0.05)


def test_next_image_geometry():
    cfg = preset_config("llava-next-7b")
    assert llava_next_num_crops(cfg, (427, 640)) == 5
    assert llava_next_num_image_tokens(cfg, (427, 640)) == 576 + 32 * 48 + 32  # 2144
    assert llava_next_num_image_tokens(cfg, (480, 640)) == 576 + 36 * 48 + 36  # 2340
    assert llava_next_num_image_tokens(cfg, (672, 672)) == 576 + 48 * 48 + 48  # square: 2928
    # without an image size the nominal 5 x 576 = 2880 is used
    bd = prefill_breakdown("llava-next-7b")
    assert bd.projector == prefill_breakdown("llava-next-7b", image_size=(427, 640)).projector
    assert bd.llm > prefill_breakdown("llava-next-7b", llm_visual_tokens=2144, image_size=(427, 640)).llm


def test_paper_convention_is_needed():
    """Counting attention's quadratic term overshoots LLaVA-NeXT's 31.03 by more than 5 %."""
    dense = prefill_tflops("llava-next-7b", image_size=PAPER_NEXT_IMAGE_SIZE, convention=DENSE_CONVENTION)
    assert dense / 31.03 - 1 > 0.05
    # The text length matters: the paper's prompt is ~65 tokens.
    assert PAPER_TEXT_TOKENS == 65
    assert prefill_tflops("llava-1.5-7b", text_tokens=0) < 8.82 * 0.95


def test_fastv_formula_convention():
    """FASTV_FORMULA_CONVENTION is exactly L * (4 n d^2 + 2 n^2 d + 2 n d m) of the LLM."""
    n, d, m, L = 576 + 65, 4096, 11008, 32
    expected = L * (4 * n * d * d + 2 * n * n * d + 2 * n * d * m)
    got = prefill_breakdown("llava-1.5-7b", convention=FASTV_FORMULA_CONVENTION)
    assert got.total == expected
    assert got.vision == got.projector == got.lm_head == 0


# ---------------------------------------------------------------------------------------------------------
# Properties of the model
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("convention", [PAPER_CONVENTION, DENSE_CONVENTION])
@pytest.mark.parametrize("preset", ["llava-1.5-7b", "llava-next-7b"])
def test_flops_fall_with_fewer_tokens(preset, convention):
    keeps = [576, 288, 192, 128, 64, 32, 1]
    # pruning in the LLM only
    llm = [prefill_tflops(preset, None, k, projector_tokens=k, convention=convention) for k in keeps]
    assert all(a > b for a, b in zip(llm, llm[1:], strict=False))
    # pruning in the vision encoder (FlowCut schedule): vision and LLM both shrink
    fc = [
        prefill_breakdown(preset, flowcut_vision_schedule(576, k, 24, 22), convention=convention)
        for k in keeps
    ]
    assert all(a.vision > b.vision for a, b in zip(fc, fc[1:], strict=False))
    assert all(a.total > b.total for a, b in zip(fc, fc[1:], strict=False))
    # keeping all 576 is the unpruned LLaVA-1.5; every pruned configuration is cheaper
    base = prefill_tflops(preset, convention=convention)
    assert llm[0] <= base and max(llm[1:]) < base


def test_flops_fall_with_lower_entropy():
    """Lower attention entropy -> FlowCut prunes earlier -> fewer vision FLOPs."""
    shape = model_shape("llava-1.5-7b")
    vis = [
        vision_flops(shape, flowcut_vision_schedule(576, 64, 24, 22, entropy=h)) for h in (1.0, 0.9, 0.5, 0.0)
    ]
    assert all(a > b for a, b in zip(vis, vis[1:], strict=False))


@pytest.mark.parametrize("convention", [PAPER_CONVENTION, DENSE_CONVENTION, FASTV_FORMULA_CONVENTION])
def test_list_form_equals_constant_form(convention):
    for preset in ("llava-1.5-7b", "qwen2-vl-7b"):
        shape = model_shape(preset)
        L, V = shape.lm.num_layers, shape.vision.num_layers
        assert llm_prefill_flops(shape, 200, convention) == llm_prefill_flops(shape, [200] * L, convention)
        assert vision_flops(shape, 577, convention) == vision_flops(shape, [577] * V, convention)
        assert decode_flops(shape, 300, convention) == decode_flops(shape, [300] * L, convention)
        assert kv_cache_bytes(shape, 300) == kv_cache_bytes(shape, [300] * L)
    a = prefill_breakdown("llava-1.5-7b", 577, 576, convention=convention)
    b = prefill_breakdown("llava-1.5-7b", [577] * 24, [576] * 32, convention=convention)
    c = prefill_breakdown("llava-1.5-7b", convention=convention)
    assert a == b == c
    # per-crop lists equal a shared list
    s = flowcut_vision_schedule(576, 80, 24, 22)
    kw = {"image_size": PAPER_NEXT_IMAGE_SIZE, "convention": convention}
    assert prefill_breakdown("llava-next-7b", s, 160, **kw) == prefill_breakdown(
        "llava-next-7b", [s] * 5, 160, **kw
    )


def test_paper_convention_is_two_flops_per_weight(one_thread):
    """Under PAPER_CONVENTION each part costs 2 x (its Linear/Conv weights) x tokens: check the shapes read
    from the config against the real modules (built on the meta device)."""
    for preset, tokens in (("llava-1.5-7b", 577), ("qwen2-vl-7b", 1024)):
        model = build_preset_model(preset, num_llm_layers=2, device="meta")
        shape = model_shape(preset_config(preset, num_llm_layers=2))
        inner = model.model

        def weights(module: torch.nn.Module) -> int:
            return sum(
                m.weight.numel()
                for m in module.modules()
                if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Conv3d))
            )

        lm_layers = inner.language_model.layers
        assert len(lm_layers) == 2
        assert llm_prefill_flops(shape, 10, include_lm_head=False) == 2 * 10 * weights(lm_layers)
        assert llm_prefill_flops(shape, 10) - llm_prefill_flops(shape, 10, include_lm_head=False) == (
            2 * 10 * model.lm_head.weight.numel()
        )
        if preset == "llava-1.5-7b":
            tower = inner.vision_tower
            assert vision_flops(shape, tokens) == 2 * (
                tokens * weights(tower.encoder) + 576 * weights(tower.embeddings)
            )
            proj = prefill_breakdown(shape, llm_visual_tokens=1).projector
            assert proj == 2 * 576 * weights(inner.multi_modal_projector)
        else:
            visual = inner.visual
            assert vision_flops(shape, tokens) == 2 * tokens * (
                weights(visual.blocks) + weights(visual.patch_embed)
            )
            proj = prefill_breakdown(shape, tokens, 1).projector
            assert proj == 2 * (tokens // 4) * weights(visual.merger)


def test_decode_and_kv_cache():
    shape = model_shape("llava-1.5-7b")
    # LLaVA-1.5 / Llama-2-7B: K and V of 32 layers x 4096 in fp16 = 512 KiB per token
    assert kv_cache_bytes(shape, 641) == 641 * 2 * 2 * 32 * 4096
    qwen = model_shape("qwen2-vl-7b")
    assert kv_cache_bytes(qwen, 100) == 100 * 2 * 2 * 28 * 4 * 128  # GQA: 4 KV heads of 128
    pruned = drop_schedule(32, 641, {1: 129})
    assert kv_cache_bytes(shape, pruned) < kv_cache_bytes(shape, 641)
    d = [decode_flops(shape, c, DENSE_CONVENTION) for c in (2000, 641, 129, 0)]
    assert all(a > b for a, b in zip(d, d[1:], strict=False))
    # paper convention: 2 FLOPs per weight, independent of the context (~13.2 GFLOPs for Llama-2-7B)
    assert decode_flops(shape, 2000) == decode_flops(shape, 0) == pytest.approx(13.2e9, rel=0.01)


def test_schedules():
    s = flowcut_vision_schedule(576, 64, 24, 22)
    assert len(s) == 24 and s[0] == 577 and s[-1] == 65
    assert s[23] == 65  # layer 22's output (hidden_states[-2]) already has K patches + CLS
    assert all(a >= b for a, b in zip(s, s[1:], strict=False))
    # pruning happens after every second layer, ending after layer 21
    assert {i for i in range(23) if s[i + 1] < s[i]} <= {1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21}
    q = flowcut_vision_schedule(1024, 64, 32, 31, has_cls=False, merge=4)
    assert q[0] == 1024 and q[-1] == 256 and all(n % 4 == 0 for n in q)
    assert drop_schedule(4, 10, {1: 3}) == [10, 10, 3, 3]
    with pytest.raises(ValueError):
        llm_prefill_flops(model_shape("llava-1.5-7b"), [10] * 31)
    with pytest.raises(ValueError):
        FlopsConvention(attention="quadratic")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------------------


def test_preset_configs_have_documented_sizes():
    assert {"llava-1.5-7b", "llava-next-7b", "qwen2-vl-7b", "tiny"} <= set(list_presets())
    c = preset_config("llava-1.5-7b")
    assert type(c).__name__ == "LlavaConfig"
    v, t = c.vision_config, c.text_config
    assert (v.num_hidden_layers, v.hidden_size, v.num_attention_heads, v.intermediate_size) == (
        24,
        1024,
        16,
        4096,
    )
    assert (v.image_size, v.patch_size) == (336, 14)
    assert (t.num_hidden_layers, t.hidden_size, t.num_attention_heads, t.intermediate_size) == (
        32,
        4096,
        32,
        11008,
    )
    assert c.vision_feature_layer == -2 and c.vision_feature_select_strategy == "default"
    assert num_image_tokens(c) == 576

    n = preset_config("llava-next-7b")
    assert type(n).__name__ == "LlavaNextConfig"
    assert n.text_config.hidden_size == 4096 and n.vision_config.hidden_size == 1024
    assert [336, 672] in n.image_grid_pinpoints and [672, 672] in n.image_grid_pinpoints

    q = preset_config("qwen2-vl-7b")
    assert type(q).__name__ == "Qwen2VLConfig"
    qv, qt = q.vision_config, q.text_config
    assert (qv.depth, qv.embed_dim, qv.num_heads, qv.patch_size, qv.spatial_merge_size) == (
        32,
        1280,
        16,
        14,
        2,
    )
    assert qv.embed_dim * qv.mlp_ratio == 5120 and qv.hidden_size == 3584
    assert (qt.num_hidden_layers, qt.hidden_size, qt.num_attention_heads, qt.num_key_value_heads) == (
        28,
        3584,
        28,
        4,
    )
    assert (qt.intermediate_size, qt.vocab_size) == (18944, 152064)
    assert num_image_tokens(q, (448, 448)) == 256


def test_full_size_presets_build_real_classes_on_meta():
    expected = {
        "llava-1.5-7b": ("LlavaForConditionalGeneration", 7.06e9),
        "llava-next-7b": ("LlavaNextForConditionalGeneration", 7.06e9),
        "qwen2-vl-7b": ("Qwen2VLForConditionalGeneration", 8.29e9),
    }
    for name, (cls_name, params) in expected.items():
        model = build_preset_model(name, device="meta")
        assert type(model).__name__ == cls_name
        assert sum(p.numel() for p in model.parameters()) == pytest.approx(params, rel=0.01)
        assert next(model.parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize("name", ["llava-1.5-7b", "qwen2-vl-7b", "tiny"])
def test_num_llm_layers_shortens_the_lm(name):
    full = preset_config(name)
    short = preset_config(name, num_llm_layers=2)
    assert short.text_config.num_hidden_layers == 2 < full.text_config.num_hidden_layers
    assert short.text_config.hidden_size == full.text_config.hidden_size
    model = build_preset_model(name, num_llm_layers=2, device="meta")
    assert len(model.model.language_model.layers) == 2
    assert model_shape(short).lm.num_layers == 2
    assert prefill_tflops(short, image_size=(448, 448)) < prefill_tflops(full, image_size=(448, 448))
    with pytest.raises(ValueError):
        preset_config(name, num_llm_layers=0)


@pytest.mark.parametrize(
    ("name", "image_size"),
    [
        ("tiny", None),
        ("tiny-llava-next", (100, 150)),
        ("tiny-llava-next", (150, 100)),
        ("tiny-qwen2-vl", (84, 140)),
    ],
)
def test_tiny_presets_run_on_cpu(name, image_size, one_thread):
    t0 = time.perf_counter()
    model = build_preset_model(name)
    inputs = example_inputs(name, text_tokens=8, image_size=image_size)
    with torch.no_grad():
        out = model(**inputs)
    elapsed = time.perf_counter() - t0
    assert next(model.parameters()).dtype == torch.float32
    cfg = preset_config(name)
    assert out.logits.shape == (1, inputs["input_ids"].shape[1], cfg.text_config.vocab_size)
    assert torch.isfinite(out.logits).all()
    assert elapsed < 10.0
    # the token count our geometry predicts is the one the real model consumed (it raises otherwise)
    extra = 2 if name == "tiny-qwen2-vl" else 0
    assert inputs["input_ids"].shape[1] == 8 + extra + num_image_tokens(cfg, image_size)
