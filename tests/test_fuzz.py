"""Property tests (Hypothesis): random budgets, image sizes, batch compositions and degenerate attention.
Each property holds for every drawn case or the case fails with a clear ``ValueError``; never a crash, a
silent clip or a result that depends on the batch. Sized to run in well under a minute."""

from __future__ import annotations

import math

import pytest
import tiny
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vlmcut
from vlmcut.methods.flowcut import FlowCutConfig, FlowCutSelector, entropy_ratio, prune_count

FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])

finite_or_not = st.one_of(
    st.floats(min_value=0, max_value=1e6, allow_nan=False),
    st.sampled_from([0.0, float("nan"), float("inf")]),
)


@FAST
@given(rows=st.lists(st.lists(finite_or_not, min_size=4, max_size=4), min_size=1, max_size=4))
def test_entropy_and_counts_on_degenerate_attention(rows) -> None:
    a = torch.tensor(rows, dtype=torch.float64)
    h = entropy_ratio(a)
    finite = torch.isfinite(a).all(-1) & (a.sum(-1) > 0) & torch.isfinite(a.sum(-1))
    assert bool(torch.isfinite(h[finite]).all())
    assert bool(((h[finite] >= -1e-9) & (h[finite] <= 1 + 1e-9)).all())
    counts = prune_count(a, remaining=2, keep=1)
    assert counts.shape == (len(rows),)
    assert bool(((counts >= 0) & (counts <= 3)).all())  # never more than N - K
    for i in range(len(rows)):  # row by row: each row's count is what it gets alone
        assert int(prune_count(a[i : i + 1], remaining=2, keep=1)) == int(counts[i])


@FAST
@given(
    keep=st.integers(1, 20),
    layer=st.integers(0, 3),
    scale=st.sampled_from([0.0, 1.0, 1e4]),
    poison=st.sampled_from(["none", "zeros", "nan", "inf"]),
    seed=st.integers(0, 2**16),
)
def test_flowcut_step_always_returns_valid_indices(keep, layer, scale, poison, seed) -> None:
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 2, 21, 4, generator=g, dtype=torch.float64) for _ in range(3))
    if poison == "zeros":
        q, k, v = q * 0, k * 0, v * 0
    elif poison in ("nan", "inf"):
        k[0, 0, 3] = float(poison)
    selector = FlowCutSelector(FlowCutConfig(keep=keep), keep=keep)
    selector.start(consume_layer=4)
    n = 20
    for i in range(layer + 1):
        idx = selector.step(i, q, k, v, scale, has_cls=True)
        if idx is None:
            continue
        assert keep <= idx.shape[1] <= n
        assert bool((idx[:, 1:] > idx[:, :-1]).all())  # ascending, unique
        assert bool(((idx >= 0) & (idx < n)).all())
        cols = torch.cat([torch.zeros(1, 1, dtype=torch.long), idx + 1], dim=1)[0]  # CLS + kept patches
        q, k, v = q[:, :, cols], k[:, :, cols], v[:, :, cols]
        n = idx.shape[1]


@SLOW
@given(keep=st.integers(-3, 90), layers=st.integers(3, 7))
def test_any_keep_on_a_tower_keeps_min_keep_patches_or_says_why(keep, layers) -> None:
    model = tiny.clip_tower(layers=layers, seed=layers)
    x = tiny.pixels(2, seed=keep % 7)
    if keep < 1:
        with pytest.raises(ValueError, match="keep must be >= 1"):
            vlmcut.prune(model, "flowcut", keep=keep)
        return
    with torch.no_grad(), vlmcut.prune(model, "flowcut", keep=keep) as h:
        out = model(x).last_hidden_state
    n = tiny.GRID**2
    assert h.kept_indices.shape == (2, min(keep, n))
    assert out.shape[1] == min(keep, n) + 1  # + CLS
    assert bool((h.kept_indices.diff(dim=1) > 0).all())


@SLOW
@given(
    picks=st.lists(st.integers(0, 4), min_size=1, max_size=4), method=st.sampled_from(["flowcut", "random"])
)
def test_any_batch_composition_gives_each_image_its_own_result(picks, method) -> None:
    model = tiny.clip_tower(layers=8, seed=1)
    pool = tiny.pixels(5, seed=21)
    with torch.no_grad(), vlmcut.prune(model, method, keep=7) as h:
        model(pool[picks])
        batch = h.kept_indices
        for row, p in enumerate(picks):
            model(pool[p : p + 1])
            assert torch.equal(batch[row : row + 1], h.kept_indices), (picks, row)


@SLOW
@given(height=st.integers(40, 70), width=st.integers(40, 70))
def test_llava_pixel_sizes_work_or_name_the_patch_grid(height, width) -> None:
    model = tiny.llava(seed=3)
    proc = tiny.processor()
    inputs = proc(images=tiny.images(1, 3), text=["USER: <image> what ? ASSISTANT:"], return_tensors="pt")
    pixels = torch.nn.functional.interpolate(inputs["pixel_values"], size=(height, width))
    with torch.no_grad(), vlmcut.prune(model, "flowcut", keep=9):
        if height % tiny.PATCH or width % tiny.PATCH:
            with pytest.raises(ValueError, match="not a multiple of the vision tower's patch size"):
                model(input_ids=inputs["input_ids"], pixel_values=pixels)
        elif (height, width) != (tiny.IMAGE, tiny.IMAGE):
            with pytest.raises(ValueError):  # the tower's own size check, as unpruned
                model(input_ids=inputs["input_ids"], pixel_values=pixels)
        else:
            assert math.isfinite(
                float(model(input_ids=inputs["input_ids"], pixel_values=pixels).logits.sum())
            )
