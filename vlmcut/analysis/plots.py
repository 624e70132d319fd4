"""Matplotlib figures for the section-2 analyses and the kept-token visualisation (Figs. 2, 3, 4, 7, 8).

Every function takes results from :mod:`vlmcut.analysis.metrics` (or plain tensors / arrays), writes
one PNG to the path the caller gives (parent folders are created) and returns that path. Figures are
built with ``matplotlib.figure.Figure`` and the Agg canvas directly, never through ``pyplot``: nothing
is displayed, no global backend is switched and no figure is left open. matplotlib is imported inside
the functions so that the metrics module (and this one, at import time) needs only torch and numpy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from vlmcut.analysis.metrics import CLS_INDEX, CRITERIA, ValueNormSummary

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "plot_criteria_overlap",
    "plot_flow_maps",
    "plot_kept_tokens",
    "plot_layer_curves",
    "plot_value_norm_boxes",
]

ArrayLike = Any  # torch.Tensor | np.ndarray | Sequence[float]
# Fixed resolution and no "Software" stamp, so that the same inputs give the same bytes.
DPI = 120
_SAVE_METADATA = {"Software": None}


def _np(x: ArrayLike, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu")
        x = x.to(torch.float64) if x.is_floating_point() else x
        return x.numpy()
    try:
        return np.asarray(x)
    except Exception as err:  # any conversion failure means a bad argument
        raise ValueError(f"{name} cannot be converted to an array: {err}") from err


def _new_figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)  # attach the Agg canvas explicitly: no pyplot, no display
    return fig


def _save(fig: Figure, path: str | Path) -> Path:
    out = Path(path)
    if out.suffix.lower() != ".png":
        raise ValueError(f"path must end in .png, got {str(path)!r}")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=DPI, metadata=_SAVE_METADATA)
    return out


def _labels(labels: Sequence[object] | None, n: int, name: str, default_start: int = 0) -> list[str]:
    if labels is None:
        return [str(default_start + i) for i in range(n)]
    if len(labels) != n:
        raise ValueError(f"{name} has {len(labels)} entries, expected {n}")
    return [str(v) for v in labels]


def _grid_shape(grid_hw: Sequence[int], n: int | None = None) -> tuple[int, int]:
    if not isinstance(grid_hw, Sequence) or len(grid_hw) != 2 or min(int(v) for v in grid_hw) < 1:
        raise ValueError(f"grid_hw must be two positive integers, got {grid_hw!r}")
    h, w = int(grid_hw[0]), int(grid_hw[1])
    if n is not None and h * w != n:
        raise ValueError(f"grid_hw={(h, w)} has {h * w} cells but the maps have {n} tokens")
    return h, w


# ------------------------------------------------------------------------------ Fig. 3: layer curves
def plot_layer_curves(
    curves: Mapping[str, ArrayLike] | ArrayLike,
    path: str | Path,
    *,
    ylabel: str,
    title: str | None = None,
    xlabel: str = "layer",
    layers: Sequence[int] | None = None,
) -> Path:
    """Per-layer curves, e.g. entropy ratio (Fig. 3 middle) or attention distance (Fig. 3 left).

    ``curves``: one ``(L,)`` array, or ``{label: values}``. A ``(S, L)`` value (S images) is drawn as its
    mean with a +-1 std band. ``layers``: x positions (default ``0..L-1``).
    """
    series = dict(curves) if isinstance(curves, Mapping) else {"": curves}
    if not series:
        raise ValueError("curves is empty")
    fig = _new_figure(6.0, 3.6)
    ax = fig.add_subplot()
    for label, values in series.items():
        y = _np(values, f"curves[{label!r}]").astype(np.float64)
        if y.ndim not in (1, 2) or y.shape[-1] == 0:
            raise ValueError(f"curves[{label!r}] must have shape (L,) or (S, L), got {y.shape}")
        x = np.asarray(layers if layers is not None else range(y.shape[-1]), dtype=np.float64)
        if x.shape != (y.shape[-1],):
            raise ValueError(f"layers has {x.size} entries but curves[{label!r}] has {y.shape[-1]} layers")
        mean = y if y.ndim == 1 else y.mean(0)
        (line,) = ax.plot(x, mean, marker="o", markersize=3, label=label or None)
        if y.ndim == 2 and y.shape[0] > 1:
            std = y.std(0)
            ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if any(series):
        ax.legend(fontsize="small")
    return _save(fig, path)


# ---------------------------------------------------------------------------------- Fig. 2: flows
def plot_flow_maps(
    maps: ArrayLike,
    grid_hw: Sequence[int],
    path: str | Path,
    *,
    layers: Sequence[object] | None = None,
    direction: Literal["in", "out"] = "in",
    style: Literal["arrows", "index"] = "arrows",
    title: str | None = None,
) -> Path:
    """Argmax flow maps on the patch grid, one panel per chosen layer (Fig. 2, left).

    ``maps``: ``(L, N)`` (or ``(N,)``) patch-index maps as ``FlowMaps.inflow`` / ``.outflow`` stacked over
    the chosen layers, :data:`~vlmcut.analysis.metrics.CLS_INDEX` for the CLS token. ``layers``: panel
    labels. ``style="arrows"`` draws the flow of information: for ``direction="in"`` from each token's
    primary source to the token, for ``"out"`` from the token to its primary destination; tokens whose
    partner is the CLS token get a red dot, self-loops a grey ring. ``style="index"`` shows the
    partner's patch index as a heatmap (CLS in red).
    """
    m = _np(maps, "maps")
    if m.ndim == 1:
        m = m[None]
    if m.ndim != 2 or not np.issubdtype(m.dtype, np.integer):
        raise ValueError(f"maps must be an integer array of shape (L, N), got {m.dtype} {m.shape}")
    n_layers, n = m.shape
    h, w = _grid_shape(grid_hw, n)
    if ((m < CLS_INDEX) | (m >= n)).any():
        raise ValueError(f"maps values must be patch indices in [0, {n}) or CLS_INDEX={CLS_INDEX}")
    if direction not in ("in", "out") or style not in ("arrows", "index"):
        raise ValueError(f"bad direction={direction!r} or style={style!r}")
    if n_layers == 0:
        raise ValueError("maps has no layers")
    names = _labels(layers, n_layers, "layers")
    import matplotlib as mpl

    cmap = mpl.colormaps["viridis"].with_extremes(bad="red")  # CLS partner: masked, drawn red
    ncols = min(n_layers, 4)
    nrows = math.ceil(n_layers / ncols)
    fig = _new_figure(3.2 * ncols + (0.8 if style == "index" else 0.0), 3.2 * nrows + 0.3)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    rows, cols = np.divmod(np.arange(n), w)
    for ax, target, name in zip(axes, m, names, strict=False):
        ax.set_title(f"layer {name}", fontsize="small")
        ax.set_xlim(-0.5, w - 0.5)
        ax.set_ylim(h - 0.5, -0.5)  # row 0 at the top, as the image
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
        is_cls = target == CLS_INDEX
        if style == "index":
            img = np.ma.masked_array(target.reshape(h, w).astype(np.float64), mask=is_cls.reshape(h, w))
            im = ax.imshow(img, cmap=cmap, vmin=0, vmax=max(n - 1, 1), interpolation="nearest")
            continue
        tr, tc = np.divmod(np.where(is_cls, 0, target), w)
        is_self = (target == np.arange(n)) & ~is_cls
        moving = ~is_cls & ~is_self
        src_r, src_c = (tr, tc) if direction == "in" else (rows, cols)
        dst_r, dst_c = (rows, cols) if direction == "in" else (tr, tc)
        ax.quiver(
            src_c[moving],
            src_r[moving],
            (dst_c - src_c)[moving],
            (dst_r - src_r)[moving],
            angles="xy",
            scale_units="xy",
            scale=1,
            width=0.006,
            color="tab:blue",
        )
        ax.scatter(cols[is_cls], rows[is_cls], s=8, color="red", label="CLS")
        ax.scatter(cols[is_self], rows[is_self], s=14, facecolors="none", edgecolors="grey", label="self")
    for ax in axes[n_layers:]:
        ax.set_visible(False)
    if style == "index":
        fig.colorbar(im, ax=list(axes[:n_layers]), shrink=0.8, label="partner patch index (red: CLS)")
    fig.suptitle(title or f"information {direction}flow (argmax)", fontsize="medium")
    return _save(fig, path)


# ------------------------------------------------------------------------------- Fig. 4: criteria
def plot_criteria_overlap(
    matrix: ArrayLike,
    path: str | Path,
    *,
    names: Sequence[str] = CRITERIA,
    layers: Sequence[object] | None = None,
    title: str | None = None,
    vmin: float = 0.0,
    vmax: float = 1.0,
) -> Path:
    """Heatmaps of pairwise criterion agreement, one per layer (Fig. 4).

    ``matrix``: ``(L, C, C)`` or ``(C, C)``, e.g. ``CriteriaDisagreement.overlap`` (use ``vmin=-1`` for
    ``.spearman`` / ``.kendall``). Cells are annotated with their value.
    """
    mat = _np(matrix, "matrix").astype(np.float64)
    if mat.ndim == 2:
        mat = mat[None]
    if mat.ndim != 3 or mat.shape[1] != mat.shape[2] or mat.shape[0] == 0:
        raise ValueError(f"matrix must have shape (L, C, C) or (C, C), got {mat.shape}")
    n_layers, c = mat.shape[0], mat.shape[1]
    if len(names) != c:
        raise ValueError(f"names has {len(names)} entries for {c} criteria")
    if not vmin < vmax:
        raise ValueError(f"need vmin < vmax, got {vmin}, {vmax}")
    panel_titles = _labels(layers, n_layers, "layers")
    ncols = min(n_layers, 4)
    nrows = math.ceil(n_layers / ncols)
    fig = _new_figure(2.9 * ncols + 0.8, 2.9 * nrows + 0.3)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, mm, name in zip(axes, mat, panel_titles, strict=False):
        im = ax.imshow(mm, cmap="magma", vmin=vmin, vmax=vmax)
        ax.set_xticks(range(c), labels=list(names), rotation=30, fontsize="x-small")
        ax.set_yticks(range(c), labels=list(names), fontsize="x-small")
        ax.set_title(f"layer {name}", fontsize="small")
        mid = (vmin + vmax) / 2
        for i in range(c):
            for j in range(c):
                v = mm[i, j]
                colour = "black" if np.isfinite(v) and v > mid else "white"
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize="x-small", color=colour)
    for ax in axes[n_layers:]:
        ax.set_visible(False)
    fig.colorbar(im, ax=list(axes[:n_layers]), shrink=0.8)
    if title:
        fig.suptitle(title, fontsize="medium")
    return _save(fig, path)


# ---------------------------------------------------------------------------- Fig. 7: value norms
def plot_value_norm_boxes(
    summaries: Mapping[str, ValueNormSummary] | ValueNormSummary,
    path: str | Path,
    *,
    layers: Sequence[object] | None = None,
    ylabel: str = "value L1 norm",
    show_fliers: bool = False,
    title: str | None = None,
) -> Path:
    """Box plots of per-layer value L1 norms, one panel per summary (Fig. 7: before / after pruning).

    ``summaries``: e.g. ``{"no pruning": s0, "FlowCut": s1}`` from
    :func:`~vlmcut.analysis.metrics.value_norm_summary`; all must have the same number of layers.
    Panels share the y axis so the shift in magnitude is visible. Means are drawn as triangles.
    """
    series = dict(summaries) if isinstance(summaries, Mapping) else {"": summaries}
    if not series:
        raise ValueError("summaries is empty")
    for label, s in series.items():
        if not isinstance(s, ValueNormSummary):
            raise ValueError(f"summaries[{label!r}] is not a ValueNormSummary")
    n_layers = {s.mean.numel() for s in series.values()}
    if len(n_layers) != 1:
        raise ValueError(f"summaries have different layer counts: {sorted(n_layers)}")
    names = _labels(layers, n_layers.pop(), "layers")
    fig = _new_figure(min(max(3.5, 0.3 * len(names) + 1.5), 7.0) * len(series), 3.6)
    axes = fig.subplots(1, len(series), sharey=True, squeeze=False).ravel()
    for ax, (label, s) in zip(axes, series.items(), strict=True):
        ax.bxp(s.bxp_stats(names), showmeans=True, showfliers=show_fliers, patch_artist=False)
        ax.set_xlabel("layer")
        ax.tick_params(axis="x", labelsize="x-small", rotation=90 if len(names) > 12 else 0)
        if label:
            ax.set_title(label, fontsize="small")
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].set_ylabel(ylabel)
    if title:
        fig.suptitle(title, fontsize="medium")
    return _save(fig, path)


# ----------------------------------------------------------------------- Fig. 8: kept-token overlay
def _image_hwc(image: Any) -> np.ndarray:
    """Image as a float (H, W, 3) array in [0, 1]; accepts tensors (C,H,W)/(H,W,C)/(H,W), arrays, PIL."""
    if hasattr(image, "convert") and hasattr(image, "size"):  # PIL.Image without importing PIL here
        image = np.asarray(image.convert("RGB"))
    arr = _np(image, "image")
    if (
        isinstance(image, torch.Tensor)
        and arr.ndim == 3
        and arr.shape[0] in (1, 3)
        and arr.shape[-1] not in (1, 3)
    ):
        arr = np.moveaxis(arr, 0, -1)  # torch images are channels-first
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4) or 0 in arr.shape:
        raise ValueError(f"image must be (H, W), (H, W, C) or (C, H, W) with 1/3/4 channels, got {arr.shape}")
    arr = arr[..., :3]
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    if np.issubdtype(arr.dtype, np.integer):
        return arr.astype(np.float64) / 255.0
    arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        raise ValueError("image contains NaN or infinite values")
    return np.clip(arr, 0.0, 1.0)


def plot_kept_tokens(
    image: Any,
    kept: Mapping[str, ArrayLike],
    grid_hw: Sequence[int],
    path: str | Path,
    *,
    dim: float = 0.25,
    outline: bool = True,
    title: str | None = None,
) -> Path:
    """The image with each method's kept patches highlighted, methods side by side (Fig. 8).

    ``image``: the (preprocessed) image the patch grid covers, as a tensor ``(3, H, W)`` / ``(H, W, 3)``,
    an array or a PIL image, or ``None`` for a grey canvas. ``kept``: ``{method: kept patch indices}``
    (row-major on ``grid_hw``, e.g. the ground-truth kept indices recorded by the pruner). Pruned
    patches are dimmed to ``dim`` of their brightness, kept ones are outlined.
    """
    if not kept:
        raise ValueError("kept is empty")
    if not 0.0 <= dim <= 1.0:
        raise ValueError(f"dim must be in [0, 1], got {dim}")
    h, w = _grid_shape(grid_hw)
    img = np.full((h * 16, w * 16, 3), 0.6) if image is None else _image_hwc(image)
    ih, iw = img.shape[:2]
    ph, pw = ih / h, iw / w  # patch size in pixels (need not be an integer after resizing)
    masks = {}
    for method, idx in kept.items():
        k = _np(idx, f"kept[{method!r}]").reshape(-1)
        if k.size and not np.issubdtype(k.dtype, np.integer):
            raise ValueError(f"kept[{method!r}] must hold integer patch indices")
        k = k.astype(np.int64)
        if ((k < 0) | (k >= h * w)).any() or np.unique(k).size != k.size:
            raise ValueError(f"kept[{method!r}] must hold distinct patch indices in [0, {h * w})")
        mask = np.zeros(h * w, dtype=bool)
        mask[k] = True
        masks[method] = mask.reshape(h, w)

    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Rectangle

    ncols = len(masks)
    aspect = ih / iw
    fig = _new_figure(3.2 * ncols, 3.2 * aspect + 0.5)
    axes = fig.subplots(1, ncols, squeeze=False).ravel()
    for ax, (method, mask) in zip(axes, masks.items(), strict=True):
        # Upsample the patch mask to pixels by index lookup (works for non-integer patch sizes).
        pix_r = np.minimum((np.arange(ih) / ph).astype(np.int64), h - 1)
        pix_c = np.minimum((np.arange(iw) / pw).astype(np.int64), w - 1)
        keep_px = mask[pix_r[:, None], pix_c[None, :]]
        shown = np.where(keep_px[..., None], img, img * dim)
        ax.imshow(shown, interpolation="nearest")
        if outline and mask.any():
            r, c = np.nonzero(mask)
            rects = [Rectangle((cc * pw - 0.5, rr * ph - 0.5), pw, ph) for rr, cc in zip(r, c, strict=True)]
            ax.add_collection(PatchCollection(rects, facecolor="none", edgecolor="yellow", linewidth=0.5))
        ax.set_title(f"{method} ({int(mask.sum())} kept)", fontsize="small")
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize="medium")
    return _save(fig, path)
