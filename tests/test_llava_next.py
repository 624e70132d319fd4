"""FlowCut and the reference methods on LlavaNextForConditionalGeneration ("anyres"): per-crop pruning,
the unpruned model's layout (unpadding, newline per row) for the survivors, placeholders, generate."""

from __future__ import annotations

import numpy as np
import pytest
import tiny
import torch
from PIL import Image
from transformers import (
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextModel,
    LlavaNextProcessor,
)
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

import vlmcut
from vlmcut.compat import image_features
from vlmcut.methods.flowcut import FlowCutConfig, FlowCutSelector
from vlmcut.models.llava_next import LlavaNextAttachment, crop_budgets

S = tiny.IMAGE  # 56 px tiles of 8 x 8 = 64 patches
N = tiny.GRID**2
PINPOINTS = [[S, 2 * S], [2 * S, S], [2 * S, 2 * S]]
# (height, width): 1 x 2 tiles unpadded to 6 of 8 rows; 2 x 2 tiles unpadded to 10 of 16 columns;
# 1 x 2 tiles with no unpadding (exactly the tile grid's aspect ratio).
SIZES = [(30, 90), (100, 60), (56, 112)]
PROMPTS = ["USER: <image> what is in the image ? ASSISTANT:", "USER: <image> describe ? ASSISTANT:"]


def processor() -> LlavaNextProcessor:
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": S},
        crop_size={"height": S, "width": S},
        image_grid_pinpoints=PINPOINTS,
        do_convert_rgb=True,
    )
    return LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tiny.tokenizer(),
        patch_size=tiny.PATCH,
        vision_feature_select_strategy="default",
        image_token="<image>",
        num_additional_image_tokens=1,
    )


