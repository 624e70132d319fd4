"""Misuse a user can run into: sampling several sequences, threads, nested prunes, copies, pickling,
prompts that do not match their images. Each case either works like the unpruned model or fails with an
error that says what to do."""

from __future__ import annotations

import copy
import io
import pickle
import threading

import pytest
import test_llava_next as nxt
import test_video_llava as vid
import tiny
import tiny_qwen
import torch

import vlmcut

PROMPTS = ["USER: <image> what is in the image ? ASSISTANT:", "USER: <image> describe ? ASSISTANT:"]


def _llava():
    model = tiny.llava(seed=2, text_layers=3)
    proc = tiny.processor()
    inputs = proc(images=tiny.images(2, 2), text=PROMPTS, return_tensors="pt", padding=True)
    return model, dict(inputs), {"method": "flowcut", "keep": 16}, [model.config.image_token_id]


def _llava_llm():
    model, inputs, _, suppress = _llava()
    return model, inputs, {"method": "fastv", "keep": 16}, suppress


def _llava_next():
    model = nxt.llava_next(seed=2)
    return (
        model,
        dict(nxt._inputs(nxt.processor(), seed=2)),
        {"method": "flowcut", "keep": 16},
        [model.config.image_token_id],
    )


def _qwen():
    model = tiny_qwen.qwen2_vl(seed=2)
    rows = [[5, "image", 6, 7], [8, "image", 9]]
    inputs = tiny_qwen.prompt_inputs(rows, image_grids=[(1, 4, 4), (1, 4, 6)], seed=2)
    return model, inputs, {"method": "flowcut", "keep": 2}, tiny_qwen.SUPPRESS


def _video_llava():
    model = vid.video_llava(seed=2)
    return model, vid.inputs_for(vid.MIXED, seed=2), {"method": "flowcut", "keep": 8}, vid.SUPPRESS


FAMILIES = {
    "llava": _llava,
    "llava-fastv": _llava_llm,
    "llava-next": _llava_next,
    "qwen2-vl": _qwen,
    "video-llava": _video_llava,
}


