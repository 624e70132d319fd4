"""Analysis metrics (vlmcut.analysis.metrics) on constructed inputs with known answers, and plot smoke tests."""

from __future__ import annotations

import math

import pytest
import torch

from vlmcut.analysis import metrics as M

# ------------------------------------------------------------------------------------------ helpers
H, W = 3, 4  # a small non-square patch grid, so row/column mix-ups show
N = H * W


def _neighbour_target(i: int) -> int:
    """Right neighbour on the grid; the last column points to its left neighbour (no row wrap)."""
    return i + 1 if i % W != W - 1 else i - 1


def _flow_attn(has_cls: bool = True, peak: float = 5.0) -> torch.Tensor:
    """Softmax attention where every patch query attends most to `_neighbour_target`; CLS row uniform."""
    off = 1 if has_cls else 0
    t = N + off
    logits = torch.zeros(t, t, dtype=torch.float64)
    for i in range(N):
        logits[i + off, _neighbour_target(i) + off] = peak
    return logits.softmax(-1)  # (T, T)


def _all_to(target: int, t: int) -> torch.Tensor:
    logits = torch.zeros(t, t, dtype=torch.float64)
    logits[:, target] = 4.0
    return logits.softmax(-1)


# ------------------------------------------------------------------------------------ entropy ratio
def test_entropy_ratio_uniform_one_hot_and_zeros() -> None:
    assert M.attention_entropy_ratio(torch.full((7,), 0.3)).item() == pytest.approx(1.0, abs=1e-12)
    one_hot = torch.zeros(7)
    one_hot[3] = 0.2  # unnormalised on purpose: the row is renormalised over the patches
    assert M.attention_entropy_ratio(one_hot).item() == 0.0
    # Two equal non-zero entries among N: entropy log 2, the zeros contribute nothing.
    two = torch.tensor([0.0, 0.5, 0.0, 0.5])
    assert M.attention_entropy_ratio(two).item() == pytest.approx(math.log(2) / math.log(4))


def test_entropy_ratio_batched_and_errors() -> None:
    rows = torch.stack([torch.ones(5), torch.eye(5)[2]])  # (2, 5)
    out = M.attention_entropy_ratio(rows.expand(3, 2, 5))
    assert out.shape == (3, 2) and out.dtype == torch.float64
    assert torch.allclose(out, torch.tensor([1.0, 0.0], dtype=torch.float64).expand(3, 2))
    with pytest.raises(ValueError, match="N >= 2"):
        M.attention_entropy_ratio(torch.ones(1))
    with pytest.raises(ValueError, match="non-negative"):
        M.attention_entropy_ratio(torch.tensor([0.5, -0.1, 0.6]))
    with pytest.raises(ValueError, match="sums to zero"):
        M.attention_entropy_ratio(torch.zeros(4))
    with pytest.raises(ValueError, match="NaN"):
        M.attention_entropy_ratio(torch.tensor([0.5, float("nan")]))


# -------------------------------------------------------------------------------- attention distance
@pytest.mark.parametrize("has_cls", [True, False])
def test_mean_attention_distance_neighbour_flow_is_one(has_cls: bool) -> None:
    attn = _flow_attn(has_cls)
    d = M.mean_attention_distance(attn, (H, W), has_cls=has_cls)
    assert d.shape == () and d.item() == pytest.approx(1.0)
    per = M.mean_attention_distance(attn, (H, W), has_cls=has_cls, reduction="none")
    assert per.shape == (N,) and torch.allclose(per, torch.ones(N, dtype=torch.float64))
    # Leading dims (layers, heads) are kept.
    stacked = attn.expand(2, 3, *attn.shape)
    assert M.mean_attention_distance(stacked, (H, W), has_cls=has_cls).shape == (2, 3)


