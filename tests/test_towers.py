"""FlowCut on bare vision towers: reference equality, schedule, identity, restore, isolation."""

from __future__ import annotations

import math

import pytest
import tiny
import torch
import transformers
from reference_release import release_forward

import vlmcut
from vlmcut.methods.flowcut import _flat_batch, entropy_ratio, layer_scores, prune_count


def _snapshot_hooks(model: torch.nn.Module) -> list:
    return [
        (name, dict(m._forward_hooks), dict(m._forward_pre_hooks), sorted(vars(m)))
        for name, m in model.named_modules()
    ]


def _class_dicts() -> dict:
    classes = [
        transformers.CLIPVisionModel,
        transformers.models.clip.modeling_clip.CLIPEncoderLayer,
        transformers.models.clip.modeling_clip.CLIPAttention,
        transformers.models.clip.modeling_clip.CLIPEncoder,
        torch.nn.Linear,
        torch.nn.Module,
    ]
    return {c: dict(vars(c)) for c in classes}


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("keep", [5, 16, 40])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_release_float64(attn: str, keep: int, seed: int) -> None:
    layers = 8
    model = tiny.clip_tower(layers=layers, attn=attn, seed=seed)
    x = tiny.pixels(3, seed=seed)
    with torch.no_grad():
        with vlmcut.prune(model, "flowcut", keep=keep, feature_layer=-2) as h:
            out = model(x, output_hidden_states=True)
            kept = h.kept_indices
        # the release runs one image at a time (its batch-max counts are not reproduced, SPEC)
        refs = [release_forward(model, x[b : b + 1], keep=keep, select_layer=layers - 2) for b in range(3)]
    assert torch.equal(kept, torch.cat([ref_keep for _, ref_keep in refs]))
    # transformers' eager kernel takes its softmax in float32 even for float64 inputs (the unpruned model
    # is 1e-8 off the float64 reference too); SDPA stays in float64.
    atol = 1e-6 if attn == "eager" else 1e-12
    for b, (ref_states, _) in enumerate(refs):
        assert len(out.hidden_states) == len(ref_states)
        for ours, ref in zip(out.hidden_states, ref_states, strict=True):
            t = ref.shape[1]  # images that keep fewer tokens than a neighbour are right-padded with zeros
            torch.testing.assert_close(ours[b : b + 1, :t], ref, rtol=0, atol=atol)
            assert not bool(ours[b, t:].any())
    # the layers a VLM consumes hold exactly K patches (+ CLS) for every image
    assert out.hidden_states[-2].shape[1] == out.hidden_states[-1].shape[1] == keep + 1


def test_schedule_counts_follow_entropy_rule() -> None:
    """Recompute the expected count after every layer from the published formula (SPEC "Schedule")."""
    layers, keep = 10, 6
    model = tiny.clip_tower(layers=layers, seed=3)
    x = tiny.pixels(2, seed=3)[1:]
    consume = layers - 1  # feature_layer=-1 reads the last layer's output
    with torch.no_grad():
        states, _ = release_forward(model, x, keep=keep, select_layer=consume)
        with vlmcut.prune(model, "flowcut", keep=keep) as h:
            model(x)
            counts = h.tokens_per_layer
    n0 = tiny.GRID**2
    assert len(counts) == layers
    assert counts[consume - 1] == keep and counts[-1] == keep
    expected, n = [], n0
    for i in range(layers):
        r = consume - 1 - i
        if n > keep and r >= 0 and r % 2 == 0:
            n = keep if r == 0 else max(n - _expected_drop(model, states[i], i, r, keep), keep)
        expected.append(n)
    assert counts == expected
    # The schedule really prunes progressively on these sharpened weights, not only at the end.
    assert len(set(counts)) > 2, counts


def _expected_drop(model, hidden: torch.Tensor, layer: int, r: int, keep: int) -> int:
    attn = model.encoder.layers[layer].self_attn
    x = model.encoder.layers[layer].layer_norm1(hidden)
    b, t, _ = x.shape
    q = attn.q_proj(x).view(b, t, attn.num_heads, -1).transpose(1, 2)
    k = attn.k_proj(x).view(b, t, attn.num_heads, -1).transpose(1, 2)
    a = torch.softmax(q[:, :, :1] @ k.transpose(-1, -2) * attn.scale, dim=-1)[:, :, 0, 1:].mean(1)
    n = a.shape[-1]
    p = a / a.sum(-1, keepdim=True)
    h = -(p * p.log()).sum(-1) / math.log(n)
    return int(round(float(((n - keep) / math.sqrt(r) * (1 - h**2)).max().detach())))


