"""The quality frontier's pieces: resumable sweeps, paired intervals, processor padding, keep="auto"."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tiny
import torch
from PIL import Image
from transformers.modeling_outputs import BaseModelOutputWithPooling

import vlmcut
from vlmcut.eval.datasets import load_dataset
from vlmcut.eval.runner import EvalResult, markdown_table, pivot_table, sweep
from vlmcut.eval.stats import paired_bootstrap
from vlmcut.eval.store import ResultStore, cell_key, data_fingerprint
from vlmcut.methods.flowcut import FlowCutConfig, FlowCutSelector, mass_count
from vlmcut.models.prompt import placeholder_drop_mask
from vlmcut.models.vit import padding_patches

PROMPTS = ["USER: <image> what is in the image ? ASSISTANT:", "USER: <image> describe ? ASSISTANT:"]


@pytest.fixture(scope="module")
def proc():
    return tiny.processor()


# ---------------------------------------------------------------------------------------------------
# Paired bootstrap
# ---------------------------------------------------------------------------------------------------


def test_paired_bootstrap_by_construction() -> None:
    same = [1, 0, 1, 1, 0] * 20
    iv = paired_bootstrap(same, same)
    assert (iv.diff, iv.lo, iv.hi) == (0.0, 0.0, 0.0) and not iv.excludes_zero
    better = paired_bootstrap([1] * 100, [0] * 100)
    assert (better.diff, better.lo, better.hi) == (1.0, 1.0, 1.0) and better.excludes_zero
    # 10 wins, 0 losses on 200 questions: +5 points, the interval excludes 0 and lies inside [0, 10]
    a = [1] * 10 + [1, 0] * 95
    b = [0] * 10 + [1, 0] * 95
    iv = paired_bootstrap(a, b, seed=3)
    assert iv.diff == pytest.approx(0.05) and 0 < iv.lo < 0.05 < iv.hi <= 0.1
    assert iv.text() == f"+5.0 [{100 * iv.lo:+.1f}, {100 * iv.hi:+.1f}]"
    assert paired_bootstrap(a, b, seed=3) == iv  # seeded: the same interval every time


def test_pairing_is_narrower_than_independent_resampling() -> None:
    rng = np.random.default_rng(0)
    hard = rng.random(400) < 0.5  # what both methods get right is mostly the same questions
    a = hard.astype(int)
    b = a.copy()
    flip = rng.choice(400, 12, replace=False)
    b[flip] = 1 - b[flip]
    paired = paired_bootstrap(a, b)
    width_paired = paired.hi - paired.lo
    # the unpaired standard error of a difference of two ~50 % accuracies on 400 questions is ~3.5 points
    assert width_paired < 0.05


def test_paired_bootstrap_rejects_unpaired_input() -> None:
    with pytest.raises(ValueError, match="same questions"):
        paired_bootstrap([1, 0], [1, 0, 1])
    with pytest.raises(ValueError, match="no questions"):
        paired_bootstrap([], [])
    with pytest.raises(ValueError, match="n_boot"):
        paired_bootstrap([1], [0], n_boot=10)


# ---------------------------------------------------------------------------------------------------
# The resumable sweep
# ---------------------------------------------------------------------------------------------------


def test_sweep_resumes_and_refuses_a_store_of_other_questions(tmp_path, capsys) -> None:
    model = tiny.llava(seed=12, text_layers=4)
    proc = tiny.processor()
    samples = list(load_dataset("scenes", "validation", n=6, image_size=tiny.IMAGE))

    def run(data, **kwargs):
        return sweep(
            model,
            proc,
            data,
            ["flowcut", "pdrop"],
            keeps=(16, 4),
            batch_size=6,
            progress=False,
            out=tmp_path,
            **kwargs,
        )

    first = run({"scenes": samples}, model_id="tiny")
    path = tmp_path / "cells" / "scenes.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    # unpruned, flowcut@16, flowcut@4, pdrop@16, and pdrop@4 stored as skipped (unreachable budget)
    assert [r["cell"] for r in rows] == ["unpruned", "flowcut@16", "flowcut@4", "pdrop@16", "pdrop@4"]
    assert "skipped" in rows[-1] and "first stage" in rows[-1]["skipped"]
    assert all(len(r["correct"]) == 6 for r in rows[:-1])

    # A rerun with one more cell runs only that cell; the stored ones come back equal.
    again = run({"scenes": samples}, model_id="tiny", extra=[("flowcut", 8, {"padding": "compete"})])
    rows2 = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows2) == len(rows) + 1 and rows2[-1]["cell"] == "flowcut@8[padding=compete]"
    assert [(r.cell, r.answers) for r in again[: len(first)]] == [(r.cell, r.answers) for r in first]
    assert "5 cell(s) already in" in capsys.readouterr().err

    # Another model id, or other questions, in the same directory: refused, nothing mixed.
    with pytest.raises(ValueError, match="another model"):
        run({"scenes": samples}, model_id="other")
    with pytest.raises(ValueError, match="other questions"):
        run({"scenes": samples[:5]}, model_id="tiny")
    # A line cut short by a killed run is skipped with a warning; its cell runs again.
    with path.open("a") as fh:
        fh.write('{"cell": "grid@4", "fingerp')
    with pytest.warns(UserWarning, match="unreadable line"):
        store = ResultStore(tmp_path, "tiny")
        cells = store.load("scenes", data_fingerprint(samples))
    assert "grid@4" not in cells and "flowcut@16" in cells


def test_pivot_table_gives_paired_intervals_against_flowcut() -> None:
    def result(method, keep, correct):
        return EvalResult(
            "d",
            method,
            keep,
            len(correct),
            sum(correct) / len(correct),
            {"f": 0.5},
            ["x"] * len(correct),
            retention=1.0,
            correct=correct,
        )

    wins = [1] * 30 + [0] * 70
    results = [
        result("unpruned", None, [1] * 100),
        result("flowcut", 16, wins),
        result("grid", 16, [0] * 100),
        result("random", 16, wins),
    ]
    table = pivot_table(results)
    grid_row = next(line for line in table.splitlines() if line.startswith("| grid"))
    random_row = next(line for line in table.splitlines() if line.startswith("| random"))
    assert "-30.0 [" in grid_row and grid_row.endswith("]* |")  # the interval excludes 0
    assert "+0.0 [+0.0, +0.0] |" in random_row  # same answers: no difference, no star
    assert cell_key("flowcut", "auto", {"mass": 0.5}) == "flowcut@auto[mass=0.5]"


# ---------------------------------------------------------------------------------------------------
# Processor padding (FlowCut's padding="exclude")
# ---------------------------------------------------------------------------------------------------


def test_padding_patches_finds_the_processors_pad_to_square_bands() -> None:
    from transformers import LlavaImageProcessorPil

    processor = LlavaImageProcessorPil(
        do_pad=True,
        size={"shortest_edge": 56},
        crop_size={"height": 56, "width": 56},
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    rng = np.random.default_rng(0)
    wide = Image.fromarray(rng.integers(0, 256, (28, 56, 3), dtype=np.uint8))  # 2:1, padded above and below
    pixels = processor(images=wide, return_tensors="pt")["pixel_values"]
    pad = padding_patches(pixels, 7).reshape(8, 8)
    # 56 x 28 content centred in 56 x 56: rows 0-1 and 6-7 of the 8 x 8 patch grid are pure padding
    assert pad[[0, 1, 6, 7]].all() and not pad[2:6].any()
    square = processor(
        images=Image.fromarray(rng.integers(0, 256, (56, 56, 3), dtype=np.uint8)), return_tensors="pt"
    )["pixel_values"]
    assert not padding_patches(square, 7).any()


def _padded_inputs(proc, seed=0):
    """Two images whose top 3 patch rows are the processor's pad colour (0 after normalisation)."""
    inputs = proc(images=tiny.images(2, seed), text=PROMPTS, return_tensors="pt", padding=True)
    inputs["pixel_values"][:, :, : 3 * tiny.PATCH] = 0.0
    return inputs