def test_mean_attention_distance_self_cls_and_weighted() -> None:
    t = N + 1
    eye = torch.eye(t, dtype=torch.float64) * 0.9 + 0.1 / t
    assert M.mean_attention_distance(eye, (H, W)).item() == 0.0  # everyone attends most to itself
    # CLS key excluded: a patch whose top key is CLS is measured to its top *patch* key.
    attn = _flow_attn()
    attn[1:, 0] = 10.0
    assert M.mean_attention_distance(attn, (H, W)).item() == pytest.approx(1.0)
    # exclude_self: on a diagonal map with the right neighbour second, the distance becomes 1.
    second = _flow_attn() * 0.5 + torch.eye(t, dtype=torch.float64)
    assert M.mean_attention_distance(second, (H, W)).item() == 0.0
    assert M.mean_attention_distance(second, (H, W), exclude_self=True).item() == pytest.approx(1.0)
    # Weighted mode with one-hot rows equals the argmax distance; uniform rows give the mean pair distance.
    hard = torch.zeros(t, t, dtype=torch.float64)
    for i in range(N):
        hard[i + 1, _neighbour_target(i) + 1] = 1.0
    hard[0, 0] = 1.0
    assert M.mean_attention_distance(hard, (H, W), mode="weighted").item() == pytest.approx(1.0)
    uni = torch.full((t, t), 1.0 / t, dtype=torch.float64)
    rr, cc = (torch.arange(N) // W).double(), (torch.arange(N) % W).double()
    pair = torch.sqrt((rr[:, None] - rr[None]) ** 2 + (cc[:, None] - cc[None]) ** 2).mean()
    assert M.mean_attention_distance(uni, (H, W), mode="weighted").item() == pytest.approx(pair.item())


def test_mean_attention_distance_patch_index_after_pruning() -> None:
    # Two surviving patches at grid cells 0 and 11 of the 3x4 grid, attending to each other.
    attn = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.1, 0.9], [0.0, 0.9, 0.1]])
    d = M.mean_attention_distance(attn, (H, W), patch_index=torch.tensor([0, 11]))
    assert d.item() == pytest.approx(math.hypot(2, 3))


def test_mean_attention_distance_errors() -> None:
    attn = _flow_attn()
    with pytest.raises(ValueError, match="12 patch tokens"):
        M.mean_attention_distance(attn, (4, 4))
    with pytest.raises(ValueError, match=r"\(\.\.\., T, T\)"):
        M.mean_attention_distance(attn[:, :-1], (H, W))
    with pytest.raises(ValueError, match="mode"):
        M.mean_attention_distance(attn, (H, W), mode="max")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="patch_index"):
        M.mean_attention_distance(attn, (H, W), patch_index=torch.arange(N) * 2)
    with pytest.raises(ValueError, match="grid_hw"):
        M.mean_attention_distance(attn, (H, 0))
    with pytest.raises(ValueError, match="non-negative"):
        M.mean_attention_distance(attn - 1.0, (H, W), mode="weighted")


# ------------------------------------------------------------------------------------ information flow
def test_information_flow_neighbour_maps() -> None:
    flow = M.information_flow(_flow_attn(), grid_hw=(H, W))
    expected_in = torch.tensor([_neighbour_target(i) for i in range(N)])
    assert torch.equal(flow.inflow, expected_in)
    # Outflow: key j is the top key of its left neighbour j-1 (j not in column 0); column W-2 is also the
    # top key of column W-1, the tie goes to the lower query. Column 0 gets the most from the uniform
    # CLS row (1/T beats the patch rows' off-peak mass), so its destination is CLS.
    expected_out = []
    for j in range(N):
        c = j % W
        expected_out.append(M.CLS_INDEX if c == 0 else j - 1)
    assert torch.equal(flow.outflow, torch.tensor(expected_out))
    assert flow.cls_inflow.item() == M.CLS_INDEX  # uniform CLS row: first maximum = CLS itself
    assert flow.inflow_grid.shape == (H, W) and flow.inflow_grid[0, 0].item() == 1
    assert flow.outflow_grid[1, 0].item() == M.CLS_INDEX


