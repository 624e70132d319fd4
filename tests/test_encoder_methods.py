"""FasterVLM and VisionZip: one cut at the output of the encoder layer whose features the model reads.

The reference below restates both papers naively in float64 (the full ``T x T`` attention, Python loops
over groups) and is compared with what the pruned towers and the tiny LLaVA produce.
"""

from __future__ import annotations

import math

import pytest
import tiny
import torch

import vlmcut
from vlmcut.compat import image_features
from vlmcut.methods.fastervlm import FasterVLMConfig, FasterVLMSelector, global_attention
from vlmcut.methods.visionzip import (
    VisionZipConfig,
    VisionZipSelector,
    default_split,
    key_metric,
    visionzip_plan,
)
from vlmcut.models.vit import merge_tokens, tower_spec

TOWERS = [tiny.clip_tower, tiny.siglip_tower, tiny.dinov2_tower]
METHODS = ["fastervlm", "visionzip"]
N = tiny.GRID**2
PROMPTS = ["USER: <image> what is in the image ? ASSISTANT:", "USER: <image> describe ? ASSISTANT:"]


# ---------------------------------------------------------------------------------------------------
# Naive reference (float64)
# ---------------------------------------------------------------------------------------------------


def _run_unpruned(tower: torch.nn.Module, call, layer: int):
    """Call the unpruned model; return its output and the projected q, k of tower layer ``layer`` (B, H, T, d)."""
    spec = tower_spec(tower)
    seen = {}
    attn = spec.attentions[layer]
    hooks = [
        getattr(attn, name).register_forward_hook(lambda m, a, o, name=name: seen.__setitem__(name, o))
        for name in ("q_proj", "k_proj")
    ]
    try:
        out = call()
    finally:
        for h in hooks:
            h.remove()

    def heads(x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, spec.num_heads, spec.head_dim).transpose(1, 2).double()

    return out, heads(seen["q_proj"]), heads(seen["k_proj"]), spec.scales[layer], spec.has_cls


def _naive_scores(q: torch.Tensor, k: torch.Tensor, scale: float, has_cls: bool) -> torch.Tensor:
    """Global-token attention over the patches from the full attention matrix, per head. -> (B, H, N)."""
    if has_cls:
        full = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)  # (B, H, T, T): every row
        return full[:, :, 0, 1:]
    q_mean = q.mean(dim=2, keepdim=True)  # SigLIP: the mean token's query
    return torch.softmax(q_mean @ k.transpose(-1, -2) * scale, dim=-1)[:, :, 0]


