"""vlmcut.zoo.train on the real small LLaVA, a few steps: the training format, the LoRA and its merge."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from zoo_gate import require_zoo

require_zoo()

from vlmcut import zoo  # noqa: E402
from vlmcut.eval.datasets import load_dataset  # noqa: E402
from vlmcut.inference import build_prompt  # noqa: E402
from vlmcut.zoo import train as train_module  # noqa: E402
from vlmcut.zoo.small_llava import lora_deltas  # noqa: E402


@pytest.fixture(scope="module")
def small():
    return zoo.load_small_llava()


def test_first_turn_is_the_evaluation_prompt_and_only_answers_are_supervised(small) -> None:
    model, processor = small
    convs = train_module.conversations(load_dataset("scenes", "train", n=40), 3, random.Random(0), 2)
    assert len(convs) == 2 and all(1 <= len(c.qa) <= 3 for c in convs)
    conv = convs[0]
    ids, mask = train_module.encode(processor, conv.qa, model.config.image_seq_length)
    # the first turn is token for token what evaluation feeds the model
    prompt = build_prompt(processor, conv.qa[0][0])
    eval_ids = processor(images=conv.load_image(), text=prompt, return_tensors="pt")["input_ids"][0].tolist()
    assert ids[: len(eval_ids)] == eval_ids
    supervised = processor.tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if m])
    assert supervised == "".join(f"{answer}<|im_end|>" for _, answer in conv.qa)


def test_lora_hooks_and_merged_weights_give_the_same_logits(small, tmp_path: Path) -> None:
    model, processor = small
    torch.manual_seed(0)
    lora = train_module.LoRA(model.model.language_model, rank=2, alpha=4.0)
    try:
        with torch.no_grad():
            for b in lora.B:
                b.normal_(std=0.02)  # B starts at zero; make the update non-trivial
        sample = load_dataset("scenes", "validation", n=1)[0]
        inputs = processor(
            images=sample.image, text=build_prompt(processor, sample.prompt()), return_tensors="pt"
        )
        with torch.no_grad():
            hooked = model(**inputs).logits[:, -1]
        path = train_module.save_weights(model, tmp_path / "adapter.safetensors", lora, {"test": True})
    finally:
        lora.remove()
    with torch.no_grad():
        plain = model(**inputs).logits[:, -1]
    assert not torch.allclose(plain, hooked, atol=1e-3)  # the LoRA changed the answer distribution
    merged, _ = zoo.load_small_llava(projector_path=path)
    with torch.no_grad():
        got = merged(**inputs).logits[:, -1]
    torch.testing.assert_close(got, hooked, atol=2e-4, rtol=1e-4)


def test_train_runs_both_stages_and_writes_a_model_card(tmp_path: Path) -> None:
    cfg = train_module.TrainConfig(
        stage0_steps=2,
        stage0_batch=2,
        stage0_images=3,
        stage1_steps=2,
        stage2_steps=2,
        batch_size=1,
        turns=2,
        warmup=1,
        lora_rank=2,
        lora_if_below=1.01,  # always below: stage 2 runs
        scenes_images=2,
        easy_vqa_images=2,
        val_n=2,
        time_budget_s=1e9,
        log_every=1,
    )
    out = tmp_path / "adapter.safetensors"
    card = train_module.train(cfg, out)
    assert card["steps"] == {"grounding": 2, "projector": 2, "lora": 2}
    assert card["lora"]["rank"] == 2
    stages = [e["stage"] for e in card["log"]]
    assert stages == ["grounding", "grounding", "projector", "projector", "lora", "lora"]
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in card["log"])
    assert json.loads(out.with_suffix(".json").read_text())["steps"] == card["steps"]
    assert set(card["validation_final"]) == {"scenes", "easy-vqa"}
    assert lora_deltas(out)  # the LoRA is in the file


def test_grounding_targets_name_each_scene_object_on_its_own_patches(small) -> None:
    from vlmcut.eval.scenes import generate_scene

    model, processor = small
    grounding = train_module.Grounding(model, processor)
    dataset = load_dataset("scenes", "train", n=60)
    convs = train_module.conversations(dataset, 8, random.Random(0), 6)
    grid = grounding.grid
    for conv in convs:
        color, shape = grounding.targets(conv)
        scene_id = conv.image_key.split("/", 1)[1]
        seed, index = (int(x) for x in scene_id.split("-")[2:])
        scene = generate_scene(seed, index, split="train")
        labelled = {
            (grounding.colors[c], grounding.shapes[s])
            for c, s in zip(color.tolist(), shape.tolist(), strict=True)
            if c >= 0
        }
        assert labelled == {(o.color, o.shape) for o in scene.objects}  # every object, nothing else
        assert ((color >= 0) == (shape >= 0)).all()
        for obj in scene.objects:  # the object's centre patch carries its words unless something covers it
            cell = int(obj.y // (scene.image_size / grid)) * grid + int(obj.x // (scene.image_size / grid))
            if obj.visible_fraction == 1.0 and color[cell] >= 0:
                names = (grounding.colors[color[cell]], grounding.shapes[shape[cell]])
                others = [(o.color, o.shape) for o in scene.objects if o is not obj]
                assert names == (obj.color, obj.shape) or names in others


def test_grounding_targets_for_easy_vqa_come_from_the_answers(small) -> None:
    model, processor = small
    grounding = train_module.Grounding(model, processor)
    dataset = load_dataset("easy-vqa", "train")
    convs = train_module.conversations(dataset, 8, random.Random(0), 5)
    for conv in convs:
        color, _ = grounding.targets(conv)
        answers = {a for q, a in conv.qa if q.startswith("what color")}
        labelled = {grounding.colors[c] for c in color.tolist() if c >= 0}
        assert 0 < (color >= 0).sum() < color.numel()  # the shape, not the background
        if answers:
            assert labelled == answers


def test_grounding_loss_prefers_tokens_that_embed_their_object_words(small) -> None:
    model, processor = small
    grounding = train_module.Grounding(model, processor)
    convs = train_module.conversations(load_dataset("scenes", "train", n=40), 8, random.Random(0), 3)
    targets = [grounding.targets(c) for c in convs]
    words = model.get_input_embeddings().weight[grounding.word_ids].detach()
    n_colors = len(grounding.colors)
    aligned = torch.randn(len(convs), grid_cells := model.config.image_seq_length, words.shape[1])
    for b, (color, shape) in enumerate(targets):
        on = color >= 0
        aligned[b, on] = words[color[on]] + words[n_colors + shape[on]]
    shuffled = torch.randn(len(convs), grid_cells, words.shape[1])
    with torch.no_grad():
        good = grounding.loss(aligned, convs).item()
        bad = grounding.loss(shuffled, convs).item()
    assert good < bad - 0.5


def test_shipped_weights_answer_easy_vqa_colours_and_shapes() -> None:
    """The committed projector + LoRA (vlmcut/zoo/projector.safetensors) are the trained ones: far above the
    1/8 and 1/3 chance levels on held-out easy-VQA colour and shape questions."""
    from vlmcut.eval.runner import evaluate

    assert zoo.TRAINED_WEIGHTS.is_file()
    assert lora_deltas(zoo.TRAINED_WEIGHTS)  # the LoRA ships too
    model, processor = zoo.load_small_llava(projector_path=zoo.TRAINED_WEIGHTS)
    data = load_dataset("easy-vqa", "validation")
    samples = [s for s in data.filter(family="color")[:8]] + [s for s in data.filter(family="shape")[:8]]
    result = evaluate(model, processor, samples, "easy-vqa", progress=False)
    assert result.per_family["color"] >= 0.75 and result.per_family["shape"] >= 0.75, result.per_family


def test_pruned_feature_cache_holds_what_the_pruned_model_feeds_its_projector(small) -> None:
    """With FlowCut on the tower, the cache holds each image's 64 kept tokens (the projector turns them into
    exactly the pruned model's image features), their grid positions, and grounding targets follow them."""
    import vlmcut

    model, processor = small
    convs = train_module.conversations(load_dataset("scenes", "train", n=40), 2, random.Random(0), 3)
    pixels = processor.image_processor([c.load_image() for c in convs], return_tensors="pt")["pixel_values"]
    with torch.no_grad(), vlmcut.prune(model, "flowcut", keep=64) as handle:
        cache = train_module.FeatureCache(model, processor, handle)
        feats = cache.get(convs)
        kept = cache.kept_indices(convs)
        reference = model.model.get_image_features(pixel_values=pixels).pooler_output
        reference_kept = handle.kept_indices.clone()
        projected = model.model.multi_modal_projector(feats)
    assert feats.shape[:2] == (3, 64) and torch.equal(kept, reference_kept)
    torch.testing.assert_close(projected, torch.stack(list(reference)), atol=0.05, rtol=0.02)  # bf16 cache
    # the same images alone: the same tokens (a result never depends on the batch)
    with torch.no_grad(), vlmcut.prune(model, "flowcut", keep=64) as handle:
        alone = train_module.FeatureCache(model, processor, handle)
        assert torch.equal(alone.get(convs[1:2])[0], feats[1])
    grounding = train_module.Grounding(model, processor)
    color, _ = grounding.targets(convs[0])
    words = model.get_input_embeddings().weight[grounding.word_ids].detach()
    embeds = torch.randn(3, 64, words.shape[1])
    for b, c in enumerate(convs):  # kept tokens that embed their own (gathered) colour word score better
        col = grounding.targets(c)[0][kept[b]]
        on = col >= 0
        embeds[b, on] = 5 * words[col[on]]
    assert (color[kept[0]] >= 0).any()
    with torch.no_grad():
        aligned = grounding.loss(embeds, convs, kept).item()
        shuffled = grounding.loss(embeds[:, torch.randperm(64)], convs, kept).item()
    assert aligned < shuffled
    with pytest.raises(ValueError, match="kept patch positions"):
        grounding.loss(embeds, convs)  # 64 tokens, 256 targets: the positions are needed


