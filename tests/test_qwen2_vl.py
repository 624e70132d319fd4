"""FlowCut and the LLM-stage methods on tiny Qwen2-VL / Qwen2.5-VL: whole 2x2 merge units in the tower,
M-RoPE positions of the kept tokens, batches of different image sizes, several images per prompt, videos,
generate with and without a cache, remove()."""

from __future__ import annotations

import pytest
import tiny
import tiny_qwen as tq
import torch
from transformers import Qwen2VLModel
from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

import vlmcut
from vlmcut.models.qwen2_vl import make_groups

BUILDERS = {"qwen2_vl": tq.qwen2_vl, "qwen2_5_vl": tq.qwen2_5_vl}
BIG, SMALL = (1, 8, 8), (1, 4, 8)  # 16 and 8 merged tokens
GEN = {"max_new_tokens": 4, "do_sample": False, "suppress_tokens": tq.SUPPRESS}


def _batch(seed: int = 0):
    """Two rows of different lengths (left padding) and images of two sizes; row 1 holds two images."""
    return tq.prompt_inputs([[3, "image", 4, 5], ["image", 6, "image", 7]], [BIG, SMALL, BIG], seed=seed)


def _lm_inputs(model):
    """Records what the language model receives (the compacted prompt) on every call."""
    calls = []

    def hook(module, args, kwargs):
        calls.append(
            {
                "pos": kwargs.get("position_ids"),
                "embeds": kwargs.get("inputs_embeds"),
                "mask": kwargs.get("attention_mask"),
            }
        )

    return calls, model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("arch", BUILDERS)
@pytest.mark.parametrize("method", ["flowcut", "fastv"])
def test_keep_all_is_exact_identity(arch, method) -> None:
    model = BUILDERS[arch]()
    inputs = _batch()
    with torch.no_grad():
        ref = model(**inputs).logits
        ref_gen = model.generate(**inputs, **GEN)
        with vlmcut.prune(model, method, keep=16) as h:
            out = model(**inputs).logits
            gen = model.generate(**inputs, **GEN)
    assert torch.equal(out, ref)
    assert torch.equal(gen, ref_gen)
    assert h.kept_indices.shape == (3, 16)
    assert h.kept_indices[1].tolist() == list(range(8)) + [-1] * 8  # the small image, whole


@pytest.mark.parametrize("arch", BUILDERS)
@pytest.mark.parametrize(
    ("keep", "targets"),
    [(3, [3, 3, 3]), (0.25, [4, 2, 4]), (10, [10, 8, 10])],  # int; ratio; int above the small image's 8
)
def test_counts_two_stage(arch, keep, targets) -> None:
    """FlowCut: 2 K_i merge units per image in the tower, K_i per image after decoder layer 1."""
    model = BUILDERS[arch](seed=1)
    inputs = _batch(seed=1)
    calls, hook = _lm_inputs(model)
    try:
        with torch.no_grad(), vlmcut.prune(model, "flowcut", keep=keep) as h:
            model(**inputs)
            rec = h._attachment.pass_record
            kept = h.llm_record.kept_positions
    finally:
        hook.remove()
    sizes = [16, 8, 16]
    assert [g.target for g in rec.groups] == targets
    assert rec.budgets == [min(n, 2 * k) for n, k in zip(sizes, targets, strict=True)]
    assert [len(it.kept_units) for it in rec.items] == rec.budgets
    # the language model's prompt holds exactly the tower's survivors
    lm_visual = calls[0]["embeds"].shape[1]
    n_text = [int(inputs["attention_mask"][r].sum()) - n for r, n in enumerate([16, 8 + 16])]
    assert lm_visual == max(n_text[0] + rec.budgets[0], n_text[1] + rec.budgets[1] + rec.budgets[2])
    # after decoder layer 1: K_i visual tokens per image (fewer only where the tower kept fewer)
    assert len(kept) == (0 if all(b <= k for b, k in zip(rec.budgets, targets, strict=True)) else 1)
    if kept:
        for r, images in enumerate([[0], [1, 2]]):
            cols = kept[0][r][kept[0][r] >= 0]
            non_visual = lm_visual - sum(rec.budgets[i] for i in images)  # text and padding columns
            assert len(cols) - non_visual == sum(targets[i] for i in images)