def test_information_flow_cls_options() -> None:
    attn = _flow_attn()
    attn[1:, 0] = 1.0  # every patch draws most from the CLS token (shallow-layer pattern, Fig. 2)
    assert (M.information_flow(attn).inflow == M.CLS_INDEX).all()
    no_cls = M.information_flow(attn, include_cls=False)
    assert torch.equal(no_cls.inflow, torch.tensor([_neighbour_target(i) for i in range(N)]))
    assert no_cls.cls_inflow is None
    plain = M.information_flow(_flow_attn(has_cls=False), has_cls=False)
    assert torch.equal(plain.inflow, torch.tensor([_neighbour_target(i) for i in range(N)]))
    eye = torch.eye(N + 1) + 0.01 * _flow_attn().float()
    assert torch.equal(M.information_flow(eye).inflow, torch.arange(N))
    assert torch.equal(
        M.information_flow(eye, exclude_self=True).inflow, M.information_flow(_flow_attn()).inflow
    )
    batched = M.information_flow(_flow_attn().expand(2, 4, N + 1, N + 1), grid_hw=(H, W))
    assert batched.inflow.shape == (2, 4, N) and batched.inflow_grid.shape == (2, 4, H, W)
    with pytest.raises(ValueError, match="no grid_hw"):
        _ = M.information_flow(_flow_attn()).inflow_grid
    with pytest.raises(ValueError, match="patch tokens"):
        M.information_flow(_flow_attn(), grid_hw=(5, 5))


def test_hub_tokens() -> None:
    hubs = M.hub_tokens(_all_to(5, 10), top=1, has_cls=False)
    assert hubs.indices.tolist() == [5] and hubs.votes.tolist() == [10]
    # With a CLS token, patch index 5 is token 6; the CLS query does not vote.
    hubs = M.hub_tokens(_all_to(6, 11), top=2)
    assert hubs.indices.tolist() == [5, 0] and hubs.votes.tolist() == [10, 0]
    # The CLS key is never a hub: all rows on CLS with patch 3 second -> hub 3.
    attn = _all_to(0, 11)
    attn[:, 4] += 0.01
    assert M.hub_tokens(attn).indices.tolist() == [3]
    # Per leading index.
    both = torch.stack([_all_to(2, 8), _all_to(7, 8)])
    assert M.hub_tokens(both, has_cls=False).indices.tolist() == [[2], [7]]
    with pytest.raises(ValueError, match="top"):
        M.hub_tokens(_all_to(5, 10), top=11, has_cls=False)


# ----------------------------------------------------------------------------------------- criteria
def test_topk_overlap_identical_and_reversed() -> None:
    s = torch.rand(20, generator=torch.Generator().manual_seed(0))
    for k in (1, 5, 10, 20):
        assert M.topk_overlap(s, s, k).item() == 1.0
    rev = -s
    for k in range(1, 11):
        assert M.topk_overlap(s, rev, k).item() == 0.0
    assert M.topk_overlap(s, rev, 20).item() == 1.0
    assert M.topk_overlap(torch.arange(4.0), torch.tensor([0.0, 1.0, 3.0, 2.0]), 2).item() == 1.0
    assert M.topk_overlap(torch.arange(4.0), torch.tensor([0.0, 3.0, 1.0, 2.0]), 2).item() == 0.5
    with pytest.raises(ValueError, match=r"k must be in \[1, N=20\]"):
        M.topk_overlap(s, s, 21)
    with pytest.raises(ValueError, match="k must be"):
        M.topk_overlap(s, s, 0)
    with pytest.raises(ValueError, match="same shape"):
        M.topk_overlap(s, s[:-1], 3)


def test_rank_correlations() -> None:
    a = torch.tensor([0.3, 0.1, 0.7, 0.2, 0.9, 0.5])
    assert M.spearman(a, a).item() == pytest.approx(1.0)
    assert M.spearman(a, -a).item() == pytest.approx(-1.0)
    assert M.kendall_tau(a, a).item() == pytest.approx(1.0)
    assert M.kendall_tau(a, -a).item() == pytest.approx(-1.0)
    # Monotone transforms do not change rank correlations.
    assert M.spearman(a, a.exp()).item() == pytest.approx(1.0)
    # Hand-computed values (scipy.stats gives rho = 0.8, tau = 2/3 for these).
    x, y = torch.arange(4.0), torch.tensor([1.0, 0.0, 2.0, 3.0])
    assert M.spearman(x, y).item() == pytest.approx(0.8)
    assert M.kendall_tau(x, y).item() == pytest.approx(2 / 3)
    # Ties: scipy gives rho = 0.9486832980505138 and tau-b = 0.9128709291752769.
    x, y = torch.tensor([1.0, 2.0, 2.0, 3.0]), torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert M.spearman(x, y).item() == pytest.approx(0.9486832980505138)
    assert M.kendall_tau(x, y).item() == pytest.approx(0.9128709291752769)
    assert math.isnan(M.spearman(torch.ones(4), x).item())
    batched = M.spearman(torch.stack([a, a]), torch.stack([a, -a]))
    assert torch.allclose(batched, torch.tensor([1.0, -1.0], dtype=torch.float64))