def test_compare_training_steps_both_arms_from_one_start_and_reports_paired_intervals(
    small, tmp_path: Path
) -> None:
    from vlmcut.eval.runner import EvalResult
    from vlmcut.eval.store import ResultStore

    model, _ = small
    start = train_module.save_weights(model, tmp_path / "start.safetensors", None, {"test": True})
    cfg = train_module.TrainConfig(
        stage2_steps=3,
        batch_size=1,
        turns=2,
        warmup=1,
        lora_rank=2,
        scenes_images=3,
        easy_vqa_images=0,
        datasets=("scenes",),
        time_budget_s=1e9,
        log_every=1,
        init=str(start),
    )
    record = train_module.compare_training(cfg, "flowcut@64", tmp_path)
    arms = record["arms"]
    assert set(arms) == {"unpruned", "flowcut64"}
    assert arms["unpruned"]["image_tokens"] == 256 and arms["flowcut64"]["image_tokens"] == 64
    assert all(len(a["seconds"]) == 3 and all(x > 0 for x in a["seconds"]) for a in arms.values())
    assert record["step_time_ratio"] == pytest.approx(
        arms["unpruned"]["s_per_step_mean"] / arms["flowcut64"]["s_per_step_mean"]
    )
    a, b = (lora_deltas(tmp_path / f"{arm}.safetensors") for arm in ("unpruned", "flowcut64"))
    assert a.keys() == b.keys() and any(not torch.allclose(a[k], b[k]) for k in a)  # trained differently
    # the report: each arm's cells, the pruned-trained arm's paired interval against the unpruned-trained one
    for arm, right in (("unpruned", [1, 1, 0, 0]), ("flowcut64", [1, 1, 1, 1])):
        store = ResultStore(tmp_path / f"eval-{arm}", "m")
        for cell in ("unpruned", "flowcut"):
            keep = None if cell == "unpruned" else 64
            result = EvalResult("scenes", cell, keep, 4, sum(right) / 4, {}, correct=right)
            store.append("scenes", result.row("fp"))
    text = train_module.compare_report(tmp_path, ["unpruned", "flowcut64"])
    assert "| scenes | flowcut@64 (n=4) | 50.0 | 100.0 | +50.0 [" in text
    assert f"**{record['step_time_ratio']:.2f}x**" in text
    with pytest.raises(ValueError, match="no evaluation cells"):
        train_module.compare_report(tmp_path, ["unpruned", "missing"])
