"""FlowCut on LlavaForConditionalGeneration: the processor's output goes in unchanged."""

from __future__ import annotations

import pytest
import tiny
import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

import vlmcut
from vlmcut.compat import disable_checkpointing, enable_checkpointing, image_features

PROMPTS = ["USER: <image> what is in the image ? ASSISTANT:", "USER: <image> describe ? ASSISTANT:"]
KEEP = 8


@pytest.fixture(scope="module")
def proc():
    return tiny.processor()


def _inputs(proc, prompts=PROMPTS, n_images=None, seed=0):
    n = sum(p.count("<image>") for p in prompts) if n_images is None else n_images
    return proc(images=tiny.images(n, seed), text=prompts, return_tensors="pt", padding=True)


def _oracle_logits(model, proc, prompts, inputs, keep):
    """The unpruned model fed only the kept features: a prompt with `keep` placeholders per image and the
    pruned tower's features passed in directly."""
    tok = proc.tokenizer
    compact = tok(
        [p.replace("<image>", " ".join(["<image>"] * keep)) for p in prompts],
        return_tensors="pt",
        padding=True,
    )
    with vlmcut.prune(model, "flowcut", keep=keep):
        feats = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
    return model(
        input_ids=compact["input_ids"],
        attention_mask=compact["attention_mask"],
        mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=feats)},
    ).logits, compact


def test_keep_all_is_exact_identity(proc) -> None:
    model = tiny.llava()
    inputs = _inputs(proc)
    with torch.no_grad():
        ref = model(**inputs).logits
        with vlmcut.prune(model, "flowcut", keep=tiny.GRID**2):
            out = model(**inputs).logits
            gen = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        ref_gen = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert torch.equal(out, ref)
    assert torch.equal(gen, ref_gen)


def test_pruned_forward_equals_model_fed_only_kept_tokens(proc) -> None:
    model = tiny.llava(seed=1)
    inputs = _inputs(proc, seed=1)
    with torch.no_grad():
        oracle, compact = _oracle_logits(model, proc, PROMPTS, inputs, KEEP)
        with vlmcut.prune(model, "flowcut", keep=KEEP) as h:
            out = model(**inputs).logits
    assert h.kept_indices.shape == (2, KEEP)
    assert (
        out.shape == oracle.shape == (2, compact["input_ids"].shape[1], model.config.text_config.vocab_size)
    )
    mask = compact["attention_mask"].bool()
    torch.testing.assert_close(out[mask], oracle[mask], rtol=1e-5, atol=1e-5)