def test_criteria_rankings_and_disagreement() -> None:
    attn_row = torch.tensor([0.5, 0.2, 0.1, 0.15, 0.05])
    semantic = torch.tensor([0.1, 0.2, 0.3, 0.25, 0.15])
    vnorm = attn_row * 3.0  # same ranking as attention
    ranks = M.criteria_rankings(attn_row, semantic, vnorm)
    assert tuple(ranks) == M.CRITERIA
    assert ranks["attention"].tolist() == [0, 1, 3, 2, 4]
    assert ranks["semantic"].tolist() == [2, 3, 1, 4, 0]
    dis = M.criteria_disagreement(attn_row, semantic, vnorm, k=2)
    assert dis.names == M.CRITERIA and dis.k == 2
    assert dis.overlap.shape == (3, 3)
    assert torch.equal(dis.overlap.diagonal(), torch.ones(3, dtype=torch.float64))
    assert dis.overlap[0, 2].item() == 1.0 and dis.spearman[0, 2].item() == pytest.approx(1.0)
    assert dis.overlap[0, 1].item() == 0.0 and dis.overlap[1, 0].item() == 0.0  # top-2 {0, 1} vs {2, 3}
    assert dis.overlap[1, 2].item() == 0.0
    assert torch.allclose(dis.kendall, dis.kendall.T)
    per_layer = M.criteria_disagreement(attn_row.expand(4, 5), semantic.expand(4, 5), vnorm.expand(4, 5), k=3)
    assert per_layer.overlap.shape == (4, 3, 3) and per_layer.spearman.shape == (4, 3, 3)
    with pytest.raises(ValueError, match="same shape"):
        M.criteria_disagreement(attn_row, semantic[:4], vnorm, k=2)
    with pytest.raises(ValueError, match="k must be"):
        M.criteria_disagreement(attn_row, semantic, vnorm, k=6)


# -------------------------------------------------------------------------------------- value norms
def test_value_l1_norm() -> None:
    v = torch.zeros(2, 4, 3)  # (H, T, d)
    v[0, 1] = torch.tensor([1.0, -2.0, 3.0])
    v[1, 1] = torch.tensor([1.0, 2.0, 3.0])
    out = M.value_l1_norm(v)
    assert out.tolist() == [0.0, 4.0, 0.0, 0.0]  # mean over heads [1, 0, 3] -> L1 = 4
    with pytest.raises(ValueError, match="H, T, d"):
        M.value_l1_norm(torch.ones(4, 3))


def test_value_norm_summary_matches_numpy_and_matplotlib_conventions() -> None:
    layer0 = torch.arange(1.0, 10.0)  # 1..9: q1 3, median 5, q3 7, whiskers 1..9, no fliers
    layer1 = torch.tensor([1.0, 2.0, 3.0, 4.0, 100.0])  # 100 is a flier
    s = M.value_norm_summary([layer0, layer1.reshape(1, 5)])
    assert s.q1.tolist() == [3.0, 2.0] and s.median.tolist() == [5.0, 3.0] and s.q3.tolist() == [7.0, 4.0]
    assert s.whislo.tolist() == [1.0, 1.0] and s.whishi.tolist() == [9.0, 4.0]
    assert s.mean.tolist() == pytest.approx([5.0, 22.0]) and s.count.tolist() == [9, 5]
    assert s.fliers[0].numel() == 0 and s.fliers[1].tolist() == [100.0]
    stats = s.bxp_stats(["a", "b"])
    assert stats[1]["label"] == "b" and stats[1]["fliers"] == [100.0]
    # whis=0 with two points: no point is inside the box, whiskers fall back to the quartiles.
    s0 = M.value_norm_summary([torch.tensor([0.0, 4.0])], whis=0.0)
    assert s0.whislo.item() == 1.0 and s0.whishi.item() == 3.0 and s0.fliers[0].tolist() == [0.0, 4.0]
    with pytest.raises(ValueError, match="non-empty"):
        M.value_norm_summary([])
    with pytest.raises(ValueError, match="empty"):
        M.value_norm_summary([torch.ones(3), torch.ones(0)])