def test_flowcut_excludes_processor_padding_and_is_unchanged_without_it(proc) -> None:
    model = tiny.llava(seed=3)
    padded = _padded_inputs(proc)
    n_pad = 3 * tiny.GRID  # 24 of 64 patches
    with torch.no_grad():
        for keep in (8, 40):
            with vlmcut.prune(model, "flowcut", keep=keep) as h:
                model(**padded)
                kept = h.kept_indices
            in_pad = (kept < n_pad).sum(dim=1)
            # keep 8: no padding kept; keep 40 > 40 real patches: all 40 real ones, no padding
            assert in_pad.tolist() == [0, 0]
        plain = proc(images=tiny.images(2, 5), text=PROMPTS, return_tensors="pt", padding=True)
        outs = {}
        for mode in ("exclude", "compete"):
            with vlmcut.prune(model, "flowcut", keep=8, padding=mode) as h:
                outs[mode] = (model(**plain).logits, h.kept_indices)
        assert torch.equal(outs["exclude"][1], outs["compete"][1])
        assert torch.equal(outs["exclude"][0], outs["compete"][0])
        # with more budget than real patches, padding fills the rest, the best-scored first
        with vlmcut.prune(model, "flowcut", keep=50) as h:
            model(**padded)
            assert ((h.kept_indices < n_pad).sum(dim=1) == 10).all()


