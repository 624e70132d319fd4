"""SparseVLM inside the language model, on tiny real LLaVA models (and hand-built contexts)."""

from __future__ import annotations

import math

import pytest
import tiny
import torch

import vlmcut
from vlmcut.methods.llm_base import LLMContext, LLMSelection
from vlmcut.methods.sparsevlm import (
    SparseVLMConfig,
    SparseVLMSelector,
    default_layers,
    dpc_knn,
    layer_average,
    rater_attention,
    recycle_split,
    schedule,
    select_raters,
    text_tokens,
)
from vlmcut.models.llava import LlavaAttachment

PROMPTS = ["USER: <image> what is in the image ? ASSISTANT:", "USER: <image> describe ? ASSISTANT:"]
TEXT_LAYERS = 6
N_VISUAL = tiny.GRID**2  # 64 placeholders per image


@pytest.fixture(scope="module")
def proc():
    return tiny.processor()


def _inputs(proc, prompts=PROMPTS, seed=0):
    n = sum(p.count("<image>") for p in prompts)
    return proc(images=tiny.images(n, seed), text=prompts, return_tensors="pt", padding=True)


def _visual_per_stage(handle, inputs, image_token_id):
    """Per stage: visual tokens alive in each row."""
    visual = inputs["input_ids"] == image_token_id
    out = []
    for kept in handle.llm_record.kept_positions:
        out.append([int(visual[r, kept[r][kept[r] >= 0]].sum()) for r in range(kept.shape[0])])
    return out


# ---------------------------------------------------------------------------------------------------
# Schedule and accounting
# ---------------------------------------------------------------------------------------------------


def test_recycle_split_reproduces_the_upstream_stage_sizes() -> None:
    # upstream's 192 budget: top-k 300 / 200 / 110 plus int(int(0.3 D) + 1) / 10) + 1 recycled tokens
    assert recycle_split(576, 309) == (300, 9)
    assert recycle_split(309, 204) == (200, 4)
    assert recycle_split(204, 113) == (110, 3)
    assert recycle_split(8, 4) == (3, 1)  # D = 5 dropped -> 2 candidates -> 1 cluster
    assert recycle_split(10, 10) == (10, 0)
    for n in (7, 64, 576):
        for c in range(1, n):
            top, rec = recycle_split(n, c)
            assert top + rec == c and top >= 1


def test_schedule_matches_the_average_and_the_paper_layers_scale() -> None:
    assert default_layers(32) == (2, 6, 15)  # the paper's layers on LLaVA-1.5-7B
    assert default_layers(6) == (0, 1, 2)
    counts = schedule(576, 32, (2, 6, 15), 192)
    assert counts == sorted(counts, reverse=True) and counts[0] < 576
    # integer counts: the average is the closest the last stage can make it
    assert abs(layer_average(576, 32, (2, 6, 15), counts) - 192) <= 16 / 32 / 2
    # hand check: one cut after layer 0 of 2 layers -> (8 + c) / 2 = 6 -> c = 4
    assert schedule(8, 2, (0,), 6) == [4]
    assert math.isclose(layer_average(8, 2, (0,), [4]), 6)
    with pytest.raises(ValueError, match="unreachable"):
        schedule(576, 32, (2, 6, 15), 50)  # layers 0..2 alone average 54


def test_exact_per_stage_counts_and_matched_average(proc) -> None:
    model = tiny.llava(seed=6, text_layers=TEXT_LAYERS)
    inputs = _inputs(proc, seed=6)
    keep = 24
    with torch.no_grad(), vlmcut.prune(model, "sparsevlm", keep=keep) as h:
        model(**inputs)
    layers = default_layers(TEXT_LAYERS)
    expected = schedule(N_VISUAL, TEXT_LAYERS, layers, keep)
    got = _visual_per_stage(h, inputs, model.config.image_token_id)
    assert got == [[c, c] for c in expected]
    assert abs(layer_average(N_VISUAL, TEXT_LAYERS, layers, expected) - keep) <= 0.5 * 3 / TEXT_LAYERS
    assert h.kept_indices.shape == (2, expected[-1])


def test_two_images_in_one_row_keep_the_same_count_each(proc) -> None:
    model = tiny.llava(seed=7, text_layers=TEXT_LAYERS)
    prompts = ["USER: <image> <image> what is in the image ? ASSISTANT:"]
    inputs = _inputs(proc, prompts=prompts, seed=7)
    with torch.no_grad(), vlmcut.prune(model, "sparsevlm", keep=28, layers=(1, 3)) as h:
        model(**inputs)
    expected = schedule(N_VISUAL, TEXT_LAYERS, (1, 3), 28)
    assert _visual_per_stage(h, inputs, model.config.image_token_id) == [[2 * c] for c in expected]
    assert h.kept_indices.shape == (2, expected[-1])


# ---------------------------------------------------------------------------------------------------
# Hand-checked selection
# ---------------------------------------------------------------------------------------------------