@pytest.mark.parametrize("builder", [tiny.clip_tower, tiny.siglip_tower, tiny.dinov2_tower])
def test_keep_all_is_identity(builder) -> None:
    model = builder()
    x = tiny.pixels(2)
    with torch.no_grad():
        ref = model(x, output_hidden_states=True)
        with vlmcut.prune(model, "flowcut", keep=tiny.GRID**2) as h:
            out = model(x, output_hidden_states=True)
        assert h.kept_indices.tolist() == [list(range(tiny.GRID**2))] * 2
    for a, b in zip(out.hidden_states, ref.hidden_states, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(out.pooler_output, ref.pooler_output)


@pytest.mark.parametrize("builder", [tiny.clip_tower, tiny.siglip_tower, tiny.dinov2_tower])
def test_prunes_every_supported_tower(builder) -> None:
    model = builder()
    x = tiny.pixels(2)
    with torch.no_grad(), vlmcut.prune(model, "flowcut", keep=7) as h:
        out = model(x, output_hidden_states=True)
    has_cls = not isinstance(model, transformers.SiglipVisionModel)
    assert out.last_hidden_state.shape[1] == 7 + int(has_cls)
    assert h.kept_indices.shape == (2, 7)
    assert bool((h.kept_indices.diff(dim=1) > 0).all())  # ascending, no repeats
    assert h.tokens_per_layer[-1] == 7


def test_remove_restores_exactly_and_touches_no_class() -> None:
    model = tiny.clip_tower()
    other = tiny.clip_tower(seed=1)
    x = tiny.pixels(2)
    with torch.no_grad():
        model(x, output_hidden_states=True)  # transformers installs its own capture hooks lazily, once
    before_hooks = _snapshot_hooks(model)
    before_classes = _class_dicts()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = model(x, output_hidden_states=True).last_hidden_state
        ref_other = other(x).last_hidden_state
        handle = vlmcut.prune(model, "flowcut", keep=5)
        assert _class_dicts() == before_classes
        pruned = model(x).last_hidden_state
        assert pruned.shape[1] == 6
        assert torch.equal(other(x).last_hidden_state, ref_other)  # a second instance is untouched
        handle.remove()
        handle.remove()  # idempotent
        after = model(x, output_hidden_states=True).last_hidden_state
    assert torch.equal(after, ref)
    assert _snapshot_hooks(model) == before_hooks
    assert _class_dicts() == before_classes
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    # and the model can be pruned again afterwards
    with vlmcut.prune(model, "flowcut", keep=5):
        pass


def test_context_manager_restores_on_error() -> None:
    model = tiny.clip_tower()
    before = _snapshot_hooks(model)
    with pytest.raises(RuntimeError, match="boom"), vlmcut.prune(model, "flowcut", keep=5):
        raise RuntimeError("boom")
    assert _snapshot_hooks(model) == before


def test_batch_of_identical_images_equals_one_image() -> None:
    model = tiny.clip_tower(seed=4)
    x = tiny.pixels(1, seed=4)
    with torch.no_grad(), vlmcut.prune(model, "flowcut", keep=9) as h:
        one = model(x).last_hidden_state
        one_idx, one_counts = h.kept_indices, h.tokens_per_layer
        many = model(x.expand(4, -1, -1, -1)).last_hidden_state
        assert h.tokens_per_layer == one_counts
        assert torch.equal(h.kept_indices, one_idx.expand(4, -1))
    for row in many:
        torch.testing.assert_close(row, one[0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("builder", [tiny.clip_tower, tiny.siglip_tower, tiny.dinov2_tower])
def test_each_image_of_a_batch_gets_what_it_gets_alone(builder) -> None:
    """SPEC: Eq. 3 per image. Images that disagree on their counts keep, in a batch, the tokens and the
    features they keep alone (the release's batch maximum made them depend on their neighbours)."""
    model = builder(layers=10, seed=5)
    xs = tiny.pixels(3, seed=5)
    with torch.no_grad(), vlmcut.prune(model, "flowcut", keep=6) as h:
        singles = []
        for i in range(3):
            out = model(xs[i : i + 1], output_hidden_states=True)
            singles.append((h.kept_indices, h.tokens_per_layer, out))
        batched = model(xs, output_hidden_states=True)
        kept, counts = h.kept_indices, h.tokens_per_layer
    firsts = [c[0] for _, c, _ in singles]
    if builder is tiny.clip_tower:
        assert len(set(firsts)) > 1, firsts  # the images really disagree at the first prune step
    assert torch.equal(kept, torch.cat([k for k, _, _ in singles]))
    assert counts == [max(c) for c in zip(*(c for _, c, _ in singles), strict=True)]
    for i, (_, _, alone) in enumerate(singles):
        torch.testing.assert_close(
            batched.last_hidden_state[i : i + 1], alone.last_hidden_state, rtol=0, atol=0
        )
        for ours, ref in zip(batched.hidden_states, alone.hidden_states, strict=True):
            torch.testing.assert_close(ours[i : i + 1, : ref.shape[1]], ref, rtol=0, atol=0)


def test_a_nan_image_does_not_stop_its_batch() -> None:
    """Eq. 2 at p = 0 is exact (0 log 0 = 0), and a non-finite image prunes nothing early, row by row."""
    from vlmcut.methods.flowcut import entropy_ratio, prune_count

    assert torch.isfinite(entropy_ratio(torch.tensor([[0.5, 0.5, 0.0, 0.0]]))).all()
    torch.testing.assert_close(entropy_ratio(torch.tensor([[0.5, 0.5, 0.0, 0.0]])), torch.tensor([0.5]))
    a = torch.tensor([[0.5, 0.5, 0.0, 0.0], [float("nan"), 0.2, 0.3, 0.5], [0.0, 0.0, 0.0, 0.0]])
    assert prune_count(a, remaining=1, keep=1).tolist() == [round(3 * 0.75), 0, 0]
    model = tiny.clip_tower(layers=6, seed=4)
    xs = tiny.pixels(3, seed=4)
    xs[1] = float("nan")
    with torch.no_grad(), vlmcut.prune(model, "flowcut", keep=6) as h:
        out = model(xs).last_hidden_state
        assert h.kept_indices.shape == (3, 6)
        alone = model(xs[2:]).last_hidden_state
    assert torch.isfinite(out[0]).all() and torch.isfinite(out[2]).all()
    torch.testing.assert_close(out[2:], alone, rtol=0, atol=0)


@pytest.mark.parametrize("builder", [tiny.clip_tower, tiny.siglip_tower, tiny.dinov2_tower])
def test_eager_and_sdpa_select_the_same_tokens(builder) -> None:
    x = tiny.pixels(2, seed=7)
    results = []
    for attn in ("eager", "sdpa"):
        model = builder(attn=attn, seed=7)
        with torch.no_grad(), vlmcut.prune(model, "flowcut", keep=11) as h:
            out = model(x).last_hidden_state
        results.append((h.kept_indices, h.tokens_per_layer, out))
    assert torch.equal(results[0][0], results[1][0])
    assert results[0][1] == results[1][1]
    # eager's float32 softmax (see above) is amplified by SigLIP's post-layernorm on these peaked weights
    torch.testing.assert_close(results[0][2], results[1][2], rtol=0, atol=1e-3)


def test_no_attention_matrix_is_requested() -> None:
    """The layer keeps its kernel: with SDPA no attention weights are materialised for scoring."""
    model = tiny.clip_tower(attn="sdpa")
    seen = []
    for layer in model.encoder.layers:
        layer.self_attn.register_forward_hook(lambda m, a, o: seen.append(o[1]))
    with torch.no_grad(), vlmcut.prune(model, "flowcut", keep=5):
        model(tiny.pixels(1))
    assert seen and all(w is None for w in seen)


def test_options_change_the_selection() -> None:
    model = tiny.clip_tower(layers=8, seed=8)
    x = tiny.pixels(2, seed=8)
    results = {}
    for name, opts in {
        "default": {},
        "paper": {"semantic_scaling": "paper"},
        "no_history": {"history_weight": 0.0},
        "interval1": {"prune_interval": 1},
        "last_only": {"prune_interval": 100},
    }.items():
        with torch.no_grad(), vlmcut.prune(model, "flowcut", keep=6, **opts) as h:
            model(x)
            results[name] = (h.kept_indices, h.tokens_per_layer)
    assert results["last_only"][1] == [64] * 6 + [6, 6]
    assert results["interval1"][1] != results["default"][1]
    assert any(not torch.equal(results[k][0], results["default"][0]) for k in ("paper", "no_history"))


def test_entropy_ratio_bounds() -> None:
    n = 50
    uniform = torch.full((1, n), 1.0 / n, dtype=torch.float64)
    # log(N) in the default float dtype (float32), as the release computes it
    assert float(entropy_ratio(uniform)) == pytest.approx(1.0, abs=1e-6)
    peaked = torch.full((1, n), 1e-30, dtype=torch.float64)
    peaked[0, 3] = 1.0
    assert float(entropy_ratio(peaked)) == pytest.approx(0.0, abs=1e-12)
    # uniform attention: nothing is redundant yet, nothing is dropped; one-hot: (N - K)/sqrt(r)
    assert prune_count(uniform, remaining=4, keep=10) == 0
    assert prune_count(peaked, remaining=4, keep=10) == 20


def test_scores_of_head_views_equal_contiguous_scores() -> None:
    """Adapters pass (B, T, H, d) projections viewed as (B, H, T, d): batches of such views are copied once
    for speed, single images are not, and the scores do not depend on the layout."""
    torch.manual_seed(0)
    b, t, h, d = 3, 17, 4, 8
    q, k, v = (torch.randn(b, t, h, d, dtype=torch.float64).transpose(1, 2) for _ in range(3))
    assert _flat_batch(k).is_contiguous() and not k.is_contiguous()
    single = k[:1]
    assert _flat_batch(single) is single  # B = 1: (B, H) flattens as is, no copy
    contiguous = k.contiguous()
    assert _flat_batch(contiguous) is contiguous
    for has_cls in (True, False):
        got = layer_scores(q, k, v, 0.3, has_cls)
        want = layer_scores(q.contiguous(), k.contiguous(), v.contiguous(), 0.3, has_cls)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-15)
        one = layer_scores(q[1:2], k[1:2], v[1:2], 0.3, has_cls)  # a batch row scores as the image alone
        torch.testing.assert_close(one[0], got[0][1:2], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"keep": 0}, ValueError, "keep must be >= 1"),
        ({"keep": -3}, ValueError, "keep must be >= 1"),
        ({"keep": 2.5}, TypeError, "keep must be an int"),
        ({"keep": True}, TypeError, "keep must be an int"),
        ({"keep": 8, "semantic_scaling": "x"}, ValueError, "semantic_scaling"),
        ({"keep": 8, "history_weight": 1.0}, ValueError, "history_weight"),
        ({"keep": 8, "history_weight": float("nan")}, ValueError, "history_weight"),
        ({"keep": 8, "prune_interval": 0}, ValueError, "prune_interval"),
        ({"keep": 8, "feature_layer": 1}, ValueError, "feature_layer >= 2"),
        ({"keep": 8, "feature_layer": 99}, ValueError, "out of range"),
        ({"keep": 8, "bogus": 1}, TypeError, "unknown option"),
    ],
)
def test_bad_options_raise_clear_errors(kwargs, exc, match) -> None:
    model = tiny.clip_tower()
    with pytest.raises(exc, match=match):
        vlmcut.prune(model, "flowcut", **kwargs)
    assert all(not m._forward_hooks for m in model.modules())