def test_padding_exclusion_in_one_image_leaves_its_batch_neighbour_alone(proc) -> None:
    model = tiny.llava(seed=4)
    inputs = proc(images=tiny.images(2, 1), text=PROMPTS, return_tensors="pt", padding=True)
    inputs["pixel_values"][0, :, : 3 * tiny.PATCH] = 0.0  # only the first image is padded
    with torch.no_grad(), vlmcut.prune(model, "flowcut", keep=8) as h:
        model(**inputs)
        both = h.kept_indices
        single = proc(images=tiny.images(2, 1)[1:], text=PROMPTS[1:], return_tensors="pt")
        model(**single)
        alone = h.kept_indices
    assert (both[0] >= 3 * tiny.GRID).all()
    assert torch.equal(both[1], alone[0])


def test_padding_option_is_checked() -> None:
    with pytest.raises(ValueError, match="padding"):
        FlowCutConfig(keep=8, padding="drop")


# ---------------------------------------------------------------------------------------------------
# keep="auto"
# ---------------------------------------------------------------------------------------------------


def test_mass_count_by_hand() -> None:
    scores = torch.tensor([[4.0, 3.0, 2.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    assert mass_count(scores, 0.5).tolist() == [2, 2, 4]  # 7/10 >= 0.5 at two; 2/4 at two; no mass: all
    assert mass_count(scores, 0.71).tolist() == [3, 3, 4]
    exclude = torch.tensor([[True, False, False, False]] * 3)
    assert mass_count(scores, 0.5, exclude).tolist()[0] == 1  # 3 of the 6 left


def test_auto_selector_bounds() -> None:
    cfg = FlowCutConfig(keep="auto", mass=0.9, min_keep=3)
    sel = FlowCutSelector(cfg, keep=5)  # keep = max_keep
    sel.cumulative = torch.tensor([[10.0, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]])
    assert sel._auto_count(8) == 3  # the mass needs 1 token: raised to min_keep
    sel.cumulative = torch.ones(1, 8)
    assert sel._auto_count(8) == 5  # the mass needs 8: capped at max_keep


def _auto_oracle(model, proc, inputs, counts):
    """The unpruned model fed each image's kept features behind its own number of placeholders."""
    tok = proc.tokenizer
    prompts = [p.replace("<image>", " ".join(["<image>"] * c)) for p, c in zip(PROMPTS, counts, strict=True)]
    compact = tok(prompts, return_tensors="pt", padding=True)
    with vlmcut.prune(model, "flowcut", keep="auto", mass=0.6, min_keep=2):
        feats = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
    out = model(
        input_ids=compact["input_ids"],
        attention_mask=compact["attention_mask"],
        mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=feats)},
    )
    return out.logits, compact


def test_auto_keeps_a_count_per_image_and_equals_the_oracle(proc) -> None:
    model = tiny.llava(seed=9)
    inputs = proc(images=tiny.images(2, 7), text=PROMPTS, return_tensors="pt", padding=True)
    inputs["pixel_values"][1, :, :, 4 * tiny.PATCH :] *= 0.02  # a plainer second image
    with torch.no_grad():
        with vlmcut.prune(model, "flowcut", keep="auto", mass=0.6, min_keep=2) as h:
            logits = model(**inputs).logits
            counts = h.image_token_counts
            kept = h.kept_indices
            gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)
            nocache = tiny.greedy_without_cache(model, inputs, 3)
        ref, compact = _auto_oracle(model, proc, inputs, counts)
    assert len(counts) == 2 and counts[0] != counts[1] and all(2 <= c < 64 for c in counts)
    # the record: each image's kept positions, -1 after the shorter image's own
    assert [int((row >= 0).sum()) for row in kept] == counts
    assert logits.shape[1] == compact["input_ids"].shape[1]
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(gen, nocache)
    assert h.image_token_counts[:2] == counts and len(h.image_token_counts) >= 4  # after remove() too