def llava_next(
    seed: int = 0, attn: str = "sdpa", dtype=torch.float32, text_layers: int = 4
) -> LlavaNextForConditionalGeneration:
    tok = tiny.tokenizer()
    torch.manual_seed(seed)
    text = tiny.llama_config(tok, text_layers, max_position_embeddings=1024)
    cfg = LlavaNextConfig(
        vision_config=tiny.clip_config(4, attn).to_dict(),
        text_config=text.to_dict(),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=PINPOINTS,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    cfg._attn_implementation = attn
    model = LlavaNextForConditionalGeneration(cfg)
    tiny.sharpen(model.model.vision_tower)
    model.generation_config.pad_token_id = tok.pad_token_id
    return model.to(dtype).eval()


def images(sizes, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def _inputs(proc, prompts=PROMPTS, sizes=SIZES[:2], seed=0):
    return proc(images=images(sizes, seed), text=prompts, return_tensors="pt", padding=True)


@pytest.fixture(scope="module")
def proc():
    return processor()


def _crops(inputs) -> torch.Tensor:
    """The tower batch: every image's crops, base first, as the model concatenates them."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    n = [image_size_to_num_patches(s, PINPOINTS, S) for s in inputs["image_sizes"]]
    return torch.cat([pv[:k] for pv, k in zip(inputs["pixel_values"], n, strict=True)]), n


def _unpruned_origins(model, inputs) -> list[torch.Tensor]:
    """The unpruned layout by transformers' own pack_image_features, fed (crop, patch) as features."""
    _, n = _crops(inputs)
    codes = [
        torch.stack(torch.meshgrid(torch.arange(k), torch.arange(N), indexing="ij"), dim=-1).double()
        for k in n
    ]
    packed, _ = model.model.pack_image_features(
        codes, inputs["image_sizes"], "default", image_newline=torch.tensor([-1.0, -1.0])
    )
    return [p.long() for p in packed]


def _oracle_features(model, inputs, kept: torch.Tensor, crop_feats: torch.Tensor) -> list[torch.Tensor]:
    """transformers' own packing of the pruned tower's features put back on their crops' grids (NaN where
    dropped), with the dropped positions then removed (newlines stay)."""
    _, n = _crops(inputs)
    full = torch.full((kept.shape[0], N, crop_feats.shape[-1]), float("nan"), dtype=crop_feats.dtype)
    full.scatter_(1, kept.unsqueeze(-1).expand(-1, -1, crop_feats.shape[-1]), crop_feats)
    packed, _ = model.model.pack_image_features(
        list(torch.split(full, n)), inputs["image_sizes"], "default", image_newline=model.model.image_newline
    )
    origins = _unpruned_origins(model, inputs)
    out = []
    start = 0
    for p, o, k in zip(packed, origins, n, strict=True):
        alive = torch.zeros(k, N, dtype=torch.bool)
        for c in range(k):
            alive[c, kept[start + c]] = True
        start += k
        is_nl = o[:, 0] < 0
        keep = is_nl | alive[o[:, 0].clamp(min=0), o[:, 1].clamp(min=0)]
        out.append((p[keep], o[keep]))
    return out


def _compact_prompt(proc, prompts, lengths):
    """The prompt an unpruned model would need for ``lengths`` features per image (in order)."""
    it = iter(lengths)
    texts = []
    for p in prompts:
        parts = p.split("<image>")
        texts.append(parts[0] + "".join(" ".join(["<image>"] * next(it)) + part for part in parts[1:]))
    return proc.tokenizer(texts, return_tensors="pt", padding=True)


# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["flowcut", "random"])
def test_keep_all_is_exact_identity(proc, method) -> None:
    model = llava_next()
    inputs = _inputs(proc)
    with torch.no_grad():
        ref = model(**inputs).logits
        ref_gen = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        with vlmcut.prune(model, method, keep=10 * 5 * N) as h:
            out = model(**inputs).logits
            gen = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert torch.equal(out, ref)
    assert torch.equal(gen, ref_gen)
    assert h.kept_indices.shape == (3 + 5, N)


def test_counts_and_budgets(proc) -> None:
    """FlowCut keeps K/2 per crop; every unpadded row keeps its newline; the prompt has exactly that many."""
    keep = 16
    model = llava_next(seed=1)
    inputs = _inputs(proc, seed=1)
    with torch.no_grad(), vlmcut.prune(model, "flowcut", keep=keep) as h:
        out = model(**inputs)
        att = h._attachment
        rec = att.pass_record
        pos = att.visual_positions
    assert att.keep_crop == keep // 2 and rec.budgets == [keep // 2] * 8
    assert h.kept_indices.shape == (8, keep // 2)
    assert torch.equal(rec.crop_image, torch.tensor([0, 0, 0, 1, 1, 1, 1, 1]))
    unpruned = _unpruned_origins(model, inputs)
    lengths = []
    for im, full in zip(rec.images, unpruned, strict=True):
        rows = int((full[:, 0] < 0).sum())
        assert int(im.is_newline.sum()) == rows  # one newline per unpadded row, kept or not
        assert im.unpruned_length == len(full)
        in_full = {tuple(x) for x in full.tolist()}
        content = [tuple(x) for x in im.origin[~im.is_newline].tolist()]
        assert all(c in in_full for c in content)  # nothing from the unpadded-away area
        assert im.num_content <= keep // 2 * (3 if len(full) < 200 else 5)
        lengths.append(im.length)
    assert rows == 16  # the 2 x 2 grid: 16 rows, 10 columns after unpadding
    assert [int((unpruned[0][:, 0] < 0).sum())] == [6]  # 1 x 2 grid: 6 rows of 8
    # exactly `length` placeholders per image reach the language model
    assert image_features(out).shape[0] == sum(lengths)
    assert pos.visual.sum(dim=1).tolist() == lengths
    assert pos.prunable.sum(dim=1).tolist() == [im.num_content for im in rec.images]
    assert pos.target.tolist() == [min(keep, im.num_content) for im in rec.images]


@pytest.mark.parametrize("method", ["random", "grid"])
def test_single_stage_budgets_sum_to_keep(proc, method) -> None:
    keep = 23
    model = llava_next(seed=2)
    inputs = _inputs(proc, sizes=[SIZES[2], SIZES[1]], seed=2)
    with torch.no_grad(), vlmcut.prune(model, method, keep=keep) as h:
        model(**inputs)
        rec = h._attachment.pass_record
    # 3 crops: 8 8 7; 5 crops: 5 5 5 4 4 (base crop first gets the remainder)
    assert rec.budgets == [8, 8, 7, 5, 5, 5, 4, 4]
    assert [len(k) for k in rec.kept_per_crop] == rec.budgets
    assert h.kept_indices.shape == (8, 8) and int((h.kept_indices[-1] == -1).sum()) == 4
    # no unpadding for the 56 x 112 image: exactly `keep` patch tokens reach the language model
    assert rec.images[0].num_content == keep
    assert rec.images[1].num_content <= keep
    assert crop_budgets([3, 5], 2, None, N) == [1, 1, 0, 1, 1, 0, 0, 0]


def test_layout_equals_unpruned_packing_of_the_kept_tokens(proc) -> None:
    """Oracle: transformers' own pack_image_features on the pruned tower's features placed back on their
    crops gives, restricted to the kept patches and every newline, exactly the features and order the
    pruned model feeds; and the pruned forward equals the unpruned model fed those features."""
    prompts = [
        "USER: <image><image> what is in the image ? ASSISTANT:",
        "USER: <image> describe ? ASSISTANT:",
    ]
    model = llava_next(seed=3)
    inputs = _inputs(proc, prompts, sizes=SIZES, seed=3)
    keep = 6  # 3 patches per crop: some rows of the tile maps lose every patch but keep their newline
    # the vision stage alone (FlowCut's tower stage, no decoder stage): its layout is what is checked here
    att = LlavaNextAttachment(model, lambda k: FlowCutSelector(FlowCutConfig(keep=k)), keep, two_stage=True)
    with torch.no_grad():
        try:
            out = model(**inputs)
            rec = att.pass_record
            pos = att.visual_positions
            # the pruned tower, run again by hand (same hooks, same selection)
            crops, _ = _crops(inputs)
            hidden = model.model.vision_tower(crops, output_hidden_states=True).hidden_states[-2][:, 1:]
            kept = att.record.kept_indices.clone()
            crop_feats = model.model.multi_modal_projector(hidden)
        finally:
            att.remove()
        oracle = _oracle_features(model, inputs, kept, crop_feats)
        lengths = [len(o[0]) for o in oracle]
        compact = _compact_prompt(proc, prompts, lengths)
        ref = model(
            input_ids=compact["input_ids"],
            attention_mask=compact["attention_mask"],
            mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=[o[0] for o in oracle])},
        ).logits
    assert kept.shape == (3 + 5 + 3, keep // 2)
    for im, (feats, origin) in zip(rec.images, oracle, strict=True):
        assert torch.equal(im.origin, origin)
        assert torch.equal(im.features, feats)
        assert not bool(torch.isnan(im.features).any())
    emptied = sum(int((im.is_newline[1:] & im.is_newline[:-1]).sum()) for im in rec.images)
    assert emptied > 0
    torch.testing.assert_close(image_features(out), torch.cat([o[0] for o in oracle]))
    assert out.logits.shape == ref.shape
    mask = compact["attention_mask"].bool()
    torch.testing.assert_close(out.logits[mask], ref[mask], rtol=1e-5, atol=1e-5)
    # positions for the LLM stage: row 0 holds images 0 and 1, row 1 image 2; newlines not prunable
    assert pos.image_index[0][pos.visual[0]].unique().tolist() == [0, 1]
    assert pos.image_index[1][pos.visual[1]].unique().tolist() == [2]
    nl = pos.visual & ~pos.prunable
    assert bool((pos.origin[nl] == -1).all()) and bool((pos.origin[pos.prunable] >= 0).all())
    dec = pos.decoder_inputs()
    assert dec["image_index"][0][dec["visual"][0]].unique().tolist() == [0, 1]
    assert dec["image_index"][1][dec["visual"][1]].unique().tolist() == [0]
    assert dec["query_index"].tolist() == [compact["input_ids"].shape[1] - 1] * 2  # left padding


class _RecordingStage:
    """Stands in for the language-model stage: records what the attachment announces."""

    def __init__(self) -> None:
        self.calls: list[dict[str, torch.Tensor]] = []
        self.removed = False

    def begin(self, visual, valid, query_index, image_index) -> None:
        self.calls.append(
            {"visual": visual, "valid": valid, "query_index": query_index, "image_index": image_index}
        )

    def remove(self) -> None:
        self.removed = True


@pytest.mark.parametrize("method", ["flowcut", "grid"])
def test_generate_left_padded_batch_of_two_sizes(proc, method) -> None:
    model = llava_next(seed=4)
    inputs = _inputs(proc, seed=4)
    assert bool((inputs["attention_mask"][:, 0] == 0).any())  # really left-padded
    assert inputs["image_sizes"].tolist() == [list(s) for s in SIZES[:2]]
    with torch.no_grad(), vlmcut.prune(model, method, keep=12) as h:
        gen = model.generate(**inputs, max_new_tokens=5, do_sample=False, min_new_tokens=5)
        prefill_positions = h._attachment.visual_positions  # the last forward: a decode step, no images
        ref = tiny.greedy_without_cache(model, inputs, 5)
    n = inputs["input_ids"].shape[1]
    assert torch.equal(gen[:, :n], inputs["input_ids"])  # the prompt part is the caller's
    assert torch.equal(gen, ref)
    assert prefill_positions is None


def test_generate_announces_prefill_to_the_llm_stage(proc) -> None:
    model = llava_next(seed=5)
    inputs = _inputs(proc, seed=5)
    stage = _RecordingStage()
    att = LlavaNextAttachment(
        model,
        lambda k: FlowCutSelector(FlowCutConfig(keep=k)),
        12,
        two_stage=True,
        make_llm_stage=lambda lm: stage,
    )
    try:
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    finally:
        att.remove()
    assert stage.removed and len(stage.calls) == 1  # prefill only
    call = stage.calls[0]
    lengths = [im.num_content for im in att.pass_record.images]
    assert call["visual"].sum(dim=1).tolist() == lengths
    assert call["image_index"][call["visual"]].unique().tolist() == [0]
    assert out.sequences.shape[1] == inputs["input_ids"].shape[1] + 3


def test_llava_next_model_and_max_length(proc) -> None:
    model = llava_next(seed=6)
    inputs = _inputs(proc, seed=6)
    n = inputs["input_ids"].shape[1]
    with torch.no_grad(), vlmcut.prune(model, "flowcut", keep=10):
        out = model.generate(**inputs, max_length=n + 3, min_length=n + 3, do_sample=False)
    assert out.shape == (2, n + 3)
    base = LlavaNextModel(model.config).eval()
    with torch.no_grad(), vlmcut.prune(base, "random", keep=10) as h:
        hidden = base(**inputs).last_hidden_state
    assert hidden.shape[1] < n and h.kept_indices.shape[0] == 8


def test_labels_and_training_step(proc) -> None:
    model = llava_next(seed=7)
    inputs = _inputs(proc, seed=7)
    labels = inputs["input_ids"].clone()
    labels[inputs["attention_mask"] == 0] = -100
    labels[labels == model.config.image_token_id] = -100
    with vlmcut.prune(model, "flowcut", keep=10):
        model.train()
        out = model(**inputs, labels=labels)
        out.loss.backward()
    assert bool(torch.isfinite(out.loss))
    assert model.model.image_newline.grad is not None and model.model.image_newline.grad.abs().sum() > 0
    tower = [p.grad for n, p in model.named_parameters() if "vision_tower" in n and "layers.0." in n]
    assert any(g is not None and g.abs().sum() > 0 for g in tower)


def test_remove_restores_model_and_generate(proc) -> None:
    model = llava_next(seed=8)
    inputs = _inputs(proc, seed=8)

    def hooks():  # transformers installs its own output-capturing hooks lazily on the first forward
        return {n: (dict(m._forward_pre_hooks), dict(m._forward_hooks)) for n, m in model.named_modules()}

    with torch.no_grad():
        ref = model(**inputs).logits
        before = hooks()
        handle = vlmcut.prune(model, "flowcut", keep=10)
        assert "generate" in vars(model)
        assert model(**inputs).logits.shape[1] < ref.shape[1]
        handle.remove()
        assert "generate" not in vars(model)
        assert hooks() == before
        assert torch.equal(model(**inputs).logits, ref)
    assert handle.kept_indices.shape == (8, 5)


def test_error_cases(proc) -> None:
    model = llava_next()
    inputs = _inputs(proc)
    with pytest.raises(ValueError, match="vision_feature_layer"):
        vlmcut.prune(model, "flowcut", keep=8, feature_layer=-2)
    with vlmcut.prune(model, "flowcut", keep=8), torch.no_grad():
        ids = inputs["input_ids"].clone()
        ids[0, (ids[0] == model.config.image_token_id).nonzero()[0]] = 5
        with pytest.raises(ValueError, match="placeholder"):
            model(**{**inputs, "input_ids": ids})
        with pytest.raises(ValueError, match="image_sizes"):
            model(**{k: v for k, v in inputs.items() if k != "image_sizes"})
        with pytest.raises(ValueError, match="vision_feature_select_strategy"):
            model(**inputs, vision_feature_select_strategy="full")


@pytest.mark.parametrize(("method", "options"), [("flowcut", {}), ("fastv", {})])
def test_second_stage_in_the_decoder_brings_each_image_to_k(proc, method, options) -> None:
    """FlowCut: K/2 per crop in the tower, then K patch tokens per image after decoder layer 1 (SPEC);
    FastV: every crop whole, K per image after layer 1. Newlines stay. Cached decoding is exact."""
    keep = 12
    model = llava_next(seed=8, text_layers=4)
    inputs = _inputs(proc, seed=8)
    with torch.no_grad(), vlmcut.prune(model, method, keep=keep, **options) as h:
        model(**inputs)
        positions = h._attachment.visual_positions
        kept = h.llm_record.kept_positions
        cached = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        assert h.llm_record.kept_positions  # generate's prefill really pruned in the decoder
        uncached = model.generate(
            **inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False, use_cache=False
        )
        assert h.llm_record.kept_positions
    assert len(kept) == 1  # one decoder stage
    for r in range(2):
        cols = kept[0][r][kept[0][r] >= 0]
        alive = positions.prunable[r, cols]
        assert int(alive.sum()) == min(keep, int(positions.prunable[r].sum()))
        # every newline (visual but not prunable) survives
        newlines = positions.visual[r] & ~positions.prunable[r]
        assert bool(torch.isin(newlines.nonzero().flatten(), cols).all())
    assert torch.equal(cached, uncached)
    assert torch.equal(cached[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
