"""FlowCut and the other methods on VideoLlavaForConditionalGeneration: images as in LLaVA-1.5, videos with a
per-frame or a shared budget, mixed batches, generate, remove()."""

from __future__ import annotations

import pytest
import tiny
import torch
from transformers import CLIPVisionConfig, VideoLlavaConfig, VideoLlavaForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutputWithPooling

import vlmcut
from vlmcut.compat import VIDEO_LLAVA_IMAGES_KWARG as IMAGES
from vlmcut.compat import image_features

IMAGE = 28
PATCH = 7
N = (IMAGE // PATCH) ** 2  # 16 patches per image / frame
FRAMES = 4
MIXED = ["USER: <image> <video> what is in the image ? ASSISTANT:", "USER: <video> describe ? ASSISTANT:"]


def tokenizer():
    tok = tiny.tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>", "<video>"]})
    return tok


TOK = tokenizer()


def video_llava(seed: int = 0, text_layers: int = 3, strategy: str = "default", attn: str = "sdpa"):
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        image_size=IMAGE,
        patch_size=PATCH,
    )
    cfg = VideoLlavaConfig(
        vision_config=vision.to_dict(),
        text_config=tiny.llama_config(TOK, text_layers).to_dict(),
        image_token_index=TOK.convert_tokens_to_ids("<image>"),
        video_token_index=TOK.convert_tokens_to_ids("<video>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy=strategy,
        image_seq_length=N,
        video_seq_length=FRAMES * (N + 1),
    )
    cfg._attn_implementation = attn
    model = VideoLlavaForConditionalGeneration(cfg)
    tiny.sharpen(model.model.image_tower)
    tiny.sharpen(model.model.video_tower)
    model.generation_config.pad_token_id = TOK.pad_token_id
    return model.eval()


def expand(prompts, image_block: int, video_block: int) -> list[str]:
    """What the Video-LLaVA processor writes: one placeholder per feature (a video: frames x (CLS + patches))."""
    return [
        p.replace("<image>", " ".join(["<image>"] * image_block)).replace(
            "<video>", " ".join(["<video>"] * video_block)
        )
        for p in prompts
    ]


def inputs_for(prompts, frames: int = FRAMES, seed: int = 0, image_block: int = N) -> dict:
    n_img = sum(p.count("<image>") for p in prompts)
    n_vid = sum(p.count("<video>") for p in prompts)
    enc = dict(TOK(expand(prompts, image_block, frames * (N + 1)), return_tensors="pt", padding=True))
    g = torch.Generator().manual_seed(seed)
    if n_img:
        enc[IMAGES] = torch.randn(n_img, 3, IMAGE, IMAGE, generator=g)
    if n_vid:
        enc["pixel_values_videos"] = torch.randn(n_vid, frames, 3, IMAGE, IMAGE, generator=g)
    return enc


def pruned_features(model, inputs) -> dict:
    """The pruned towers' features (the handle must be active and have seen `inputs`)."""
    out = {}
    if IMAGES in inputs:
        out["image"] = BaseModelOutputWithPooling(
            pooler_output=model.model.get_image_features(**{IMAGES: inputs[IMAGES]}).pooler_output
        )
    if "pixel_values_videos" in inputs:
        feats = model.model.get_video_features(
            pixel_values_videos=inputs["pixel_values_videos"]
        ).pooler_output
        out["video"] = BaseModelOutputWithPooling(pooler_output=feats)
    return out


SUPPRESS = [TOK.convert_tokens_to_ids("<image>"), TOK.convert_tokens_to_ids("<video>")]
# A random model may emit a placeholder token, which a re-fed prompt (no cache) then counts as an image.
GREEDY = {"do_sample": False, "suppress_tokens": SUPPRESS}


def greedy_without_cache(model, inputs, steps: int) -> torch.Tensor:
    """tiny.greedy_without_cache with the placeholder tokens suppressed, as GREEDY does for generate()."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    for _ in range(steps):
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False, **extra).logits[:, -1]
        logits[:, SUPPRESS] = float("-inf")
        nxt = logits.argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
    return ids


def oracle_logits(model, prompts, features: dict, image_kept: int, frame_kept: int, frames: int = FRAMES):
    """The unpruned model fed only the kept features: a prompt with that many placeholders per block."""
    compact = TOK(expand(prompts, image_kept, frames * frame_kept), return_tensors="pt", padding=True)
    logits = model(
        input_ids=compact["input_ids"], attention_mask=compact["attention_mask"], mm_encoder_outputs=features
    ).logits
    return logits, compact


# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("budget", ["per_frame", "shared"])
def test_keep_all_is_exact_identity(budget) -> None:
    model = video_llava()
    inputs = inputs_for(MIXED)
    with torch.no_grad():
        ref = model(**inputs).logits
        ref_gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        with vlmcut.prune(model, "flowcut", keep=FRAMES * N, video_budget=budget) as h:
            out = model(**inputs).logits
            gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)
            rec = h._attachment.pass_record
    assert torch.equal(out, ref)
    assert torch.equal(gen, ref_gen)
    assert rec.video_kept.shape == (2, FRAMES, N) and rec.image_kept.shape == (1, N)
    assert torch.equal(rec.video_kept[1, 3], torch.arange(N))


def test_per_frame_counts_oracle_and_frames_pruned_independently() -> None:
    """keep=8 over 4 frames: 2 patches per frame (+ the frame's CLS); the language model receives exactly
    the prompt an unpruned model fed only those features would get; each frame's choice is FlowCut's choice
    for that frame alone (the bare video tower pruned to 2)."""
    keep = 8
    prompts = ["USER: <video> what is in the image ? ASSISTANT:", "USER: <video> describe ? ASSISTANT:"]
    model = video_llava(seed=1)
    inputs = inputs_for(prompts, seed=1)
    with torch.no_grad():
        with vlmcut.prune(model, "flowcut", keep=keep) as h:
            out = model(**inputs)
            rec = h._attachment.pass_record
            feats = pruned_features(model, inputs)
        oracle, compact = oracle_logits(model, prompts, feats, N, keep // FRAMES + 1)
        frames = inputs["pixel_values_videos"].flatten(0, 1)
        with vlmcut.prune(model.model.video_tower, "flowcut", keep=keep // FRAMES, feature_layer=-2) as bare:
            model.model.video_tower(frames)
    assert out.video_hidden_states.shape[:2] == (2 * FRAMES, keep // FRAMES + 1)  # CLS + 2 per frame
    assert rec.video_kept.shape == (2, FRAMES, keep // FRAMES)
    assert rec.frame_counts.tolist() == [[keep // FRAMES] * FRAMES] * 2
    assert torch.equal(rec.video_kept.flatten(0, 1), bare.kept_indices)
    assert bool((rec.video_kept.diff(dim=-1) > 0).all())  # ascending: raster order per frame
    assert h.kept_indices.shape == (2 * FRAMES, keep // FRAMES)
    mask = compact["attention_mask"].bool()
    assert out.logits.shape == oracle.shape
    torch.testing.assert_close(out.logits[mask], oracle[mask], rtol=1e-5, atol=1e-5)


def test_paper_setting_eight_frames() -> None:
    """Table 4's split at tiny scale: 8 frames, keep 1/8 of the patches = 2 per frame."""
    keep = 16
    model = video_llava(seed=2)
    inputs = inputs_for(["USER: <video> describe ? ASSISTANT:"], frames=8, seed=2)
    assert int((inputs["input_ids"] == model.config.video_token_id).sum()) == 8 * (N + 1)
    with torch.no_grad(), vlmcut.prune(model, "flowcut", keep=keep) as h:
        out = model(**inputs)
    assert out.video_hidden_states.shape[:2] == (8, 3)
    assert h.kept_indices.shape == (8, 2)  # one row per frame, kept after remove()


def test_image_and_video_in_one_batch_equals_model_fed_only_kept_tokens() -> None:
    """Row 0 holds an image then a video, row 1 a video: images keep K = 8 features, videos 8 patches."""
    keep = 8
    model = video_llava(seed=3)
    inputs = inputs_for(MIXED, seed=3)
    with torch.no_grad():
        with vlmcut.prune(model, "flowcut", keep=keep) as h:
            out = model(**inputs)
            feats = pruned_features(model, inputs)
            rec = h._attachment.pass_record
        oracle, compact = oracle_logits(model, MIXED, feats, keep, keep // FRAMES + 1)
    assert image_features(out).shape[0] == keep
    assert rec.image_kept.shape == (1, keep) and rec.video_kept.shape == (2, FRAMES, keep // FRAMES)
    # the handle: the image row, then one row per frame padded with -1
    kept = h.kept_indices
    assert kept.shape == (1 + 2 * FRAMES, keep)
    assert torch.equal(kept[0], rec.image_kept[0])
    assert torch.equal(kept[1:, : keep // FRAMES], rec.video_kept.flatten(0, 1))
    assert bool((kept[1:, keep // FRAMES :] == -1).all())
    mask = compact["attention_mask"].bool()
    torch.testing.assert_close(out.logits[mask], oracle[mask], rtol=1e-5, atol=1e-5)


def test_shared_budget_counts() -> None:
    """keep=8 shared over 4 frames: 4 per frame in the tower, then the 8 best patch tokens of the whole video
    after decoder layer 1; frames end with different counts; every frame's CLS stays."""
    keep = 8
    model = video_llava(seed=4)
    inputs = inputs_for(MIXED, seed=4)
    with torch.no_grad(), vlmcut.prune(model, "flowcut", keep=keep, video_budget="shared") as h:
        out = model(**inputs)
        att = h._attachment
        rec = att.pass_record
        enc = att.video_encoder.record.kept_indices.view(2, FRAMES, -1)
        layout = att._last_layout
        kept_cols = h.llm_record.kept_positions
    assert out.video_hidden_states.shape[:2] == (2 * FRAMES, 2 * keep // FRAMES + 1)
    assert enc.shape[-1] == 2 * keep // FRAMES
    assert rec.frame_counts.sum(dim=1).tolist() == [keep, keep]
    assert any(len(set(row)) > 1 for row in rec.frame_counts.tolist())  # the frames share the budget
    assert rec.image_kept.shape == (1, keep)  # images: the vision stage only, as LLaVA-1.5
    for v in range(2):
        for f in range(FRAMES):
            row = rec.video_kept[v, f]
            row = row[row >= 0]
            assert len(row) == rec.frame_counts[v, f]
            assert bool(torch.isin(row, enc[v, f]).all())  # survivors of the tower stage
    assert len(kept_cols) == 1
    ids = inputs["input_ids"]  # the image's placeholders and every frame's CLS survive layer 1
    for r in range(2):
        cols = kept_cols[0][r][kept_cols[0][r] >= 0]
        assert int(layout["visual"][r, cols].sum()) == keep
        protected = (layout["image_id"][r] >= 0) | ((layout["video_id"][r] >= 0) & (layout["slot"][r] == 0))
        assert bool(torch.isin(protected.nonzero().flatten(), cols).all())
    assert h.kept_indices.shape[0] == 1 + 2 * FRAMES
    assert ids.shape[0] == 2


def test_shared_budget_keeps_original_positions_oracle() -> None:
    """One row: the pruned model equals the model after the tower stage with the tokens the decoder stage
    dropped hidden as keys from layer 2 on (so the kept tokens keep their original positions)."""
    keep = 6
    prompts = ["USER: <video> what is in the image ? ASSISTANT:"]
    model = video_llava(seed=5, attn="eager")
    inputs = inputs_for(prompts, seed=5)
    with torch.no_grad():
        with vlmcut.prune(model, "flowcut", keep=keep, video_budget="shared") as h:
            out = model(**inputs).logits
            feats = pruned_features(model, inputs)
            layout = h._attachment._last_layout
            cols = h.llm_record.kept_positions[0][0]
        frame_kept = max(1, 2 * keep // FRAMES) + 1
        compact = TOK(expand(prompts, N, FRAMES * frame_kept), return_tensors="pt")
        alive = torch.zeros(compact["input_ids"].shape[1], dtype=torch.bool)
        alive[cols[cols >= 0]] = True
        dropped = layout["visual"][0] & ~alive
        assert int(dropped.sum()) == FRAMES * (frame_kept - 1) - keep
        hooks = [
            layer.register_forward_pre_hook(tiny.mask_keys_hook(dropped), with_kwargs=True)
            for layer in model.model.language_model.layers[2:]
        ]
        try:
            oracle = model(input_ids=compact["input_ids"], mm_encoder_outputs=feats).logits
        finally:
            for hk in hooks:
                hk.remove()
    assert out.shape == oracle.shape
    torch.testing.assert_close(out[0, alive], oracle[0, alive], rtol=1e-5, atol=1e-5)


def test_llm_only_methods_treat_a_video_as_one_block() -> None:
    """FastV (default layer 2): each image and each video is one block of keep tokens at layer 1's output."""
    keep = 8
    model = video_llava(seed=6)
    inputs = inputs_for(MIXED, seed=6)
    with torch.no_grad(), vlmcut.prune(model, "fastv", keep=keep) as h:
        out = model(**inputs)
        rec = h._attachment.pass_record
        layout = h._attachment._last_layout
        cols = h.llm_record.kept_positions[-1]
    assert out.video_hidden_states.shape[:2] == (2 * FRAMES, N + 1)  # no vision-stage pruning
    assert rec.frame_counts.sum(dim=1).tolist() == [keep, keep]
    assert rec.image_kept.shape == (1, keep)
    # two groups in row 0 (image, video), one in row 1; the frames' CLS tokens are not prunable
    assert layout["image_index"][0].max() == 1 and layout["image_index"][1].max() == 0
    for r in range(2):
        c = cols[r][cols[r] >= 0]
        cls = (layout["video_id"][r] >= 0) & (layout["slot"][r] == 0)
        assert bool(torch.isin(cls.nonzero().flatten(), c).all())


@pytest.mark.parametrize(
    ("method", "budget"), [("flowcut", "per_frame"), ("flowcut", "shared"), ("fastv", None)]
)
def test_generate_cached_and_uncached_agree(method, budget) -> None:
    model = video_llava(seed=7)
    inputs = inputs_for(MIXED, seed=7)
    assert bool((inputs["attention_mask"][:, 0] == 0).any())  # really left-padded
    n = inputs["input_ids"].shape[1]
    with torch.no_grad(), vlmcut.prune(model, method, keep=8, video_budget=budget) as h:
        cached = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, **GREEDY)
        if h.llm_record is not None:
            assert h.llm_record.kept_positions  # generate's prefill really pruned in the decoder
        uncached = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, use_cache=False, **GREEDY)
        if budget == "per_frame":
            assert torch.equal(cached, greedy_without_cache(model, inputs, 3))
        dict_out = model.generate(
            **inputs, max_length=n + 2, min_length=n + 2, return_dict_in_generate=True, **GREEDY
        )
    assert torch.equal(cached, uncached)
    assert torch.equal(cached[:, :n], inputs["input_ids"])
    assert cached.shape == (2, n + 3)
    assert dict_out.sequences.shape == (2, n + 2)


def test_remove_restores_model_and_generate() -> None:
    model = video_llava(seed=8)
    inputs = inputs_for(MIXED, seed=8)

    def hooks():  # transformers installs its own output-capturing hooks lazily on the first forward
        return {n: (dict(m._forward_pre_hooks), dict(m._forward_hooks)) for n, m in model.named_modules()}

    with torch.no_grad():
        ref = model(**inputs).logits
        before = hooks()
        handle = vlmcut.prune(model, "flowcut", keep=8, video_budget="shared")
        assert "generate" in vars(model)
        assert model(**inputs).logits.shape[1] < ref.shape[1]
        handle.remove()
        assert "generate" not in vars(model)
        assert hooks() == before
        assert torch.equal(model(**inputs).logits, ref)
        with vlmcut.prune(model, "flowcut", keep=8):  # a fresh attach after remove() works
            assert model(**inputs).logits.shape[1] < ref.shape[1]
    assert handle.kept_indices.shape == (1 + 2 * FRAMES, 8)  # kept after remove()


def test_full_strategy_images_count_cls_videos_unchanged() -> None:
    model = video_llava(seed=9, strategy="full")
    prompts = ["USER: <image> <video> describe ? ASSISTANT:"]
    inputs = inputs_for(prompts, seed=9, image_block=N + 1)
    with torch.no_grad(), vlmcut.prune(model, "flowcut", keep=8) as h:
        out = model(**inputs)
        rec = h._attachment.pass_record
    assert image_features(out).shape[0] == 8  # CLS + 7 patches
    assert out.video_hidden_states.shape[:2] == (FRAMES, 3)
    assert rec.image_kept.shape == (1, 7) and rec.video_kept.shape == (1, FRAMES, 2)


def test_bad_budgets_and_inputs() -> None:
    model = video_llava()
    inputs = inputs_for(MIXED)
    with vlmcut.prune(model, "flowcut", keep=10), torch.no_grad():
        with pytest.raises(ValueError, match=r"not a multiple of 4; pass keep=8 or keep=12"):
            model(**inputs)
        with pytest.raises(ValueError, match="not a multiple of 4"):
            model.generate(**inputs, max_new_tokens=2)
    with pytest.raises(ValueError, match="video_budget must be one of"):
        vlmcut.prune(model, "flowcut", keep=8, video_budget="frames")
    with pytest.raises(ValueError, match="needs a language-model stage"):
        vlmcut.prune(model, "random", keep=8, video_budget="shared")
    with pytest.raises(ValueError, match="pass video_budget='shared'"):
        vlmcut.prune(model, "fastv", keep=8, video_budget="per_frame")
    with pytest.raises(TypeError, match="takes no videos"):
        vlmcut.prune(tiny.llava(layers=3, text_layers=1), "flowcut", keep=8, video_budget="shared")
    with pytest.raises(ValueError, match="vision_feature_layer"):
        vlmcut.prune(model, "flowcut", keep=8, feature_layer=-2)
    assert "generate" not in vars(model)  # failed attaches leave nothing behind
    with vlmcut.prune(model, "flowcut", keep=8), torch.no_grad():
        ids = inputs["input_ids"].clone()
        ids[1, (ids[1] == model.config.video_token_id).nonzero()[0]] = 5
        with pytest.raises(ValueError, match="video placeholders"):
            model(**{**inputs, "input_ids": ids})
        with pytest.raises(ValueError, match="pixel_values_videos must be"):
            model(**{**inputs, "pixel_values_videos": inputs["pixel_values_videos"][0]})