def test_auto_counts_do_not_depend_on_the_batch(proc) -> None:
    model = tiny.llava(seed=8)
    imgs = tiny.images(3, 8)
    prompts = PROMPTS + PROMPTS[:1]
    with torch.no_grad(), vlmcut.prune(model, "flowcut", keep="auto", mass=0.5) as h:
        batch = proc(images=imgs, text=prompts, return_tensors="pt", padding=True)
        out = model.generate(**batch, max_new_tokens=3, do_sample=False)[:, -3:]
        together = h.image_token_counts
        alone = []
        for img, p, row in zip(imgs, prompts, out, strict=True):
            single = proc(images=[img], text=[p], return_tensors="pt")
            assert torch.equal(model.generate(**single, max_new_tokens=3, do_sample=False)[0, -3:], row)
        alone = h.image_token_counts[3:]
    assert together == alone


def _qwen_auto_batch(seed: int):
    """A 16-unit image, an 8-unit one and a plain (constant) 16-unit one, in two left-padded rows."""
    import tiny_qwen as tq

    inputs = tq.prompt_inputs(
        [[3, "image", 4], ["image", 6, "image", 7]], [(1, 8, 8), (1, 4, 8), (1, 8, 8)], seed=seed
    )
    plain = inputs["pixel_values"][-64:]
    plain.copy_(plain.mean(0, keepdim=True) + 0.01 * plain)  # nearly constant third image
    return inputs


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl"])
def test_auto_on_qwen_keeps_each_images_own_count(arch) -> None:
    """keep="auto" on Qwen: every image's count comes from its mass in the tower, within the bounds; the
    language model receives exactly those tokens (no second stage); cached generate = recomputing."""
    import tiny_qwen as tq

    model = getattr(tq, arch)(seed=4)
    inputs = _qwen_auto_batch(4)
    seen = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["inputs_embeds"].shape[1]), with_kwargs=True
    )
    gen = {"max_new_tokens": 3, "do_sample": False, "suppress_tokens": tq.SUPPRESS}
    try:
        with torch.no_grad():
            counts = {}
            for mass in (0.3, 0.6, 0.9):
                with vlmcut.prune(model, "flowcut", keep="auto", mass=mass, min_keep=2) as h:
                    model(**inputs)
                    counts[mass] = h.image_token_counts
                    lm_length = seen[-1]
                    items = h._attachment.pass_record.items
                    assert h.llm_record is None  # no language-model stage under auto
            with vlmcut.prune(model, "flowcut", keep="auto", mass=0.6, min_keep=2, max_keep=5) as h:
                model(**inputs)
                capped = h.image_token_counts
                cached = model.generate(**inputs, **gen)
                recomputed = tq.greedy_without_cache(model, inputs, 3)
    finally:
        hook.remove()
    sizes = [16, 8, 16]
    for c in counts.values():
        assert len(c) == 3 and all(2 <= k <= n for k, n in zip(c, sizes, strict=True))
    assert [len(it.kept_units) for it in items] == counts[0.9]
    # more mass, more tokens (per image); some image keeps fewer than all
    assert all(a <= b <= c for a, b, c in zip(counts[0.3], counts[0.6], counts[0.9], strict=True))
    assert counts[0.3] != counts[0.9] and min(k - n for k, n in zip(counts[0.3], sizes, strict=True)) < 0
    assert len(set(counts[0.6])) > 1  # the images chose different counts
    # the language model saw exactly the kept tokens: text columns + the counts of each row's images
    text = [int(inputs["attention_mask"][r].sum()) - n for r, n in enumerate([16, 8 + 16])]
    c = counts[0.9]
    assert lm_length == max(text[0] + c[0], text[1] + c[1] + c[2])
    assert all(2 <= k <= 5 for k in capped) and max(counts[0.6]) > 5
    assert torch.equal(cached, recomputed)