def test_several_images_per_prompt_and_uneven_rows(proc) -> None:
    """Row 0 has two adjacent images, row 1 one: the rows shrink by different amounts and are re-padded."""
    prompts = [
        "USER: <image><image> what is in the image ? ASSISTANT:",
        "USER: <image> describe ? ASSISTANT:",
    ]
    model = tiny.llava(seed=2)
    inputs = _inputs(proc, prompts, seed=2)
    assert inputs["pixel_values"].shape[0] == 3
    with torch.no_grad():
        oracle, compact = _oracle_logits(model, proc, prompts, inputs, KEEP)
        with vlmcut.prune(model, "flowcut", keep=KEEP) as h:
            out = model(**inputs).logits
            gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert h.kept_indices.shape == (3, KEEP)
    mask = compact["attention_mask"].bool()
    torch.testing.assert_close(out[mask], oracle[mask], rtol=1e-5, atol=1e-5)
    assert torch.equal(gen[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_generate_left_padded_batch_matches_no_cache_decoding(proc, attn) -> None:
    model = tiny.llava(seed=3, attn=attn)
    inputs = _inputs(proc, seed=3)
    assert bool((inputs["attention_mask"][:, 0] == 0).any())  # really left-padded
    with torch.no_grad(), vlmcut.prune(model, "flowcut", keep=KEEP):
        gen = model.generate(**inputs, max_new_tokens=6, do_sample=False, min_new_tokens=6)
        ref = tiny.greedy_without_cache(model, inputs, 6)
    n = inputs["input_ids"].shape[1]
    assert torch.equal(gen[:, :n], inputs["input_ids"])  # the prompt part is the caller's
    assert torch.equal(gen, ref)


def test_generate_dict_output_and_max_length(proc) -> None:
    model = tiny.llava(seed=4)
    inputs = _inputs(proc, seed=4)
    n = inputs["input_ids"].shape[1]
    with torch.no_grad(), vlmcut.prune(model, "flowcut", keep=KEEP):
        out = model.generate(
            **inputs, max_length=n + 3, min_length=n + 3, do_sample=False, return_dict_in_generate=True
        )
    assert out.sequences.shape == (2, n + 3)
    assert torch.equal(out.sequences[:, :n], inputs["input_ids"])


def test_bf16_generate(proc) -> None:
    model = tiny.llava(seed=5, dtype=torch.bfloat16)
    inputs = _inputs(proc, seed=5)
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    with torch.no_grad(), vlmcut.prune(model, "flowcut", keep=KEEP) as h:
        logits = model(**inputs).logits
        gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert logits.dtype == torch.bfloat16 and bool(torch.isfinite(logits).all())
    assert h.kept_indices.shape == (2, KEEP)
    assert gen.shape[1] > inputs["input_ids"].shape[1]


def test_full_strategy_keeps_cls_as_one_of_k(proc) -> None:
    model = tiny.llava(seed=6, strategy="full")
    image = tiny.images(1, 6)
    full_proc = tiny.processor()
    full_proc.vision_feature_select_strategy = "full"
    inputs = full_proc(images=image, text=[PROMPTS[0]], return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == tiny.GRID**2 + 1
    with torch.no_grad(), vlmcut.prune(model, "flowcut", keep=KEEP) as h:
        out = model(**inputs)
    assert image_features(out).shape[0] == KEEP  # CLS + KEEP - 1 patches
    assert h.kept_indices.shape == (1, KEEP - 1)


def _train_step(model, inputs, labels):
    model.train()
    model.zero_grad()
    out = model(**inputs, labels=labels)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), grads


@pytest.mark.parametrize("reentrant", [False, True])
def test_training_step_with_and_without_gradient_checkpointing(proc, reentrant) -> None:
    model = tiny.llava(seed=7)
    inputs = _inputs(proc, seed=7)
    labels = inputs["input_ids"].clone()
    labels[inputs["attention_mask"] == 0] = -100
    labels[labels == model.config.image_token_id] = -100
    with vlmcut.prune(model, "flowcut", keep=KEEP) as h:
        loss, grads = _train_step(model, inputs, labels)
        assert h.kept_indices.shape == (2, KEEP)
        enable_checkpointing(model, use_reentrant=reentrant)
        loss_ckpt, grads_ckpt = _train_step(model, inputs, labels)
        disable_checkpointing(model)
    assert bool(torch.isfinite(loss))
    torch.testing.assert_close(loss_ckpt, loss)
    # gradients reach the projector and the vision tower through the kept tokens only
    assert grads["model.multi_modal_projector.linear_1.weight"].abs().sum() > 0
    tower_grads = [g for n, g in grads.items() if "vision_tower" in n and "encoder.layers.0." in n]
    assert tower_grads and any(g.abs().sum() > 0 for g in tower_grads)
    assert grads.keys() == grads_ckpt.keys()
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-4, atol=1e-6)
    # an SGD step changes the loss
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in grads:
                p -= 0.5 * grads[n]
    with vlmcut.prune(model, "flowcut", keep=KEEP):
        new_loss, _ = _train_step(model, inputs, labels)
    assert float(new_loss) < float(loss)


def test_labels_shrink_with_the_placeholders(proc) -> None:
    model = tiny.llava(seed=8)
    inputs = _inputs(proc, seed=8)
    labels = inputs["input_ids"].clone()
    labels[labels == model.config.image_token_id] = -100
    labels[inputs["attention_mask"] == 0] = -100
    with torch.no_grad():
        oracle_logits, compact = _oracle_logits(model, proc, PROMPTS, inputs, KEEP)
        with vlmcut.prune(model, "flowcut", keep=KEEP):
            loss = model(**inputs, labels=labels).loss
    c_labels = compact["input_ids"].clone()
    c_labels[c_labels == model.config.image_token_id] = -100
    c_labels[compact["attention_mask"] == 0] = -100
    ref = torch.nn.functional.cross_entropy(
        oracle_logits[:, :-1].reshape(-1, oracle_logits.shape[-1]),
        c_labels[:, 1:].reshape(-1),
        ignore_index=-100,
    )
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)


def test_remove_restores_model_and_generate(proc) -> None:
    model = tiny.llava(seed=9)
    inputs = _inputs(proc, seed=9)
    with torch.no_grad():
        ref = model(**inputs).logits
        handle = vlmcut.prune(model, "flowcut", keep=KEEP)
        assert "generate" in vars(model)
        model(**inputs)
        handle.remove()
        assert "generate" not in vars(model)
        assert all(not m._forward_pre_hooks for m in model.modules())
        assert torch.equal(model(**inputs).logits, ref)


def test_error_cases(proc) -> None:
    model = tiny.llava()
    inputs = _inputs(proc)
    for bad, exc in ((0, ValueError), (-1, ValueError), (3.0, TypeError), ("8", TypeError)):
        with pytest.raises(exc, match="keep"):
            vlmcut.prune(model, "flowcut", keep=bad)
    with pytest.raises(ValueError, match="vision_feature_layer"):
        vlmcut.prune(model, "flowcut", keep=KEEP, feature_layer=-2)
    with vlmcut.prune(model, "flowcut", keep=KEEP), torch.no_grad():
        broken = dict(inputs)
        broken["input_ids"] = inputs["input_ids"][:, 1:]  # one placeholder too few in row... or padding
        broken["attention_mask"] = inputs["attention_mask"][:, 1:]
        ids = inputs["input_ids"].clone()
        ids[0, (ids[0] == model.config.image_token_id).nonzero()[0]] = 5
        with pytest.raises(ValueError, match="placeholder"):
            model(input_ids=ids, attention_mask=inputs["attention_mask"], pixel_values=inputs["pixel_values"])
        with pytest.raises(ValueError, match="vision_feature_layer"):
            model(**inputs, vision_feature_layer=-1)
        with pytest.raises(ValueError, match="input_ids"):
            embeds = model.get_input_embeddings()(inputs["input_ids"])
            model(
                inputs_embeds=embeds,
                attention_mask=inputs["attention_mask"],
                pixel_values=inputs["pixel_values"],
            )