@pytest.mark.parametrize("arch", BUILDERS)
@pytest.mark.parametrize(
    "budget", [{"keep": 3}, {"keep": "auto", "mass": 0.5, "min_keep": 2}], ids=["3", "auto"]
)
def test_kept_tokens_keep_their_unpruned_mrope_positions(arch, budget) -> None:
    """Oracle by formula: an image starting at text position s puts merged token (row y, column x) at
    (s, s + y, s + x); text after it continues at s + max(h', w'). Pruning must not renumber anything."""
    model = BUILDERS[arch](seed=2)
    inputs = _batch(seed=2)
    calls, hook = _lm_inputs(model)
    try:
        with torch.no_grad(), vlmcut.prune(model, "flowcut", **budget) as h:
            model(**inputs)
            items = h._attachment.pass_record.items
    finally:
        hook.remove()
    pos = calls[0]["pos"]  # (3, B, L')
    mask = calls[0]["mask"].bool()
    assert pos.shape[0] == 3
    image = 0
    for r in range(2):
        p = pos[:, r][:, mask[r]]  # (3, n) valid columns
        expected = []
        s = 0
        row = [[tq.BOS, 3, "image", 4, 5], [tq.BOS, "image", 6, "image", 7]][r]
        for x in row:
            if x != "image":
                expected += [[s, s, s]]
                s += 1
                continue
            expected += [[s, s, s]]  # <vision_start>
            s += 1
            _, hh, ww = items[image].grid_thw
            w2 = ww // 2
            for u in items[image].kept_units.tolist():
                expected += [[s, s + u // w2, s + u % w2]]
            s += max(hh, ww) // 2
            expected += [[s, s, s]]  # <vision_end>
            s += 1
            image += 1
        assert p.T.tolist() == expected
    # rope_deltas: the next token continues at the unpruned model's next position
    next_pos = (pos.amax(dim=(0, 2)) + 1).tolist()
    deltas = model.model.rope_deltas.flatten().tolist()
    assert [d + int(m.sum()) for d, m in zip(deltas, mask, strict=True)] == next_pos


@pytest.mark.parametrize("arch", BUILDERS)
def test_kept_vit_tokens_are_whole_2x2_merge_units(arch) -> None:
    model = BUILDERS[arch](seed=3)
    inputs = _batch(seed=3)
    with torch.no_grad(), vlmcut.prune(model, "flowcut", keep=2) as h:
        model(**inputs)
        items = h._attachment.pass_record.items
    hw = get_vision_position_ids(inputs["image_grid_thw"], 2)  # (tokens, 2) ViT (row, col) of each patch
    start = 0
    for it in items:
        n = it.grid_thw[0] * it.grid_thw[1] * it.grid_thw[2]
        own = hw[start : start + n]
        start += n
        toks = it.kept_tokens.view(-1, 4)
        assert len(toks) == 4  # 2 K merge units
        for group in toks:
            rows, cols = own[group, 0], own[group, 1]
            r0, c0 = int(rows.min()), int(cols.min())
            assert r0 % 2 == 0 and c0 % 2 == 0
            assert sorted(zip(rows.tolist(), cols.tolist(), strict=True)) == [
                (r0, c0),
                (r0, c0 + 1),
                (r0 + 1, c0),
                (r0 + 1, c0 + 1),
            ]


VARIANTS = {
    "qwen2_vl": lambda: tq.qwen2_vl(seed=4),
    "qwen2_5_vl": lambda: tq.qwen2_5_vl(seed=4),  # last block: full attention
}


def _windowed_last():
    model = tq.qwen2_5_vl(seed=4)
    model.model.visual.fullatt_block_indexes = [0, 2]  # on a fresh instance: the last block is windowed
    return model


VARIANTS["qwen2_5_vl_window_last"] = _windowed_last


@pytest.mark.parametrize("variant", VARIANTS)
def test_pruned_tower_equals_last_block_run_on_the_kept_tokens(variant) -> None:
    """Oracle for the tower metadata: FlowCut pruning once, at the output of block L-2, must equal the
    unpruned tower up to block L-2, then the last block run by hand on the kept tokens with their rotary
    embeddings and the kept tokens' frame (or window) boundaries, then the merger."""
    model = VARIANTS[variant]()
    visual = model.model.visual
    inputs = _batch(seed=4)
    grid = inputs["image_grid_thw"]
    with torch.no_grad(), vlmcut.prune(model, "flowcut", keep=3, prune_interval=10) as h:
        model(**inputs)
        items = h._attachment.pass_record.items
        assert h.tokens_per_layer == [40, 40, 18, 18]  # pruned once, after block 2: 3 images x 2K
    captured = {}
    handles = [
        visual.blocks[-2].register_forward_hook(lambda m, a, o: captured.__setitem__("hidden", o)),
        visual.blocks[-1].register_forward_pre_hook(
            lambda m, a, k: captured.__setitem__("pe", k["position_embeddings"]), with_kwargs=True
        ),
    ]
    try:
        with torch.no_grad():
            visual(inputs["pixel_values"], grid_thw=grid)
    finally:
        for hd in handles:
            hd.remove()
    windowed = hasattr(visual, "fullatt_block_indexes")
    total = sum(it.num_units for it in items)
    if windowed:
        order, cu_window = get_vision_window_index(grid, 2, visual.window_size, visual.patch_size)
    else:
        order, cu_window = torch.arange(total), None
    offsets = torch.tensor([0, 16, 24])
    raster = torch.cat([o + it.kept_units for o, it in zip(offsets, items, strict=True)])
    tower_units = torch.argsort(order)[raster].sort().values
    tokens = (tower_units[:, None] * 4 + torch.arange(4)).flatten()
    last_full = not windowed or (len(visual.blocks) - 1) in visual.fullatt_block_indexes
    if last_full:
        segment = torch.bucketize(order[tower_units], offsets[1:], right=True)  # image = frame here
    else:
        segment = torch.bucketize(tower_units * 4, cu_window[1:], right=True)
    counts = torch.unique_consecutive(segment, return_counts=True)[1]
    cu = torch.nn.functional.pad((counts * 4).cumsum(0), (1, 0)).int()
    cos, sin = captured["pe"]
    with torch.no_grad():
        out = visual.blocks[-1](
            captured["hidden"][tokens], cu_seqlens=cu, position_embeddings=(cos[tokens], sin[tokens])
        )
        merged = visual.merger(out)  # tower order of the kept units
    by_raster = dict(zip(order[tower_units].tolist(), merged, strict=True))
    expected = torch.stack([by_raster[int(u)] for u in raster])
    got = torch.cat([it.features for it in items])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", BUILDERS)
@pytest.mark.parametrize(
    ("method", "options"), [("flowcut", {}), ("fastv", {}), ("pdrop", {"layers": (1, 2), "ratio": 0.5})]
)
def test_generate_with_cache_equals_recomputing_the_pruned_prefix(arch, method, options) -> None:
    """Left-padded batch, images of two sizes, two images in one row. Cached decoding (fewer cached keys
    after the decoder stage, positions continued by generate) must give the logits of generate without a
    cache (the pruned prompt + new tokens recomputed at every step). FlowCut's decoder stage does not
    depend on the query token, so for it the plain forward on prompt + new tokens (positions from the
    unpruned prompt's M-RoPE) is a second, independent reference."""
    model = BUILDERS[arch](seed=5)
    inputs = _batch(seed=5)
    assert bool((inputs["attention_mask"][:, 0] == 0).any())
    kw = {**GEN, "return_dict_in_generate": True, "output_logits": True}
    with torch.no_grad(), vlmcut.prune(model, method, keep=3, **options) as h:
        cached = model.generate(**inputs, **kw)
        assert h.llm_record.kept_positions  # generate's prefill really pruned in the decoder
        uncached = model.generate(**inputs, **kw, use_cache=False)
        assert h.llm_record.kept_positions
        forward_ref = tq.greedy_without_cache(model, inputs, 4)
        n = inputs["input_ids"].shape[1]
        forward_logits = []
        for step in range(4):
            seq = cached.sequences[:, : n + step]
            extra = {
                k: v
                for k, v in inputs.items()
                if k not in ("input_ids", "attention_mask", "mm_token_type_ids")
            }
            new = torch.ones_like(seq[:, n:])
            forward_logits.append(
                model(
                    input_ids=seq,
                    attention_mask=torch.cat([inputs["attention_mask"], new], 1),
                    mm_token_type_ids=torch.cat([inputs["mm_token_type_ids"], 0 * new.int()], 1),
                    use_cache=False,
                    **extra,
                ).logits[:, -1]
            )
    with torch.no_grad():
        unpruned = model(**inputs).logits[:, -1]
    assert torch.equal(cached.sequences, uncached.sequences)
    for a, b in zip(cached.logits, uncached.logits, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    if method == "flowcut":
        assert torch.equal(cached.sequences, forward_ref)
        for a, b in zip(cached.logits, forward_logits, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert torch.equal(cached.sequences[:, :n], inputs["input_ids"])
    assert not torch.allclose(cached.logits[0], unpruned, atol=1e-4)  # pruning changed something


@pytest.mark.parametrize("budget", ["per_frame", "shared"])
def test_video_budgets(budget) -> None:
    """A video of 3 temporal slots x 16 merged tokens and an image in one batch. per_frame: each slot keeps
    K // 3 (+1 for the first K % 3) in the end and twice that in the tower; shared: the video keeps K."""
    model = tq.qwen2_vl(seed=6)
    video = (3, 8, 8)
    inputs = tq.prompt_inputs([[3, "video", 4], ["image", 5, 6]], [SMALL], [video], seed=6)
    keep = 8
    with torch.no_grad(), vlmcut.prune(model, "flowcut", keep=keep, video_budget=budget) as h:
        model(**inputs)
        rec = h._attachment.pass_record
        kept = h.llm_record.kept_positions[0]
        compact_ids = h._attachment.compact_inputs(dict(inputs))[0]["input_ids"]  # what the LM got
        gen = model.generate(**inputs, **GEN)
        ref = tq.greedy_without_cache(model, inputs, 4)
    assert torch.equal(gen, ref)
    vid = rec.items[1]
    assert vid.kind == "video" and vid.num_units == 48
    per_slot = torch.bincount(vid.kept_units // 16, minlength=3).tolist()
    visual = compact_ids[0] == tq.VIDEO
    assert int(visual.sum()) == len(vid.kept_units)
    cols = kept[0][kept[0] >= 0]
    after_llm = int(visual[cols].sum())
    if budget == "per_frame":
        assert [g.target for g in rec.groups if g.item == 0 and g.frame >= 0] == [3, 3, 2]
        assert per_slot == [6, 6, 4]
        assert after_llm == keep
        slot_of_col = torch.full_like(visual, -1, dtype=torch.long)
        slot_of_col[visual] = vid.kept_units // 16
        assert torch.bincount(slot_of_col[cols][visual[cols]], minlength=3).tolist() == [3, 3, 2]
    else:
        assert [g.target for g in rec.groups] == [8, 8]  # the image, then the video as one group
        assert sum(per_slot) == 2 * keep
        assert after_llm == keep
    assert make_groups(torch.tensor([video]), 2, 2, True)[2].target == 1  # at least one per slot


def test_remove_restores_model_and_generate() -> None:
    model = tq.qwen2_5_vl(seed=7)
    inputs = _batch(seed=7)

    def hooks():
        return {n: (dict(m._forward_pre_hooks), dict(m._forward_hooks)) for n, m in model.named_modules()}

    with torch.no_grad():
        ref = model(**inputs).logits
        ref_gen = model.generate(**inputs, **GEN)
        before = hooks()
        handle = vlmcut.prune(model, "flowcut", keep=2)
        assert "generate" in vars(model)
        pruned = model(**inputs).logits
        assert not torch.allclose(pruned[:, -1], ref[:, -1], atol=1e-4)
        model.generate(**inputs, **GEN)
        handle.remove()
        assert "generate" not in vars(model)
        assert hooks() == before
        assert torch.equal(model(**inputs).logits, ref)
        assert torch.equal(model.generate(**inputs, **GEN), ref_gen)
    assert handle.kept_indices.shape == (3, 4)


def test_inner_model_class_and_sparsevlm() -> None:
    full = tq.qwen2_vl(seed=8, text_layers=4)
    base = Qwen2VLModel(full.config).eval()
    base.load_state_dict(full.model.state_dict())
    inputs = _batch(seed=8)
    with torch.no_grad(), vlmcut.prune(base, "flowcut", keep=3) as h:
        hidden = base(**inputs).last_hidden_state
    # the compacted prompt: 2 K = 6 placeholders per image instead of 16 / 8 / 16
    n_text = [int(m.sum()) - n for m, n in zip(inputs["attention_mask"], [16, 24], strict=True)]
    assert hidden.shape[1] == max(n_text[0] + 6, n_text[1] + 12) < inputs["input_ids"].shape[1]
    assert h.kept_indices.shape == (3, 6)
    with torch.no_grad(), vlmcut.prune(full, "sparsevlm", keep=10, layers=(0,)) as h:  # targets 10, 8, 10
        out = full(**inputs).logits
    assert bool(torch.isfinite(out[:, -1]).all()) and h.llm_record.kept_positions


def test_errors_are_actionable() -> None:
    model = tq.qwen2_vl()
    for bad in (0, -3, 0.0, -0.5):
        with pytest.raises(ValueError, match="keep"):
            vlmcut.prune(model, "flowcut", keep=bad)
    with pytest.raises(TypeError, match=r"ratio in \(0, 1\]"):
        vlmcut.prune(model, "flowcut", keep=1.5)
    with pytest.raises(TypeError, match="keep must be an int"):
        vlmcut.prune(model, "fastv", keep="64")
    with pytest.raises(
        ValueError, match="supported methods on Qwen2-VL .*: fastv, flowcut, pdrop, sparsevlm"
    ):
        vlmcut.prune(model, "grid", keep=4)
    with pytest.raises(ValueError, match="video_budget"):
        vlmcut.prune(model, "flowcut", keep=4, video_budget="per_second")
    with pytest.raises(ValueError, match="Qwen2-VL / Qwen2.5-VL only"):
        vlmcut.prune(tiny.llava(), "flowcut", keep=0.5)
    inputs = _batch()
    with vlmcut.prune(model, "flowcut", keep=4), torch.no_grad():
        ids = inputs["input_ids"].clone()
        ids[0, (ids[0] == tq.IMAGE).nonzero()[0]] = 5
        with pytest.raises(ValueError, match="placeholders"):
            model(**{**inputs, "input_ids": ids})
        with pytest.raises(ValueError, match="image_grid_thw"):
            model(**{k: v for k, v in inputs.items() if k != "image_grid_thw"})