def _naive(hidden, q, k, scale, has_cls, method, keep, contextual=None, merge="release"):
    """Expected patch features (B, keep, D) and recorded indices (B, keep), one image at a time."""
    patches = hidden[:, int(has_cls) :]
    per_head = _naive_scores(q, k, scale, has_cls)
    feats, recorded = [], []
    for b in range(hidden.shape[0]):
        if method == "fastervlm":
            kept = sorted(per_head[b].mean(0).topk(keep).indices.tolist())
            feats.append(patches[b, kept])
            recorded.append(kept)
            continue
        dom, ctx = default_split(keep) if contextual is None else (keep - contextual, contextual)
        dominant = sorted(per_head[b].sum(0).topk(dom).indices.tolist())  # the release sums over heads
        rest = [j for j in range(patches.shape[1]) if j not in dominant]
        targets = rest[:: max(1, len(rest) // ctx)][:ctx]
        keys = k[b].mean(0)[int(has_cls) :]
        keys = keys / keys.norm(dim=-1, keepdim=True)
        groups = {t: [] for t in targets}
        for j in rest:
            if j not in targets:
                sims = [float(keys[j] @ keys[t]) for t in targets]
                groups[targets[sims.index(max(sims))]].append(j)
        merged = []
        for t in targets:
            others = patches[b, groups[t]]
            if merge == "mean":
                merged.append(torch.cat([patches[b, t : t + 1], others]).mean(0))
            else:
                merged.append(patches[b, t] + (others.mean(0) if len(others) else 0))
        feats.append(torch.cat([patches[b, dominant], torch.stack(merged)]))
        recorded.append(dominant + targets)
    return torch.stack(feats), torch.tensor(recorded)


# ---------------------------------------------------------------------------------------------------
# Hand-checked selections
# ---------------------------------------------------------------------------------------------------


def test_fastervlm_hand_checked_selection() -> None:
    # CLS query 1 in both heads (d = 1); keys give the logits directly (scale 1). Token 0 is the CLS.
    logits = torch.tensor([[0.0, 4.0, 0.0, 0.0, 0.0], [0.0, 0.0, 2.0, 2.2, 0.0]], dtype=torch.float64)
    q = torch.ones(1, 2, 5, 1, dtype=torch.float64)
    k = logits.view(1, 2, 5, 1)
    # head 0: patch 0 takes e^4 / (e^4 + 4); head 1: patches 1, 2 share most; the head mean ranks 0 > 2 > 1 > 3
    z0, z1 = math.exp(4) + 4, 3 + math.exp(2) + math.exp(2.2)
    expected = [
        (math.exp(4) / z0 + 1 / z1) / 2,
        (1 / z0 + math.exp(2) / z1) / 2,
        (1 / z0 + math.exp(2.2) / z1) / 2,
        (1 / z0 + 1 / z1) / 2,
    ]
    scores = global_attention(q, k, k, 1.0, has_cls=True)
    torch.testing.assert_close(scores[0], torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-15)
    sel = FasterVLMSelector(FasterVLMConfig(keep=2))
    sel.start(consume_layer=3)
    assert sel.step(2, q, k, k, 1.0, True) is None  # only the consumed layer cuts
    assert sel.step(3, q, k, k, 1.0, True).tolist() == [[0, 2]]  # top 2, original order
    sel3 = FasterVLMSelector(FasterVLMConfig(keep=3))
    sel3.start(3)
    assert sel3.step(3, q, k, k, 1.0, True).tolist() == [[0, 1, 2]]
    # no CLS: the mean query ranks all five tokens; with equal queries it is the same row, CLS column included
    no_cls = global_attention(q, k, k, 1.0, has_cls=False)
    assert no_cls[0].topk(2).indices.tolist() == [1, 3]


def _visionzip_case():
    """10 patches + CLS. Patches 2 and 7 dominate the CLS attention. The other 8 (0 1 3 4 5 6 8 9) get
    targets every 8 // 2 = 4th: patches 0 and 5. Keys (after the score component) point at 0 for 1, 3, 9
    and at 5 for 4, 6, 8."""
    direction = {0: (1, 0), 1: (1, 0.1), 3: (1, 0.2), 9: (1, 0.3), 5: (0, 1), 4: (0.1, 1), 6: (0.2, 1)}
    direction[8] = (0.3, 1)
    keys = torch.zeros(1, 1, 11, 3, dtype=torch.float64)
    keys[0, 0, 0] = torch.tensor([0.0, 1.0, 1.0])  # CLS key: not part of any group
    for j in range(10):
        score = 5.0 if j in (2, 7) else 0.0
        x, y = direction.get(j, (0.5, 0.5))
        keys[0, 0, j + 1] = torch.tensor([score, x, y])
    q = torch.zeros(1, 1, 11, 3, dtype=torch.float64)
    q[0, 0, 0, 0] = 1.0  # the CLS query reads the score component only
    return q, keys


def test_visionzip_hand_checked_selection_and_groups() -> None:
    q, k = _visionzip_case()
    sel = VisionZipSelector(VisionZipConfig(keep=4, contextual=2, merge="mean"))
    sel.start(consume_layer=1)
    plan = sel.step(1, q, k, k, 1.0, True)
    assert plan.kept.tolist() == [[2, 7]]
    assert plan.sources.tolist() == [[0, 5]]
    w = plan.weights[0]
    assert torch.equal(w[0].nonzero().flatten(), torch.tensor([0, 1, 3, 9]))
    assert torch.equal(w[1].nonzero().flatten(), torch.tensor([4, 5, 6, 8]))
    assert torch.equal(w[w > 0], torch.full((8,), 0.25, dtype=torch.float64))  # plain group mean
    # applied to a layer output: CLS, dominant tokens, then each group's average
    hidden = torch.randn(1, 11, 6, dtype=torch.float64)
    out = merge_tokens(hidden, plan, has_cls=True)
    p = hidden[0, 1:]
    expected = torch.stack([hidden[0, 0], p[2], p[7], p[[0, 1, 3, 9]].mean(0), p[[4, 5, 6, 8]].mean(0)])
    torch.testing.assert_close(out[0], expected, rtol=0, atol=1e-15)
    # the release's rule: target + mean of the other members
    release = visionzip_plan(global_attention(q, k, k, 1.0, True), key_metric(k, True), 2, 2, "release")
    out = merge_tokens(hidden, release, has_cls=True)
    torch.testing.assert_close(out[0, 3], p[0] + p[[1, 3, 9]].mean(0), rtol=0, atol=1e-15)
    torch.testing.assert_close(out[0, 4], p[5] + p[[4, 6, 8]].mean(0), rtol=0, atol=1e-15)
    # contextual=0 is FasterVLM with the summed-head ranking: plain indices
    only_dominant = VisionZipSelector(VisionZipConfig(keep=2, contextual=0))
    only_dominant.start(1)
    assert only_dominant.step(1, q, k, k, 1.0, True).tolist() == [[2, 7]]


def test_visionzip_key_metric_averages_heads_then_normalises() -> None:
    k = torch.tensor([[1.0, 0.0], [0.0, 3.0]], dtype=torch.float64).view(1, 2, 1, 2)  # 2 heads, 1 token
    torch.testing.assert_close(
        key_metric(k, has_cls=False)[0, 0], torch.tensor([1.0, 3.0]).double() / 10**0.5
    )


def test_visionzip_default_split_follows_the_published_settings() -> None:
    assert default_split(64) == (54, 10)  # official README, LLaVA-1.5
    assert default_split(128) == (108, 20)
    assert default_split(192) == (162, 30)
    assert default_split(160) == (135, 25)  # LLaVA-NeXT
    assert default_split(63) == (53, 10)  # "full" strategy at 64: CLS + 53 + 10, the release's count
    assert default_split(1) == (1, 0)
    for keep in range(1, 300):
        d, c = default_split(keep)
        assert d + c == keep and d >= 0 and c >= 0


# ---------------------------------------------------------------------------------------------------
# Towers
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("builder", TOWERS)
@pytest.mark.parametrize(
    "method,options",
    [
        ("fastervlm", {}),
        ("visionzip", {}),
        ("visionzip", {"merge": "mean"}),
        ("visionzip", {"contextual": 7}),
    ],
    ids=["fastervlm", "visionzip", "visionzip-mean", "visionzip-contextual7"],
)
def test_towers_match_the_naive_reference(builder, method, options) -> None:
    keep = 20
    model = builder(seed=3)
    x = tiny.pixels(2, seed=3)
    last = model.config.num_hidden_layers - 1  # feature_layer=-1: the last layer's output is read
    with torch.no_grad():
        ref, q, k, scale, has_cls = _run_unpruned(model, lambda: model(x, output_hidden_states=True), last)
        with vlmcut.prune(model, method, keep=keep, **options) as h:
            out = model(x, output_hidden_states=True)
    feats, recorded = _naive(ref.hidden_states[-1], q, k, scale, has_cls, method, keep, **options)
    off = int(has_cls)
    assert out.hidden_states[-1].shape == (2, keep + off, ref.hidden_states[-1].shape[-1])
    assert h.kept_indices.shape == (2, keep)
    assert h.tokens_per_layer == [N] * last + [keep]
    assert torch.equal(h.kept_indices, recorded)
    if has_cls:
        assert torch.equal(out.hidden_states[-1][:, 0], ref.hidden_states[-1][:, 0])
    if method == "fastervlm":  # the kept features are the unpruned model's, bit for bit
        assert torch.equal(out.hidden_states[-1][:, off:], feats)
    torch.testing.assert_close(out.hidden_states[-1][:, off:], feats, rtol=0, atol=1e-12)
    for a, b in zip(out.hidden_states[:-1], ref.hidden_states[:-1], strict=True):
        assert torch.equal(a, b)  # nothing changes before the cut


@pytest.mark.parametrize("builder", TOWERS)
def test_fastervlm_scores_equal_full_attention_float64(builder) -> None:
    model = builder(seed=4)
    x = tiny.pixels(3, seed=4)
    last = model.config.num_hidden_layers - 1
    with torch.no_grad():
        _, q, k, scale, has_cls = _run_unpruned(model, lambda: model(x), last)
    ours = global_attention(q, k, k, scale, has_cls)  # only the global row
    naive = _naive_scores(q, k, scale, has_cls).mean(1)
    torch.testing.assert_close(ours, naive, rtol=0, atol=1e-15)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("builder", TOWERS)
def test_keep_all_is_identity_on_towers(builder, method) -> None:
    model = builder()
    x = tiny.pixels(2)
    with torch.no_grad():
        ref = model(x, output_hidden_states=True)
        for keep in (N, N + 10):
            with vlmcut.prune(model, method, keep=keep) as h:
                out = model(x, output_hidden_states=True)
            assert h.kept_indices.tolist() == [list(range(N))] * 2
            for a, b in zip(out.hidden_states, ref.hidden_states, strict=True):
                assert torch.equal(a, b)
            assert torch.equal(out.pooler_output, ref.pooler_output)


@pytest.mark.parametrize("method", METHODS)
def test_tower_remove_restores_and_sdpa_keeps_its_kernel(method) -> None:
    model = tiny.clip_tower(attn="sdpa")
    x = tiny.pixels(2)
    with torch.no_grad():
        model(x, output_hidden_states=True)  # transformers installs its capture hooks lazily, once
        before = [(n, dict(m._forward_hooks), dict(m._forward_pre_hooks)) for n, m in model.named_modules()]
        ref = model(x).last_hidden_state
        seen = []
        hooks = [
            layer.self_attn.register_forward_hook(lambda m, a, o: seen.append(o[1]))
            for layer in model.encoder.layers
        ]
        handle = vlmcut.prune(model, method, keep=9)
        assert model(x).last_hidden_state.shape == (2, 10, ref.shape[-1])
        for hk in hooks:
            hk.remove()
        handle.remove()
        after = [(n, dict(m._forward_hooks), dict(m._forward_pre_hooks)) for n, m in model.named_modules()]
        assert torch.equal(model(x).last_hidden_state, ref)
    assert after == before
    assert seen and all(w is None for w in seen)  # no attention matrix was asked for


def test_config_errors_say_what_to_do() -> None:
    model = tiny.clip_tower()
    before = [(n, dict(m._forward_hooks), dict(m._forward_pre_hooks)) for n, m in model.named_modules()]
    for method in METHODS:
        with pytest.raises(ValueError, match="keep must be >= 1"):
            vlmcut.prune(model, method, keep=0)
    with pytest.raises(ValueError, match="contextual <= keep"):
        vlmcut.prune(model, "visionzip", keep=4, contextual=5)
    with pytest.raises(ValueError, match="merge must be 'mean'"):
        vlmcut.prune(model, "visionzip", keep=4, merge="sum")
    with pytest.raises(TypeError, match="valid options"):
        vlmcut.prune(model, "fastervlm", keep=4, contextual=1)
    after = [(n, dict(m._forward_hooks), dict(m._forward_pre_hooks)) for n, m in model.named_modules()]
    assert after == before  # nothing left attached


# ---------------------------------------------------------------------------------------------------
# LLaVA
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def proc():
    return tiny.processor()


def _inputs(proc, seed=0):
    return proc(images=tiny.images(2, seed), text=PROMPTS, return_tensors="pt", padding=True)


@pytest.mark.parametrize("method", METHODS)
def test_llava_features_match_the_naive_reference(proc, method) -> None:
    keep = 12
    model = tiny.llava(seed=1, dtype=torch.float64)
    inputs = _inputs(proc, seed=1)
    pixels = inputs["pixel_values"].double()
    tower = model.model.vision_tower
    consumed = model.config.vision_config.num_hidden_layers + model.config.vision_feature_layer  # F = 2
    with torch.no_grad():
        ref, q, k, scale, has_cls = _run_unpruned(
            tower, lambda: tower(pixels, output_hidden_states=True), consumed
        )
        feats, recorded = _naive(ref.hidden_states[-2], q, k, scale, has_cls, method, keep)
        expected = model.model.multi_modal_projector(feats)
        with vlmcut.prune(model, method, keep=keep) as h:
            out = model(**{**inputs, "pixel_values": pixels})
    assert h.kept_indices.shape == (2, keep)
    assert torch.equal(h.kept_indices, recorded)
    assert h.tokens_per_layer == [N, N, keep, keep]  # cut at the output of layer F = 2
    image_states = image_features(out).reshape(2, keep, -1)
    torch.testing.assert_close(image_states, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_llava_identity_generate_and_remove(proc, method) -> None:
    model = tiny.llava(seed=2)
    inputs = _inputs(proc, seed=2)
    assert bool((inputs["attention_mask"][:, 0] == 0).any())  # really left-padded
    n = inputs["input_ids"].shape[1]
    with torch.no_grad():
        ref = model(**inputs).logits
        ref_gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        with vlmcut.prune(model, method, keep=N):  # keep every patch: the exact identity
            assert torch.equal(model(**inputs).logits, ref)
            assert torch.equal(model.generate(**inputs, max_new_tokens=3, do_sample=False), ref_gen)
        handle = vlmcut.prune(model, method, keep=6)
        logits = model(**inputs).logits
        assert handle.kept_indices.shape == (2, 6)
        assert logits.shape[1] == n - (N - 6)  # the prompt lost N - 6 placeholders
        gen = model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False)
        # reference decoding: the caller's full prompt through the pruned forward at every step, no cache
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        for _ in range(5):
            nxt = model(
                input_ids=ids, attention_mask=mask, pixel_values=inputs["pixel_values"], use_cache=False
            )
            nxt = nxt.logits[:, -1].argmax(-1, keepdim=True)
            ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
        assert torch.equal(gen[:, :n], inputs["input_ids"])
        assert torch.equal(gen, ids)
        handle.remove()
        assert "generate" not in vars(model)
        assert all(not m._forward_pre_hooks for m in model.modules())
        assert torch.equal(model(**inputs).logits, ref)


def test_llava_full_strategy_counts_cls_as_one_of_k(proc) -> None:
    model = tiny.llava(seed=3, strategy="full")
    full_proc = tiny.processor()
    full_proc.vision_feature_select_strategy = "full"
    inputs = full_proc(images=tiny.images(1, 3), text=[PROMPTS[0]], return_tensors="pt")
    with torch.no_grad(), vlmcut.prune(model, "visionzip", keep=8) as h:
        out = model(**inputs)
    assert image_features(out).shape[0] == 8
    assert h.kept_indices.shape == (1, 7)  # CLS + 6 dominant + 1 contextual (default_split(7))
    with pytest.raises(ValueError, match="lower contextual"):
        vlmcut.prune(model, "visionzip", keep=8, contextual=8)
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_llava_bf16_visionzip_is_finite(proc) -> None:
    model = tiny.llava(seed=4, dtype=torch.bfloat16)
    inputs = _inputs(proc, seed=4)
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    with torch.no_grad(), vlmcut.prune(model, "visionzip", keep=8) as h:
        logits = model(**inputs).logits
    assert logits.dtype == torch.bfloat16 and bool(torch.isfinite(logits).all())
    assert h.kept_indices.shape == (2, 8)
