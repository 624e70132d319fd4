"""The attention-free reference methods: random and uniform grid."""

from __future__ import annotations

import pytest
import tiny
import torch

import vlmcut
from vlmcut.methods.reference import grid_indices


def test_grid_indices_hand_checked() -> None:
    # 8x8 grid, 4 tokens: a 2x2 lattice of cell centres at rows/cols 2 and 6
    assert grid_indices(64, 4).tolist() == [2 * 8 + 2, 2 * 8 + 6, 6 * 8 + 2, 6 * 8 + 6]
    assert grid_indices(64, 64).tolist() == list(range(64))
    for keep in (1, 3, 7, 10, 16, 33, 63):
        idx = grid_indices(64, keep)
        assert len(idx) == keep and len(set(idx.tolist())) == keep
    with pytest.raises(ValueError, match="square"):
        grid_indices(60, 4)


@pytest.mark.parametrize("method", ["random", "grid"])
def test_reference_methods_on_tower_and_llava(method) -> None:
    model = tiny.clip_tower()
    x = tiny.pixels(2)
    with torch.no_grad(), vlmcut.prune(model, method, keep=9) as h:
        out = model(x)
    assert out.last_hidden_state.shape[1] == 10
    assert h.kept_indices.shape == (2, 9)
    assert h.tokens_per_layer == [64] * 4 + [9, 9]  # one cut, after layer F-1 = 4
    proc = tiny.processor()
    llava = tiny.llava()
    inputs = proc(
        images=tiny.images(2), text=["USER: <image> describe ? ASSISTANT:"] * 2, return_tensors="pt"
    )
    with torch.no_grad(), vlmcut.prune(llava, method, keep=5) as h:
        gen = llava.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert h.kept_indices.shape == (2, 5)
    assert torch.equal(gen[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])


def test_random_is_seeded_and_identity_at_keep_all() -> None:
    model = tiny.clip_tower()
    x = tiny.pixels(2)
    runs = []
    for _ in range(2):
        with torch.no_grad(), vlmcut.prune(model, "random", keep=9, seed=3) as h:
            model(x)
        runs.append(h.kept_indices)
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0][0], runs[0][1])  # each image draws its own
    with torch.no_grad():
        ref = model(x).last_hidden_state
        with vlmcut.prune(model, "random", keep=64):
            assert torch.equal(model(x).last_hidden_state, ref)


def test_random_draw_of_an_image_does_not_depend_on_its_batch_or_call_order() -> None:
    model = tiny.clip_tower()
    x = tiny.pixels(4, seed=9)
    with torch.no_grad(), vlmcut.prune(model, "random", keep=9, seed=3) as h:
        model(x)
        batched = h.kept_indices
        model(x[2:3])  # a call in between must not move the draws of later calls
        singles = []
        for i in reversed(range(4)):
            model(x[i : i + 1])
            singles.insert(0, h.kept_indices)
    assert torch.equal(batched, torch.cat(singles))
    assert len({tuple(r.tolist()) for r in batched}) == 4  # still a draw per image
    with torch.no_grad(), vlmcut.prune(model, "random", keep=9, seed=4) as h:
        model(x)
    assert not torch.equal(h.kept_indices, batched)  # another seed, another draw