def test_unknown_method_and_model() -> None:
    with pytest.raises(ValueError, match="available"):
        vlmcut.prune(tiny.clip_tower(), "nope", keep=4)
    with pytest.raises(TypeError, match="supported models"):
        vlmcut.prune(torch.nn.Linear(3, 3), "flowcut", keep=4)


def test_double_prune_is_refused() -> None:
    model = tiny.clip_tower()
    with vlmcut.prune(model, "flowcut", keep=4), pytest.raises(RuntimeError, match="remove"):
        vlmcut.prune(model, "flowcut", keep=4)


def test_batch_with_attention_maps_and_hidden_states_joins_padded() -> None:
    """output_attentions on a batch whose images keep different counts: each image's maps as alone,
    zero-padded to the largest in both token dims."""
    model = tiny.clip_tower(layers=10, seed=5, attn="eager")
    xs = tiny.pixels(3, seed=5)
    with torch.no_grad(), vlmcut.prune(model, "flowcut", keep=6):
        batch = model(xs, output_attentions=True, output_hidden_states=True)
        alone = [model(xs[i : i + 1], output_attentions=True) for i in range(3)]
    shapes = {tuple(a.shape[2:]) for one in alone for a in one.attentions[:3]}
    assert len(shapes) > 1  # the images really differ in the early layers
    for i, one in enumerate(alone):
        for ours, ref in zip(batch.attentions, one.attentions, strict=True):
            t = ref.shape[-1]
            torch.testing.assert_close(ours[i : i + 1, :, :t, :t], ref, rtol=0, atol=0)
            assert not bool(ours[i, :, t:].any()) and not bool(ours[i, :, :, t:].any())


@pytest.mark.parametrize("reentrant", [False, True])
def test_two_forwards_then_one_backward_under_checkpointing(reentrant) -> None:
    """A loss over two pruned forwards (chosen / rejected pairs, contrastive losses) with activation
    checkpointing: the backward recomputes both forwards' layers with their own recorded choices."""
    from vlmcut.compat import disable_checkpointing, enable_checkpointing

    model = tiny.clip_tower(layers=8, seed=5).train()
    a, b = tiny.pixels(2, seed=5), tiny.pixels(2, seed=6)

    def grads() -> dict[str, torch.Tensor]:
        model.zero_grad()
        with vlmcut.prune(model, "flowcut", keep=8, feature_layer=-2):
            loss = model(a).pooler_output.sum() + model(b).pooler_output.pow(2).sum()
            loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    enable_checkpointing(model, use_reentrant=reentrant)
    try:
        checkpointed = grads()
    finally:
        disable_checkpointing(model)
    assert plain.keys() == checkpointed.keys() and plain
    for name, g in plain.items():
        torch.testing.assert_close(checkpointed[name], g, rtol=1e-10, atol=1e-12)
