"""An image's result never depends on what else is in its batch: every vision-stage method on every family.

A batch of different images gives each image the kept tokens and the features it gets alone (features to
float tolerance: batched matmuls round differently; the choice itself is exact)."""

from __future__ import annotations

import pytest
import test_llava_next as nxt
import test_video_llava as vid
import tiny
import tiny_qwen
import torch

import vlmcut
from vlmcut.compat import image_features

VISION_METHODS = ["flowcut", "random", "grid", "visionzip", "fastervlm"]
ATOL = 1e-5


def _split(features: torch.Tensor, counts: list[int]) -> list[torch.Tensor]:
    return list(features.split(counts))


@pytest.mark.parametrize("method", VISION_METHODS)
def test_llava(method) -> None:
    # 10 tower layers: FlowCut prunes at several layers, where these images disagree on their counts
    model = tiny.llava(seed=11, layers=10)
    proc = tiny.processor()
    prompts = [
        "USER: <image> what ? ASSISTANT:",
        "USER: <image> describe the image ? ASSISTANT:",
        "USER: <image> ?",
    ]
    images = tiny.images(3, 11)
    with torch.no_grad(), vlmcut.prune(model, method, keep=12) as h:
        batch = model(**proc(images=images, text=prompts, return_tensors="pt", padding=True))
        kept, feats = h.kept_indices, image_features(batch)
        schedules = []
        for i in range(3):
            alone = model(**proc(images=images[i : i + 1], text=prompts[i : i + 1], return_tensors="pt"))
            schedules.append(tuple(h.tokens_per_layer))
            assert torch.equal(kept[i : i + 1], h.kept_indices), (method, i)
            torch.testing.assert_close(feats[i * 12 : (i + 1) * 12], image_features(alone), rtol=0, atol=ATOL)
    if method == "flowcut":
        assert len(set(schedules)) > 1, schedules  # the images really keep different counts on the way


@pytest.mark.parametrize("method", VISION_METHODS)
def test_llava_next(method) -> None:
    model = nxt.llava_next(seed=11)
    proc = nxt.processor()
    sizes = nxt.SIZES[:2]
    with torch.no_grad(), vlmcut.prune(model, method, keep=24):
        batch = model(**nxt._inputs(proc, sizes=sizes, seed=11))
        feats = image_features(batch)
        alone = []
        for i in range(2):
            one = nxt._inputs(proc, prompts=nxt.PROMPTS[i : i + 1], sizes=sizes[i : i + 1], seed=11)
            # the same pixels as in the batch: _inputs draws images from one seed in order
            one["pixel_values"] = nxt._inputs(proc, sizes=sizes, seed=11)["pixel_values"][i : i + 1]
            alone.append(image_features(model(**one)))
    torch.testing.assert_close(feats, torch.cat(alone), rtol=0, atol=ATOL)


@pytest.mark.parametrize("method", VISION_METHODS)
def test_video_llava(method) -> None:
    model = vid.video_llava(seed=11)
    prompts = ["USER: <video> describe ? ASSISTANT:", "USER: <video> what is in it ? ASSISTANT:"]
    keep = 2 * vid.FRAMES
    inputs = vid.inputs_for(prompts, seed=11)
    with torch.no_grad(), vlmcut.prune(model, method, keep=keep) as h:
        model(**inputs)
        kept = h.kept_indices
        for i in range(2):
            one = vid.inputs_for(prompts[i : i + 1], seed=11)
            one["pixel_values_videos"] = inputs["pixel_values_videos"][i : i + 1]
            model(**one)
            frames = slice(i * vid.FRAMES, (i + 1) * vid.FRAMES)
            assert torch.equal(kept[frames], h.kept_indices), (method, i)


def test_qwen2_vl_flowcut() -> None:
    model = tiny_qwen.qwen2_vl(seed=11)
    grids = [(1, 4, 4), (1, 4, 6), (1, 6, 4)]
    rows = [[5, "image", 6], [7, "image", 8, 9], [14, "image"]]
    batch = tiny_qwen.prompt_inputs(rows, image_grids=grids, seed=11)
    offsets = [0]
    for t, hh, ww in grids:
        offsets.append(offsets[-1] + t * hh * ww)
    merged: list[torch.Tensor] = []  # the merger's output: what the language model receives
    hook = model.model.visual.merger.register_forward_hook(lambda m, a, out: merged.append(out))
    try:
        with torch.no_grad(), vlmcut.prune(model, "flowcut", keep=2):
            model(**batch)
            for i, grid in enumerate(grids):
                one = tiny_qwen.prompt_inputs(rows[i : i + 1], image_grids=[grid], seed=11)
                one["pixel_values"] = batch["pixel_values"][offsets[i] : offsets[i + 1]]
                model(**one)
    finally:
        hook.remove()
    torch.testing.assert_close(merged[0], torch.cat(merged[1:]), rtol=0, atol=ATOL)