def _hand_context() -> LLMContext:
    """One row: [system, 8 visual (cols 1..8), text1, text2, query]; one head, d = 2, scale 1.

    Hidden states: visual = [1, a, b, 0], text1 = [5, 0, 0, 0] (the only text token relevant to the image),
    text2 = query = 0. The rater (text1) attends to key j with logit s_j (q = [1, 0], k_j = [s_j, 0]).
    """
    t = 12
    s = torch.tensor([0.0, 0.0, 4.0, 1.0, 3.0, 2.5, -1.0, 0.5, 2.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    q = torch.zeros(1, 1, t, 2, dtype=torch.float64)
    q[0, 0, 9, 0] = 1.0
    k = torch.zeros(1, 1, t, 2, dtype=torch.float64)
    k[0, 0, :, 0] = s
    hidden = torch.zeros(1, t, 4, dtype=torch.float64)
    hidden[0, 0, 3] = 1.0
    hidden[0, 1:9, 0] = 1.0
    hidden[0, 1:9, 1] = torch.arange(8, dtype=torch.float64)
    hidden[0, 1:9, 2] = torch.tensor([3.0, -1.0, 2.0, 0.0, 5.0, 1.0, -2.0, 4.0], dtype=torch.float64)
    hidden[0, 9, 0] = 5.0
    visual = torch.zeros(1, t, dtype=torch.bool)
    visual[0, 1:9] = True
    return LLMContext(
        layer=0,
        q=q,
        k=k,
        v=torch.zeros_like(k),
        scale=1.0,
        visual=visual,
        valid=torch.ones(1, t, dtype=torch.bool),
        query_index=torch.tensor([t - 1]),
        image_index=torch.where(visual, 0, -1),
        hidden=hidden,
    )


def test_raters_scores_and_recycled_token_hand_checked() -> None:
    ctx = _hand_context()
    text = text_tokens(ctx)
    assert text[0].nonzero().squeeze(1).tolist() == [9, 10, 11]
    raters = select_raters(ctx.hidden, ctx.visual, text, ctx.query_index)
    assert raters[0].nonzero().squeeze(1).tolist() == [9]  # relevance e^5 / (e^5 + 2) > 1/3
    scores = rater_attention(ctx, raters)
    expected = torch.softmax(ctx.k[0, 0, :10, 0], dim=0)  # rater at col 9 sees keys 0..9
    torch.testing.assert_close(scores[0, 1:9], expected[1:9])
    assert bool((scores[0, ~ctx.visual[0]] == 0).all())

    # 8 -> 4 tokens: top 3 by score (cols 2, 4, 5) + 1 recycled. Dropped by score: 8, 3, 7, 1, 6; the top
    # int(0.3 * 5) + 1 = 2 (cols 8, 3) form one cluster whose center is col 8 (tie -> the higher score).
    sel = SparseVLMSelector(SparseVLMConfig(keep=6, layers=(0,)))
    assert sel.prune_layers(2, 8) == [0]  # (8 + c) / 2 = 6 -> c = 4
    out = sel.select(ctx)
    assert isinstance(out, LLMSelection)
    assert out.keep[0].nonzero().squeeze(1).tolist() == [0, 2, 4, 5, 8, 9, 10, 11]
    merged = (ctx.hidden[0, 8] + ctx.hidden[0, 3]) / 2
    torch.testing.assert_close(out.hidden[0, 8], merged)
    changed = (out.hidden != ctx.hidden).any(dim=-1)[0]
    assert changed.nonzero().squeeze(1).tolist() == [8]

    off = SparseVLMSelector(SparseVLMConfig(keep=6, layers=(0,), recycle=False))
    off.prune_layers(2, 8)
    keep = off.select(ctx)
    assert isinstance(keep, torch.Tensor)
    assert keep[0].nonzero().squeeze(1).tolist() == [0, 2, 4, 5, 8, 9, 10, 11]  # top 4 (col 8 by score)


def test_dpc_knn_two_clusters_hand_checked() -> None:
    # a tight triangle and a looser pair: densities e^-0.25 (x3) and e^-1 (x2) with k = 2
    x = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [10.0, 0.0], [10.0, 2.0]], dtype=torch.float64)
    centers, assign = dpc_knn(x, 2)
    assert centers.tolist() == [0, 3]  # the densest point, then the pair's point farthest from denser ones
    assert assign.tolist() == [0, 0, 0, 1, 1]


# ---------------------------------------------------------------------------------------------------
# On the model
# ---------------------------------------------------------------------------------------------------