def test_auto_on_qwen_counts_do_not_depend_on_the_batch() -> None:
    import tiny_qwen as tq

    model = tq.qwen2_vl(seed=6)
    both = _qwen_auto_batch(6)
    row1 = tq.prompt_inputs([["image", 6, "image", 7]], [(1, 4, 8), (1, 8, 8)], seed=0)
    row1["pixel_values"] = both["pixel_values"][64:]  # the same two images as row 1 of the batch
    with torch.no_grad(), vlmcut.prune(model, "flowcut", keep="auto", mass=0.5, min_keep=2) as h:
        model(**both)
        together = h.image_token_counts
        feats = [it.features for it in h._attachment.pass_record.items]
        model(**row1)
        alone = h.image_token_counts[3:]
        feats_alone = [it.features for it in h._attachment.pass_record.items]
    assert together[1:] == alone
    for a, b in zip(feats[1:], feats_alone, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_auto_is_refused_where_counts_cannot_differ_and_checked() -> None:
    import test_llava_next as nxt

    with pytest.raises(ValueError, match="keep='auto'.*LLaVA-1.5 / Qwen2-VL"):
        vlmcut.prune(nxt.llava_next(seed=1), "flowcut", keep="auto")
    from tiny_qwen import qwen2_vl

    with pytest.raises(ValueError, match="'flowcut' only"):
        vlmcut.prune(qwen2_vl(), "fastv", keep="auto")
    with pytest.raises(ValueError, match="'flowcut' only"):
        vlmcut.prune(tiny.llava(), "visionzip", keep="auto")
    with pytest.raises(ValueError, match="keep='auto'"):
        FlowCutConfig(keep=64, mass=0.5)
    with pytest.raises(ValueError, match="max_keep"):
        FlowCutConfig(keep="auto", min_keep=16, max_keep=8)
    with pytest.raises(ValueError, match="mass"):
        FlowCutConfig(keep="auto", mass=1.5)


def test_placeholder_drop_mask_with_counts_per_image() -> None:
    img = 9
    ids = torch.tensor(
        [[1, img, img, img, img, 2, img, img, img, img], [0, 0, 0, 0, 0, 1, img, img, img, img]]
    )
    drop = placeholder_drop_mask(ids, img, 4, torch.tensor([1, 3, 2]))
    assert drop[0].tolist() == [False, False, True, True, True, False, False, False, False, True]
    assert drop[1].tolist() == [False] * 6 + [False, False, True, True]
    with pytest.raises(ValueError, match="one per image"):
        placeholder_drop_mask(ids, img, 4, torch.tensor([1, 2]))


# ---------------------------------------------------------------------------------------------------
# The non-square scenes
# ---------------------------------------------------------------------------------------------------


def test_wide_scenes_ask_the_same_questions_about_3_to_2_images() -> None:
    square = load_dataset("scenes", "test", n=12)
    wide = load_dataset("scenes-wide", "test", n=12)
    assert wide.name == "scenes-wide" and wide[0].image.size == (336, 224)
    assert [(s.question, s.answer) for s in wide] == [(s.question, s.answer) for s in square]
    # the square scene sits unchanged in the middle of the wider canvas
    assert np.array_equal(np.asarray(wide[0].image)[:, 56:280], np.asarray(square[0].image))


def test_frontier_report_tables() -> None:
    from vlmcut.eval.report import frontier_report

    def result(method, keep, correct, options=None, mean_tokens=None):
        return EvalResult(
            "d",
            method,
            keep,
            len(correct),
            sum(correct) / len(correct),
            {"color": 0.5},
            ["x"] * len(correct),
            retention=1.0,
            correct=correct,
            options=options or {},
            mean_tokens=mean_tokens if mean_tokens is not None else keep,
        )

    half = [1, 0] * 50
    results = [
        result("unpruned", None, [1] * 100),
        result("flowcut", 32, half),
        result("flowcut", 16, [0] * 100),
        result("flowcut", 32, [1] * 100, {"padding": "compete"}),
        result("flowcut", "auto", half, {"mass": 0.4}, mean_tokens=24.0),
    ]
    text = frontier_report(results, {"d": ["color", "shape"] * 50})
    assert "| d | 32 | flowcut | padding=compete | 50.0 | 100.0 | -50.0 [" in text
    auto_row = next(line for line in text.splitlines() if line.startswith("| mass=0.4"))
    # auto (24 tokens) vs fixed 32: same answers, 25 % fewer tokens; vs 16: +50 points, 50 % more tokens
    assert (
        "+0.0 [+0.0, +0.0], tokens -25%" in auto_row and "+50.0 [" in auto_row and "tokens +50%" in auto_row
    )
    assert "## Per question family" in text and "| 32 | flowcut (accuracy) | 100.0 | 0.0 |" in text
    table = markdown_table(results)
    assert (
        "| d | flowcut[padding=compete] | 32 |" in table
        and "| d | flowcut[mass=0.4] | auto (mean 24.0) |" in table
    )


def test_cli_report_rebuilds_every_table_from_stored_cells(tmp_path, capsys) -> None:
    from vlmcut.cli import main

    samples = list(load_dataset("scenes", "test", n=6))
    store = ResultStore(tmp_path, "zoo:x")
    fingerprint = data_fingerprint(samples)
    for method, keep, correct, options in (
        ("unpruned", None, [1] * 6, {}),
        ("flowcut", 16, [1, 1, 1, 0, 0, 0], {}),
        ("visionzip", 16, [1, 0, 0, 0, 0, 0], {}),
        ("flowcut", 16, [1, 1, 1, 1, 0, 0], {"padding": "compete"}),
    ):
        r = EvalResult(
            "scenes",
            method,
            keep,
            6,
            sum(correct) / 6,
            {"existence": 0.5},
            ["yes"] * 6,
            correct=correct,
            options=options,
            mean_tokens=keep,
        )
        store.append("scenes", r.row(fingerprint))
    store.append("scenes", {"cell": "pdrop@16", "fingerprint": fingerprint, "skipped": "unreachable"})
    assert main(["eval", "--report", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "frontier.md").read_text()
    assert "| visionzip | 16.7 -33.3 [" in text
    assert "## Per question family" in text and "## Option variants against the defaults" in text
    assert (tmp_path / "sweep.md").is_file() and "wrote" in capsys.readouterr().out