@pytest.mark.parametrize("mode", ["sample", "beams"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_several_return_sequences_have_the_unpruned_shapes(family, mode) -> None:
    model, inputs, prune, suppress = FAMILIES[family]()
    width = inputs["input_ids"].shape[1]
    kwargs = {
        "max_new_tokens": 3,
        "min_new_tokens": 3,
        "num_return_sequences": 2,
        "suppress_tokens": suppress,
    }
    kwargs.update(
        {"do_sample": True, "top_k": 5} if mode == "sample" else {"do_sample": False, "num_beams": 2}
    )
    with torch.no_grad():
        torch.manual_seed(0)
        base = model.generate(**inputs, **kwargs)
        with vlmcut.prune(model, prune["method"], keep=prune["keep"]):
            torch.manual_seed(0)
            pruned = model.generate(**inputs, **kwargs, return_dict_in_generate=True)
    assert pruned.sequences.shape == base.shape
    # every returned sequence starts with its own caller's row (generate repeats rows in place)
    expected = inputs["input_ids"].repeat_interleave(2, dim=0)
    assert torch.equal(pruned.sequences[:, :width], expected)


def test_generate_from_a_second_thread_is_refused_while_the_first_runs() -> None:
    model, inputs, prune, suppress = _llava()
    started, release = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def slow_step(module, args, kwargs):  # holds the first generate inside its forward
        started.set()
        release.wait(timeout=30)

    with vlmcut.prune(model, prune["method"], keep=prune["keep"]):
        hook = model.register_forward_pre_hook(slow_step, with_kwargs=True)

        def first() -> None:
            try:
                with torch.no_grad():
                    model.generate(**inputs, max_new_tokens=1, suppress_tokens=suppress)
            except BaseException as exc:  # noqa: BLE001 - reported to the main thread
                errors.append(exc)

        t = threading.Thread(target=first)
        t.start()
        assert started.wait(timeout=30)
        hook.remove()
        try:
            with pytest.raises(RuntimeError, match="already running generate"):
                model.generate(**inputs, max_new_tokens=1)
        finally:
            release.set()
            t.join(timeout=60)
        assert not errors
        with torch.no_grad():  # the lock is free again
            out = model.generate(**inputs, max_new_tokens=1, suppress_tokens=suppress)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 1


@pytest.mark.parametrize("part", ["model.model", "model.model.vision_tower", "model.model.language_model"])
def test_nested_prune_is_refused_both_ways(part) -> None:
    model = tiny.llava(seed=1)
    inner = eval(part, {"model": model})  # noqa: S307 - a fixed attribute path
    method = "fastv" if part.endswith("language_model") else "flowcut"
    with vlmcut.prune(model, "flowcut", keep=16):
        with pytest.raises(
            RuntimeError, match="part of a LlavaForConditionalGeneration that is already pruned"
        ):
            vlmcut.prune(inner, method, keep=16)
    if part.endswith("language_model"):
        return  # a bare decoder is not a supported model on its own
    with vlmcut.prune(inner, "flowcut", keep=16):
        with pytest.raises(RuntimeError, match="contains a .* that is already pruned"):
            vlmcut.prune(model, "flowcut", keep=16)
    with vlmcut.prune(model, "flowcut", keep=16):  # after remove() both are free again
        pass


def test_deepcopy_and_pickle_say_what_to_do_and_work_again_after_remove() -> None:
    model, inputs, prune, _ = _llava()
    with torch.no_grad():
        base = model(**inputs).logits
    handle = vlmcut.prune(model, prune["method"], keep=prune["keep"])
    with pytest.raises(RuntimeError, match=r"Call handle.remove\(\), copy the model, then vlmcut.prune"):
        copy.deepcopy(model)
    with pytest.raises(RuntimeError, match="copy of a pruned"):  # also as part of a bigger module
        copy.deepcopy(torch.nn.ModuleList([model]))
    with pytest.raises(RuntimeError, match="or of a module inside it"):  # a part would run the original
        copy.deepcopy(model.model.vision_tower)
    with pytest.raises(TypeError, match="cannot be pickled or copied"):
        copy.copy(model)
    with pytest.raises(TypeError, match=r"save_pretrained"):
        pickle.dumps(model)
    with pytest.raises(TypeError, match=r"state_dict"):
        torch.save(model, io.BytesIO())
    torch.save(model.state_dict(), io.BytesIO())  # the weights are fine
    handle.remove()
    for module in model.modules():
        assert not {"__deepcopy__", "__reduce_ex__"} & set(vars(module))
    twin = copy.deepcopy(model)
    with vlmcut.prune(twin, prune["method"], keep=prune["keep"]), torch.no_grad():
        pruned = twin(**inputs).logits
        unpruned = model(**inputs).logits
    assert torch.equal(unpruned, base)  # the original is untouched by the twin's pruning
    assert pruned.shape[1] < base.shape[1]


def _fold(ids: torch.Tensor, token: int, keep_first: int) -> torch.Tensor:
    """One row whose placeholders are cut to the first ``keep_first`` (what a hand-made prompt may do)."""
    row = ids[0]
    where = (row == token).nonzero().flatten()
    drop = torch.zeros_like(row, dtype=torch.bool)
    drop[where[keep_first:]] = True
    return row[~drop][None]


def test_llava_two_images_folded_into_one_block_is_refused() -> None:
    """2 images, one 64-placeholder block, keep=32: the counts add up (2 x 32) but the unpruned model would
    refuse this prompt, so the pruned one must too (it used to take it as already compact)."""
    model = tiny.llava(seed=1)
    proc = tiny.processor()
    inputs = proc(
        images=tiny.images(2, 1), text=["USER: <image> <image> two ? ASSISTANT:"], return_tensors="pt"
    )
    token = model.config.image_token_id
    folded = {"input_ids": _fold(inputs["input_ids"], token, 64), "pixel_values": inputs["pixel_values"]}
    with torch.no_grad():
        with pytest.raises(ValueError):
            model(**folded)  # the unpruned model refuses it
        with vlmcut.prune(model, "flowcut", keep=32):
            with pytest.raises(ValueError, match="64 image placeholders for 2 image.*expected 64 per image"):
                model(**folded)
            with pytest.raises(ValueError, match="Pass the processor's output unchanged"):
                model.generate(**folded, max_new_tokens=1)
            out = model.generate(**inputs, max_new_tokens=2, min_new_tokens=2)  # the real prompt still works
    assert out.shape[1] == inputs["input_ids"].shape[1] + 2


def test_video_llava_folded_video_is_refused() -> None:
    model = vid.video_llava(seed=1)
    inputs = vid.inputs_for(["USER: <video> describe ? ASSISTANT:"], seed=1)
    token = vid.TOK.convert_tokens_to_ids("<video>")
    keep = 2 * vid.FRAMES  # 2 patches + CLS per frame: a cut prompt holds FRAMES * 3 placeholders
    cut = _fold(inputs["input_ids"], token, vid.FRAMES * 3)
    with torch.no_grad(), vlmcut.prune(model, "flowcut", keep=keep):
        with pytest.raises(ValueError, match="video placeholders for 1 video"):
            model(input_ids=cut, pixel_values_videos=inputs["pixel_values_videos"])


def test_llava_next_cut_prompt_is_refused() -> None:
    model = nxt.llava_next(seed=1)
    inputs = dict(nxt._inputs(nxt.processor(), prompts=nxt.PROMPTS[:1], sizes=nxt.SIZES[:1], seed=1))
    token = model.config.image_token_id
    with torch.no_grad(), vlmcut.prune(model, "flowcut", keep=16) as handle:
        # exactly as many placeholders as the pruned prompt holds (what the old check took as "compact")
        compact_ids = handle._attachment.compact_inputs(dict(inputs))[0]["input_ids"]
        cut = _fold(inputs["input_ids"], token, int((compact_ids == token).sum()))
        with pytest.raises(ValueError, match="Pass the processor's output unchanged"):
            model(**{**inputs, "input_ids": cut, "attention_mask": torch.ones_like(cut)})


def test_pixels_off_the_patch_grid_get_a_pixel_message_not_a_placeholder_one() -> None:
    model = tiny.llava(seed=1)
    proc = tiny.processor()
    inputs = proc(images=tiny.images(1, 1), text=PROMPTS[:1], return_tensors="pt")
    odd = inputs["pixel_values"][..., :55]  # 56 x 55
    with torch.no_grad(), vlmcut.prune(model, "flowcut", keep=16):
        with pytest.raises(
            ValueError, match=r"56x55 pixels, not a multiple of the vision tower's patch size 7"
        ):
            model(input_ids=inputs["input_ids"], pixel_values=odd)


@pytest.mark.parametrize("where", ["keyword", "generation_config", "model_config"])
def test_max_length_counts_the_callers_prompt_wherever_it_is_set(where) -> None:
    """max_length counts the prompt; the pruned prompt is shorter, so it is shortened by the same amount
    however the caller sets it (a keyword, a GenerationConfig argument, the model's generation config)."""
    from transformers import GenerationConfig

    model, inputs, prune, suppress = _llava()
    limit = inputs["input_ids"].shape[1] + 3
    kwargs = {"do_sample": False, "suppress_tokens": suppress}
    if where == "keyword":
        kwargs["max_length"] = limit
    elif where == "generation_config":
        kwargs["generation_config"] = GenerationConfig(max_length=limit, pad_token_id=0)
    else:
        model.generation_config.max_length = limit
    with torch.no_grad():
        base = model.generate(**inputs, **kwargs)
        with vlmcut.prune(model, prune["method"], keep=prune["keep"]):
            pruned = model.generate(**inputs, **kwargs)
    assert base.shape[1] == limit
    assert pruned.shape == base.shape