def test_identity_when_keeping_everything_and_after_remove(proc) -> None:
    model = tiny.llava(seed=1, text_layers=TEXT_LAYERS)
    inputs = _inputs(proc, seed=1)
    with torch.no_grad():
        base = model(**inputs).logits
        with vlmcut.prune(model, "sparsevlm", keep=N_VISUAL):
            same = model(**inputs).logits
        with vlmcut.prune(model, "sparsevlm", keep=24) as h:
            pruned = model(**inputs).logits
        after = model(**inputs).logits
    assert torch.equal(same, base)
    assert torch.equal(after, base)
    assert not h.active
    assert pruned.shape == base.shape
    assert not torch.allclose(pruned[:, -1], base[:, -1], atol=1e-4)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_generate_with_cache_equals_without_cache(proc, attn) -> None:
    model = tiny.llava(seed=3, attn=attn, text_layers=TEXT_LAYERS)
    inputs = _inputs(proc, seed=3)
    assert bool((inputs["attention_mask"][:, 0] == 0).any())  # really left-padded
    kwargs = {"max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False}
    with torch.no_grad(), vlmcut.prune(model, "sparsevlm", keep=24):
        cached = model.generate(**inputs, **kwargs)
        uncached = model.generate(**inputs, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])


def test_batch_rows_equal_single_rows(proc) -> None:
    model = tiny.llava(seed=4, text_layers=TEXT_LAYERS)
    inputs = _inputs(proc, seed=4)
    images = tiny.images(2, 4)
    with torch.no_grad(), vlmcut.prune(model, "sparsevlm", keep=24):
        batch = model(**inputs).logits[:, -1]
        for r in range(2):
            one = proc(images=images[r : r + 1], text=PROMPTS[r : r + 1], return_tensors="pt")
            torch.testing.assert_close(model(**one).logits[:, -1], batch[r : r + 1], atol=1e-5, rtol=1e-5)


class _Recording:
    """Wraps a selector and keeps what it returned."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.returned: list = []

    def prune_layers(self, num_layers, num_visual):
        return self.inner.prune_layers(num_layers, num_visual)

    def select(self, ctx):
        out = self.inner.select(ctx)
        self.returned.append(out)
        return out


def test_recycled_tokens_equal_the_unpruned_model_with_rewritten_and_masked_tokens(proc) -> None:
    """Oracle: one cut after layer 1 == the unpruned model whose layer-1 output carries the recycled hidden
    states and whose later layers cannot see the dropped tokens."""
    model = tiny.llava(seed=5, attn="eager", text_layers=TEXT_LAYERS)
    inputs = _inputs(proc, prompts=PROMPTS[:1], seed=5)
    rec = _Recording(SparseVLMSelector(SparseVLMConfig(keep=24, layers=(1,))))
    with torch.no_grad():
        attachment = LlavaAttachment(model, lambda k: None, 24, lambda k: rec)
        try:
            pruned = model(**inputs).logits[:, -1]
        finally:
            attachment.remove()
        (sel,) = rec.returned
        assert isinstance(sel, LLMSelection)
        dropped = ~sel.keep[0]
        assert int(dropped.sum()) == N_VISUAL - schedule(N_VISUAL, TEXT_LAYERS, (1,), 24)[0]

        def rewrite(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            return (sel.hidden, *output[1:]) if isinstance(output, tuple) else sel.hidden.to(hidden.dtype)

        mask_dropped = tiny.mask_keys_hook(dropped)

        layers = model.model.language_model.layers
        handles = [layers[1].register_forward_hook(rewrite)]
        handles += [layer.register_forward_pre_hook(mask_dropped, with_kwargs=True) for layer in layers[2:]]
        try:
            oracle = model(**inputs).logits[:, -1]
        finally:
            for hd in handles:
                hd.remove()
    torch.testing.assert_close(pruned, oracle, atol=1e-5, rtol=1e-5)


def test_engine_refuses_rewritten_text_tokens(proc) -> None:
    class Bad:
        def prune_layers(self, num_layers, num_visual):
            return [1]

        def select(self, ctx):
            return LLMSelection(torch.ones_like(ctx.visual), ctx.hidden + 1)

    model = tiny.llava(seed=9, text_layers=TEXT_LAYERS)
    attachment = LlavaAttachment(model, lambda k: None, 24, lambda k: Bad())
    try:
        with torch.no_grad(), pytest.raises(RuntimeError, match="rewrote non-visual"):
            model(**_inputs(proc, seed=9))
    finally:
        attachment.remove()


def test_errors_are_actionable(proc) -> None:
    model = tiny.llava(seed=9, text_layers=TEXT_LAYERS)
    inputs = _inputs(proc, seed=9)
    with (
        pytest.raises(ValueError, match="unreachable"),
        vlmcut.prune(model, "sparsevlm", keep=12, layers=(3, 4)),
    ):
        model(**inputs)
    with (
        pytest.raises(ValueError, match="must be <="),
        vlmcut.prune(model, "sparsevlm", keep=12, layers=(5,)),
    ):
        model(**inputs)
    with pytest.raises(ValueError, match="strictly increasing"):
        vlmcut.prune(model, "sparsevlm", keep=12, layers=(2, 2))
    with pytest.raises(ValueError, match="cluster_ratio"):
        vlmcut.prune(model, "sparsevlm", keep=12, cluster_ratio=1.0)
