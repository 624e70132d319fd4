"""Pruning inside the language model (FastV, PDrop, FlowCut's second stage) on tiny real LLaVA models."""

from __future__ import annotations

import math

import pytest
import tiny
import torch

import vlmcut
from vlmcut.methods.flowcut import FlowCutLLMSelector, llm_stage_scores
from vlmcut.methods.llm_base import LLMContext, last_token_attention, top_per_image
from vlmcut.methods.pdrop import PDropConfig, PDropSelector, default_layers, stage_counts

PROMPTS = ["USER: <image> what is in the image ? ASSISTANT:", "USER: <image> describe ? ASSISTANT:"]
TEXT_LAYERS = 6
N_VISUAL = tiny.GRID**2  # 64 placeholders per image ("default" strategy drops CLS)


@pytest.fixture(scope="module")
def proc():
    return tiny.processor()


def _inputs(proc, prompts=PROMPTS, seed=0):
    n = sum(p.count("<image>") for p in prompts)
    return proc(images=tiny.images(n, seed), text=prompts, return_tensors="pt", padding=True)


LLM_METHODS = [("fastv", {}), ("pdrop", {"layers": (1, 3, 5)})]


@pytest.mark.parametrize(("method", "options"), LLM_METHODS)
def test_identity_when_keeping_everything_and_after_remove(proc, method, options) -> None:
    model = tiny.llava(seed=1, text_layers=TEXT_LAYERS)
    inputs = _inputs(proc, seed=1)
    with torch.no_grad():
        base = model(**inputs).logits
        with vlmcut.prune(model, method, keep=N_VISUAL, **options):
            same = model(**inputs).logits
        with vlmcut.prune(model, method, keep=12, **options):
            pruned = model(**inputs).logits
        after = model(**inputs).logits
    assert torch.equal(same, base)
    assert torch.equal(after, base)
    assert pruned.shape == base.shape  # the output is scattered back to the caller's length
    assert not torch.allclose(pruned[:, -1], base[:, -1], atol=1e-4)  # pruning really changed something


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize(("method", "options"), LLM_METHODS)
def test_generate_with_cache_equals_without_cache(proc, attn, method, options) -> None:
    """The KV cache of the layers after a prune layer holds fewer keys; decoding must still be exact."""
    model = tiny.llava(seed=3, attn=attn, text_layers=TEXT_LAYERS)
    inputs = _inputs(proc, seed=3)
    assert bool((inputs["attention_mask"][:, 0] == 0).any())  # really left-padded
    kwargs = {"max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False}
    with torch.no_grad():
        unpruned = model.generate(**inputs, **kwargs)
        with vlmcut.prune(model, method, keep=12, **options) as h:
            cached = model.generate(**inputs, **kwargs)
            assert h.llm_record.kept_positions  # generate's prefill really pruned
            uncached = model.generate(**inputs, use_cache=False, **kwargs)
            assert h.llm_record.kept_positions
            logits = model(**inputs).logits[:, -1]
        assert not torch.allclose(logits, model(**inputs).logits[:, -1], atol=1e-4)
    assert torch.equal(cached, uncached)
    assert cached.shape == unpruned.shape
    assert torch.equal(cached[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])


@pytest.mark.parametrize(("method", "options"), LLM_METHODS)
def test_batch_rows_equal_single_rows(proc, method, options) -> None:
    """Rows with different padding and fillers give what each row gives alone."""
    model = tiny.llava(seed=4, text_layers=TEXT_LAYERS)
    inputs = _inputs(proc, seed=4)
    images = tiny.images(2, 4)
    with torch.no_grad(), vlmcut.prune(model, method, keep=12, **options):
        batch = model(**inputs).logits[:, -1]
        for r in range(2):
            one = proc(images=images[r : r + 1], text=PROMPTS[r : r + 1], return_tensors="pt")
            torch.testing.assert_close(model(**one).logits[:, -1], batch[r : r + 1], atol=1e-5, rtol=1e-5)


def test_fastv_equals_masking_dropped_keys_in_the_unpruned_model(proc) -> None:
    """Oracle: dropping tokens after layer K-1 == the unpruned model whose layers >= K cannot see them."""
    model = tiny.llava(seed=5, attn="eager", text_layers=TEXT_LAYERS)
    inputs = _inputs(proc, prompts=PROMPTS[:1], seed=5)
    keep = 9
    with torch.no_grad():
        with vlmcut.prune(model, "fastv", keep=keep) as h:
            pruned = model(**inputs).logits[:, -1]
        kept = h.llm_record.kept_positions[-1][0]
        ids = inputs["input_ids"][0]
        visual = ids == model.config.image_token_id
        dropped = visual.clone()
        dropped[kept[kept >= 0]] = False
        assert int(visual.sum() - dropped.sum()) == keep
        assert h.kept_indices.shape == (1, keep)

        mask_dropped = tiny.mask_keys_hook(dropped)

        layers = model.model.language_model.layers
        handles = [layer.register_forward_pre_hook(mask_dropped, with_kwargs=True) for layer in layers[2:]]
        try:
            oracle = model(**inputs).logits[:, -1]
        finally:
            for hd in handles:
                hd.remove()
    torch.testing.assert_close(pruned, oracle, atol=1e-5, rtol=1e-5)


def test_fastv_keeps_top_attention_of_last_token_hand_checked() -> None:
    """One row, one head: the last token's query points at visual tokens 2 and 4 (of 1..5)."""
    t, d = 7, 2
    q = torch.zeros(1, 1, t, d)
    q[0, 0, -1] = torch.tensor([1.0, 0.0])
    k = torch.zeros(1, 1, t, d)
    k[0, 0, 2] = torch.tensor([5.0, 0.0])
    k[0, 0, 4] = torch.tensor([3.0, 0.0])
    k[0, 0, 3] = torch.tensor([-2.0, 0.0])
    visual = torch.tensor([[False, True, True, True, True, True, False]])
    ctx = LLMContext(
        layer=1,
        q=q,
        k=k,
        v=torch.zeros(1, 1, t, d),
        scale=1.0,
        visual=visual,
        valid=torch.ones(1, t, dtype=torch.bool),
        query_index=torch.tensor([t - 1]),
        image_index=torch.where(visual, 0, -1),
        hidden=torch.zeros(1, t, 4),
    )
    att = last_token_attention(ctx)
    expected = torch.softmax(k[0, 0, :, 0], dim=0)  # q . k_j with scale 1
    torch.testing.assert_close(att[0], expected)
    keep = top_per_image(att, ctx, 2)
    assert keep.tolist() == [[True, False, True, False, True, False, True]]


def test_flowcut_llm_stage_matches_formula_4_in_float64() -> None:
    torch.manual_seed(0)
    b, h, t, d = 2, 4, 12, 8
    q, k, v = (torch.randn(b, h, t, d, dtype=torch.float64) for _ in range(3))
    visual = torch.zeros(b, t, dtype=torch.bool)
    visual[:, 2:10] = True
    ctx = LLMContext(
        1,
        q,
        k,
        v,
        d**-0.5,
        visual,
        torch.ones(b, t, dtype=torch.bool),
        torch.tensor([t - 1, t - 1]),
        torch.where(visual, 0, -1),
        torch.zeros(b, t, 3),
    )
    got = llm_stage_scores(ctx)[:, 2:10]
    vis = slice(2, 10)
    qg, vg = q[:, :, vis].mean(2), v[:, :, vis].mean(2)
    a = torch.softmax(torch.einsum("bhd,bhtd->bht", qg, k[:, :, vis]) * d**-0.5, -1).mean(1)
    s = torch.softmax(torch.einsum("bhd,bhtd->bht", vg, v[:, :, vis]), -1).mean(1)
    n = v[:, :, vis].mean(1).abs().sum(-1)
    torch.testing.assert_close(got, (a / a.sum(-1, keepdim=True) + s / s.sum(-1, keepdim=True)) * n)
    keep = FlowCutLLMSelector(3).select(ctx)
    assert keep[:, 2:10].sum(1).tolist() == [3, 3] and bool(keep[:, :2].all()) and bool(keep[:, 10:].all())


def test_pdrop_matches_the_average_visual_tokens_and_counts(proc) -> None:
    counts, lam = stage_counts(64, 8, (2, 4, 6), keep=20)
    assert counts[0] == 64
    average = sum(2 * 64 * lam**s for s in range(4)) / 8
    assert math.isclose(average, 20, rel_tol=1e-9)
    assert [round(64 * lam**s) for s in range(4)] == counts
    # the paper's layers (8, 16, 24 of 32) scale with depth; too-low budgets move the first stage to layer 2
    assert default_layers(32, 576, 192) == (8, 16, 24)
    assert default_layers(32, 576, 64)[0] == 2
    with pytest.raises(ValueError, match="pass earlier layers"):
        stage_counts(64, 8, (4, 5, 6), keep=10)

    model = tiny.llava(seed=6, text_layers=TEXT_LAYERS)
    inputs = _inputs(proc, seed=6)
    sel = PDropSelector(PDropConfig(keep=24, layers=(2, 3, 4)))
    assert sel.prune_layers(TEXT_LAYERS, N_VISUAL) == [1, 2, 3]
    with torch.no_grad(), vlmcut.prune(model, "pdrop", keep=24, layers=(2, 3, 4)) as h:
        model(**inputs)
    visual = inputs["input_ids"] == model.config.image_token_id
    expected, _ = stage_counts(N_VISUAL, TEXT_LAYERS, (2, 3, 4), 24)
    for stage, kept in enumerate(h.llm_record.kept_positions):
        for r in range(2):
            cols = kept[r][kept[r] >= 0]
            assert int(visual[r, cols].sum()) == expected[stage + 1]


def test_two_images_in_one_row_keep_k_each(proc) -> None:
    model = tiny.llava(seed=7, text_layers=TEXT_LAYERS)
    prompts = ["USER: <image> <image> what is in the image ? ASSISTANT:"]
    inputs = _inputs(proc, prompts=prompts, seed=7)
    with torch.no_grad(), vlmcut.prune(model, "fastv", keep=5) as h:
        model(**inputs)
        gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert h.kept_indices.shape == (2, 5)
    assert bool((h.kept_indices < N_VISUAL).all())
    assert gen.shape[1] > inputs["input_ids"].shape[1]


def test_bf16_generate(proc) -> None:
    model = tiny.llava(seed=8, dtype=torch.bfloat16, text_layers=TEXT_LAYERS)
    inputs = _inputs(proc, seed=8)
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    with torch.no_grad(), vlmcut.prune(model, "fastv", keep=6) as h:
        logits = model(**inputs).logits
        gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert logits.dtype == torch.bfloat16 and bool(torch.isfinite(logits[:, -1]).all())
    assert h.kept_indices.shape == (2, 6)
    assert gen.shape[1] == inputs["input_ids"].shape[1] + 3


def test_errors_are_actionable() -> None:
    with pytest.raises(TypeError, match="prunes inside the language model"):
        vlmcut.prune(tiny.clip_tower(), "fastv", keep=8)
    model = tiny.llava(seed=9, attn="sdpa", text_layers=2)
    with pytest.raises(ValueError, match="must be <"):
        with vlmcut.prune(model, "fastv", keep=8, layer=2):
            inputs = _inputs(tiny.processor(), seed=9)
            model(**inputs)
    with pytest.raises(ValueError, match="ratio"):
        vlmcut.prune(model, "pdrop", keep=8, ratio=1.5)


@pytest.mark.parametrize(("method", "options"), LLM_METHODS)
def test_row_without_an_image_decodes_as_alone(proc, method, options) -> None:
    """A left-padded batch where one row has no image: both rows decode what they decode alone (transformers
    5.24 hands the decoder its cache as ``cache=``; reading only ``past_key_values`` broke exactly this)."""
    model = tiny.llava(seed=5, text_layers=TEXT_LAYERS)
    prompts = ["USER: <image> what is in the image ? ASSISTANT:", "USER: say something short ? ASSISTANT:"]
    inputs = _inputs(proc, prompts, seed=5)
    # a random model may emit <image>, which a re-fed prompt (no cache) would then count as an image
    suppress = [model.config.image_token_id]
    kwargs = {"max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False, "suppress_tokens": suppress}
    with torch.no_grad(), vlmcut.prune(model, method, keep=12, **options) as h:
        batch = model.generate(**inputs, **kwargs)
        assert h.llm_record.kept_positions  # the image row was pruned in the decoder
        alone_image = model.generate(**_inputs(proc, prompts[:1], seed=5), **kwargs)
        text = proc(text=prompts[1:], return_tensors="pt")
        alone_text = model.generate(**text, **kwargs)
        uncached = model.generate(**inputs, use_cache=False, **kwargs)
    assert torch.equal(batch, uncached)
    width = inputs["input_ids"].shape[1]
    assert torch.equal(batch[0, width:], alone_image[0, alone_image.shape[1] - 6 :])
    assert torch.equal(batch[1, width:], alone_text[0, alone_text.shape[1] - 6 :])