def test_value_norm_summary_agrees_with_matplotlib() -> None:
    cbook = pytest.importorskip("matplotlib.cbook")
    g = torch.Generator().manual_seed(1)
    layers = [torch.randn(50, generator=g).exp() for _ in range(3)]
    ours = M.value_norm_summary(layers).bxp_stats()
    ref = cbook.boxplot_stats([x.numpy() for x in layers])
    for a, b in zip(ours, ref, strict=True):
        for key in ("mean", "med", "q1", "q3", "whislo", "whishi"):
            assert a[key] == pytest.approx(float(b[key]))
        assert sorted(a["fliers"]) == pytest.approx(sorted(float(v) for v in b["fliers"]))


def test_metrics_module_needs_only_torch() -> None:
    import subprocess
    import sys

    code = "import sys, vlmcut.analysis.metrics; sys.exit(int('matplotlib' in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# -------------------------------------------------------------------------------------------- plots
def _is_png(path) -> bool:
    data = path.read_bytes()
    return len(data) > 100 and data[:8] == b"\x89PNG\r\n\x1a\n"


def test_plots_write_pngs(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    from vlmcut.analysis import plots as P

    g = torch.Generator().manual_seed(0)
    attn = torch.rand(4, N + 1, N + 1, generator=g).softmax(-1)  # (L, T, T)
    ent = M.attention_entropy_ratio(attn[:, 0, 1:])
    dist = M.mean_attention_distance(attn, (H, W))
    out = P.plot_layer_curves(
        {"entropy ratio": ent, "distance (2 images)": torch.stack([dist, dist + 0.1])},
        tmp_path / "curves.png",
        ylabel="value",
    )
    assert out == tmp_path / "curves.png" and _is_png(out)

    flow = M.information_flow(attn, grid_hw=(H, W))
    for style in ("arrows", "index"):
        for direction, maps in (("in", flow.inflow), ("out", flow.outflow)):
            name = tmp_path / f"flow_{style}_{direction}.png"
            p = P.plot_flow_maps(maps, (H, W), name, layers=[1, 2, 3, 4], direction=direction, style=style)
            assert _is_png(p)

    dis = M.criteria_disagreement(
        attn[:, 0, 1:], torch.rand(4, N, generator=g), torch.rand(4, N, generator=g), k=4
    )
    assert _is_png(P.plot_criteria_overlap(dis.overlap, tmp_path / "overlap.png", layers=[1, 2, 3, 4]))
    assert _is_png(P.plot_criteria_overlap(dis.spearman[0], tmp_path / "sub" / "rho.png", vmin=-1.0))

    before = M.value_norm_summary([torch.rand(N, generator=g) for _ in range(4)])
    after = M.value_norm_summary([torch.rand(n, generator=g) + 0.5 for n in (N, 8, 6, 4)])
    assert _is_png(P.plot_value_norm_boxes({"no pruning": before, "FlowCut": after}, tmp_path / "box.png"))

    image = torch.rand(3, 48, 64, generator=g)  # (C, H, W): 16-pixel patches on the 3x4 grid
    kept = {"FlowCut": torch.tensor([0, 5, 11]), "VisionZip": [1, 2, 6, 7], "none": []}
    assert _is_png(P.plot_kept_tokens(image, kept, (H, W), tmp_path / "kept.png"))
    assert _is_png(P.plot_kept_tokens(None, {"a": [3]}, (H, W), tmp_path / "kept_blank.png"))

    with pytest.raises(ValueError, match="distinct patch indices"):
        P.plot_kept_tokens(image, {"bad": [0, 12]}, (H, W), tmp_path / "x.png")
    with pytest.raises(ValueError, match="cells"):
        P.plot_flow_maps(flow.inflow, (4, 4), tmp_path / "x.png")
    with pytest.raises(ValueError, match=".png"):
        P.plot_layer_curves(ent, tmp_path / "x.jpg", ylabel="h")


def test_plots_are_deterministic(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    from vlmcut.analysis import plots as P

    ys = torch.linspace(1.0, 0.2, 6)
    a = P.plot_layer_curves(ys, tmp_path / "a.png", ylabel="h").read_bytes()
    b = P.plot_layer_curves(ys, tmp_path / "b.png", ylabel="h").read_bytes()
    assert a == b
