"""Figures, numbers and one self-contained HTML page from :func:`vlmcut.analysis.runner.analyze_tower`.

:func:`analyze_images` runs the analysis image by image (one image per forward, so FlowCut's batch-wide
prune count never mixes images) and hands the results to :func:`write_report`, which writes into
``out_dir``:

* PNG figures with fixed names (``fig2_*``, ``fig3_*``, ``fig4_*``, ``fig6_*``, ``fig7_*``, ``fig8_kept_*``),
  drawn with :mod:`vlmcut.analysis.plots` (per-layer curves are mean +- std over the images);
* ``analysis.json``: every per-layer number (mean and std over images, and per image), the kept indices of
  each method and the metadata;
* ``report.html``: the figures embedded as base64 and the numbers as tables; it needs no other file.

Same inputs give the same files (plots.py writes PNGs without timestamps; no run time is recorded).
"""

from __future__ import annotations

import base64
import html
import json
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from vlmcut.analysis.metrics import CRITERIA, value_norm_summary
from vlmcut.analysis.plots import (
    DPI,
    plot_criteria_overlap,
    plot_flow_maps,
    plot_layer_curves,
    plot_value_norm_boxes,
)
from vlmcut.analysis.runner import AnalysisResult, analyze_tower
from vlmcut.overlay import kept_patch_overlay, processed_image, side_by_side

__all__ = ["analyze_images", "image_preprocessor", "write_report"]

PixelFn = Callable[[Image.Image], tuple[Tensor, Image.Image]]
# Method names as shown in figures and tables.
_LABELS = {"flowcut": "FlowCut", "random": "random", "grid": "grid"}
# Pairs of criteria (indices into CRITERIA) reported as curves and table columns.
_PAIRS = ((0, 1), (0, 2), (1, 2))
# Side of each panel of the kept-token pictures, in pixels (keeps the PNGs small).
_PANEL = 224


# ------------------------------------------------------------------------------------ preprocessing
def image_preprocessor(processor_or_callable: Any) -> PixelFn:
    """Turn a processor into ``image -> (pixel_values (1, 3, H, W), image as the model sees it)``.

    Accepts a multimodal processor (uses its ``image_processor``), an image processor (anything with
    ``image_mean`` / ``image_std`` that is callable as ``proc(images=..., return_tensors="pt")``), or a
    plain callable ``image -> (3, H, W) or (1, 3, H, W)`` tensor (shown min-max scaled).
    """
    proc = getattr(processor_or_callable, "image_processor", processor_or_callable)
    if hasattr(proc, "image_mean") and hasattr(proc, "image_std"):

        def run(image: Image.Image) -> tuple[Tensor, Image.Image]:
            pv = proc(images=image.convert("RGB"), return_tensors="pt")["pixel_values"]
            pv = torch.as_tensor(pv)[:1]
            return pv, processed_image(pv[0], proc.image_mean, proc.image_std)

        return run
    if not callable(processor_or_callable):
        raise TypeError(f"expected a processor or a callable, got {type(processor_or_callable).__name__}")

    def run_callable(image: Image.Image) -> tuple[Tensor, Image.Image]:
        pv = torch.as_tensor(processor_or_callable(image))
        if pv.ndim == 3:
            pv = pv[None]
        if pv.ndim != 4 or pv.shape[0] != 1 or pv.shape[1] != 3:
            raise ValueError(f"the callable must return one (3, H, W) image, got shape {tuple(pv.shape)}")
        x = pv[0].detach().to(torch.float64)
        x = (x - x.min()) / (x.max() - x.min()).clamp_min(1e-12)
        arr = (x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        return pv, Image.fromarray(arr)

    return run_callable


def analyze_images(
    tower: nn.Module,
    processor_or_callable: Any,
    images: Mapping[str, Image.Image],
    out_dir: str | Path,
    keep: int = 64,
    *,
    methods: Sequence[str] = ("flowcut", "random", "grid"),
    feature_layer: int = -1,
    meta: Mapping[str, Any] | None = None,
) -> Path:
    """Analyse every image with :func:`analyze_tower` and write the report; returns ``out_dir/report.html``.

    ``images``: ``{name: PIL image}`` (names become file names, sanitised). ``meta``: extra key/values
    shown in the report and ``analysis.json`` (model, prompt, ...).
    """
    if not images:
        raise ValueError("images is empty")
    prep = image_preprocessor(processor_or_callable)
    results: dict[str, AnalysisResult] = {}
    views: dict[str, Image.Image] = {}
    for name, image in images.items():
        pixel_values, view = prep(image)
        results[name] = analyze_tower(
            tower, pixel_values, keep=keep, methods=methods, feature_layer=feature_layer
        )
        views[name] = view
    info = {"tower": type(tower).__name__, **(dict(meta) if meta else {})}
    return write_report(results, views, out_dir, meta=info)


# -------------------------------------------------------------------------------------- aggregation
def _stack(results: Mapping[str, AnalysisResult], get: Callable[[AnalysisResult], Tensor]) -> Tensor:
    """Per-image ``(1, L)`` results -> ``(S, L)`` (first image of each result's batch)."""
    return torch.stack([get(r)[0] for r in results.values()]).to(torch.float64)


def _layer_series(results: Mapping[str, AnalysisResult]) -> dict[str, Tensor]:
    """Every per-layer scalar metric as ``(S, L)`` over the images, keyed by a display name."""
    first = next(iter(results.values()))
    out: dict[str, Tensor] = {
        "entropy ratio": _stack(results, lambda r: r.entropy_ratio),
        "attn distance (argmax)": _stack(results, lambda r: r.attn_distance),
        "attn distance (weighted)": _stack(results, lambda r: r.attn_distance_weighted),
        "top-hub vote share": _stack(results, lambda r: r.hub_share),
        "global focus = top hub": _stack(results, lambda r: r.focus_is_top_hub),
        "global/hub top-5 overlap": _stack(results, lambda r: r.global_hub_overlap),
        "patches mirroring global focus": _stack(results, lambda r: r.patch_mirror_global),
    }
    if first.has_cls:
        out["patches whose top source is CLS"] = _stack(results, lambda r: r.patch_to_cls)  # type: ignore[arg-type,return-value]
    for i, j in _PAIRS:
        pair = f"{CRITERIA[i]} vs {CRITERIA[j]}"
        out[f"top-k overlap {pair}"] = _stack(results, lambda r, i=i, j=j: r.criteria.overlap[..., i, j])
        out[f"spearman {pair}"] = _stack(results, lambda r, i=i, j=j: r.criteria.spearman[..., i, j])
    out["value norm mean (no pruning)"] = _stack(results, lambda r: r.value_norm.mean(-1))
    for method in first.kept:
        out[f"value norm mean ({method})"] = torch.stack(
            [torch.stack([v[0].nanmean() for v in r.pruned_value_norm[method]]) for r in results.values()]
        )
    out["max/median token norm"] = _stack(
        results, lambda r: r.hidden_norm.max(-1).values / r.hidden_norm.median(-1).values
    )
    return out


def _finite(x: torch.Tensor) -> torch.Tensor:
    """The values of an image's row (rows are NaN-padded past the image's own token count)."""
    return x[~x.isnan()]


def _safe_name(name: str, taken: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_") or "image"
    out, i = base, 2
    while out in taken:
        out, i = f"{base}_{i}", i + 1
    taken.add(out)
    return out


def _spread(n_layers: int, count: int = 4) -> list[int]:
    """``count`` layer indices spread from the first to the last layer."""
    if n_layers <= count:
        return list(range(n_layers))
    return sorted({round(i * (n_layers - 1) / (count - 1)) for i in range(count)})


# ------------------------------------------------------------------------------------------ figures
def _plot_attention_rows(rows: Tensor, grid_hw: tuple[int, int], path: Path, title: str) -> Path:
    """Fig. 3 (right): the global token's attention over the patch grid, one panel per layer. rows: (L, N)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n_layers = rows.shape[0]
    ncols = min(n_layers, 6)
    nrows = -(-n_layers // ncols)
    fig = Figure(figsize=(1.7 * ncols, 1.8 * nrows + 0.4), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for layer, ax in enumerate(axes):
        if layer >= n_layers:
            ax.set_visible(False)
            continue
        row = rows[layer].to(torch.float64)
        ax.imshow((row / row.sum()).reshape(grid_hw).numpy(), cmap="viridis", interpolation="nearest")
        ax.set_title(f"layer {layer}", fontsize="x-small")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize="small")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=DPI, metadata={"Software": None})
    return path


def _compact(path: Path, colors: int = 256) -> Path:
    """Re-encode a matplotlib PNG as an optimised palette PNG (about 3-4x smaller; deterministic)."""
    with Image.open(path) as im:
        rgb = im.convert("RGB")
    rgb.quantize(colors=colors, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
        path, format="PNG", optimize=True
    )
    return path


def _kept_picture(view: Image.Image, result: AnalysisResult, path: Path) -> Path:
    """Fig. 8: the image as the model saw it, then each method's kept patches, side by side (palette PNG)."""
    base = view.convert("RGB").resize((_PANEL, _PANEL), Image.Resampling.BILINEAR)
    panels, labels = [base], ["input"]
    for method, kept in result.kept.items():
        panels.append(kept_patch_overlay(base, kept[0], result.grid_hw))
        labels.append(f"{_LABELS.get(method, method)} ({kept.shape[-1]})")
    picture = side_by_side(panels, labels)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.quantize(colors=128, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
        path, format="PNG", optimize=True
    )
    return path


def _figures(
    results: Mapping[str, AnalysisResult],
    views: Mapping[str, Image.Image],
    series: Mapping[str, Tensor],
    out: Path,
) -> dict[str, list[tuple[str, str]]]:
    """Draw every figure; -> ``{section: [(file name, caption)]}``."""
    first_name, first = next(iter(results.items()))
    stems: set[str] = set()
    stem = {name: _safe_name(name, stems) for name in results}
    n_layers = first.num_layers
    figs: dict[str, list[tuple[str, str]]] = {k: [] for k in ("insight1", "insight2", "insight3", "insight4")}
    figs.update({"density": [], "kept": []})

    def curves(keys: Sequence[str], file: str, ylabel: str, title: str) -> str:
        plot_layer_curves(
            {k: series[k].numpy() for k in keys if k in series}, out / file, ylabel=ylabel, title=title
        )
        return file

    # Insight 1 (Fig. 2 left): argmax inflow / outflow on the grid, first image, 4 layers.
    layers = _spread(n_layers)
    for direction, maps in (("in", first.inflow), ("out", first.outflow)):
        file = f"fig2_{direction}flow_{stem[first_name]}.png"
        plot_flow_maps(
            maps[0, layers],
            first.grid_hw,
            out / file,
            layers=layers,
            direction=direction,  # type: ignore[arg-type]
            title=f"information {direction}flow (argmax of head-averaged attention), {first_name}",
        )
        figs["insight1"].append(
            (file, f"Fig. 2 (left): argmax {direction}flow of every patch, {first_name}.")
        )
    # Insight 2: hub tokens and the global token's focus; attention distance (Fig. 3 left).
    hub_keys = [k for k in series if k.startswith(("top-hub", "global focus", "global/hub", "patches "))]
    figs["insight2"].append(
        (
            curves(hub_keys, "fig2_hub_agreement.png", "fraction", "hub tokens vs the global token"),
            "Hub tokens (the patch most patch queries attend to most) and the global token's focus.",
        )
    )
    figs["insight2"].append(
        (
            curves(
                ["attn distance (argmax)", "attn distance (weighted)"],
                "fig3_attention_distance.png",
                "distance (patches)",
                "mean attention distance of patch tokens",
            ),
            "Fig. 3 (left): distance from each patch to the patch it attends most (argmax), and weighted.",
        )
    )
    # Insight 3: entropy ratio (Fig. 3 middle) and the global attention maps (Fig. 3 right).
    figs["insight3"].append(
        (
            curves(
                ["entropy ratio"],
                "fig3_entropy_ratio.png",
                "entropy / log N",
                "entropy ratio of the global token's attention",
            ),
            "Fig. 3 (middle): normalised entropy of the global token's attention over the patches.",
        )
    )
    file = f"fig3_global_attention_{stem[first_name]}.png"
    _plot_attention_rows(
        first.global_attention[0], first.grid_hw, out / file, f"global token attention, {first_name}"
    )
    figs["insight3"].append((file, f"Fig. 3 (right): the global token's attention per layer, {first_name}."))
    # Insight 4 (Fig. 4): criteria agreement.
    overlap = torch.stack([r.criteria.overlap[0] for r in results.values()]).mean(0)  # (L, 3, 3)
    plot_criteria_overlap(
        overlap.numpy(),
        out / "fig4_criteria_overlap.png",
        layers=list(range(n_layers)),
        title=f"top-{first.criteria.k} overlap between criteria (mean over images)",
    )
    figs["insight4"].append(
        ("fig4_criteria_overlap.png", "Fig. 4: top-k overlap of the three criteria, per layer.")
    )
    pair_keys = [k for k in series if k.startswith("top-k overlap")]
    figs["insight4"].append(
        (
            curves(
                pair_keys,
                "fig4_criteria_overlap_curves.png",
                f"top-{first.criteria.k} overlap",
                "criteria agreement",
            ),
            "Top-k overlap per pair of criteria (mean +- std over images).",
        )
    )
    rank_keys = [k for k in series if k.startswith("spearman")]
    figs["insight4"].append(
        (
            curves(
                rank_keys, "fig4_criteria_spearman.png", "Spearman rho", "rank correlation between criteria"
            ),
            "Spearman rank correlation per pair of criteria.",
        )
    )
    # Figs. 6-7: value norms without pruning and of the tokens surviving each layer under FlowCut.
    density_keys = [k for k in series if k.startswith("value norm mean")]
    figs["density"].append(
        (
            curves(
                density_keys,
                "fig6_value_norm_mean.png",
                "mean value L1 norm",
                "information density per layer",
            ),
            "Fig. 6: mean value L1 norm of the tokens present at each layer, unpruned and per method.",
        )
    )
    boxes = {
        "no pruning": value_norm_summary(
            [torch.cat([r.value_norm[0, i] for r in results.values()]) for i in range(n_layers)]
        )
    }
    if "flowcut" in first.pruned_value_norm:
        boxes["FlowCut"] = value_norm_summary(
            [
                torch.cat([_finite(r.pruned_value_norm["flowcut"][i][0]) for r in results.values()])
                for i in range(n_layers)
            ]
        )
    plot_value_norm_boxes(
        boxes, out / "fig7_value_norm_boxes.png", title="value L1 norms (all images pooled)"
    )
    figs["density"].append(
        ("fig7_value_norm_boxes.png", "Fig. 7: value-norm box plots before / with FlowCut.")
    )
    figs["density"].append(
        (
            curves(
                ["max/median token norm"],
                "fig7_token_norm_ratio.png",
                "max / median",
                "largest patch-token norm relative to the median (artifact tokens)",
            ),
            "Output-token L2 norm: max over patches / median, per layer (high-norm artifact tokens).",
        )
    )
    for section in figs.values():
        for file, _ in section:
            _compact(out / file)
    # Fig. 8: kept tokens per image (already palette PNGs).
    for name, result in results.items():
        file = f"fig8_kept_{stem[name]}.png"
        _kept_picture(views[name], result, out / file)
        figs["kept"].append((file, name))
    return figs


# ---------------------------------------------------------------------------------------- tables/html
def _fmt(x: float) -> str:
    return "nan" if not np.isfinite(x) else f"{x:.3f}"


def _layer_table(series: Mapping[str, Tensor], keys: Sequence[str]) -> str:
    keys = [k for k in keys if k in series]
    if not keys:
        return ""
    n_layers = series[keys[0]].shape[1]
    head = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
    rows = []
    for layer in range(n_layers):
        cells = []
        for k in keys:
            col = series[k][:, layer].numpy()
            std = f" ± {_fmt(float(col.std()))}" if col.size > 1 else ""
            cells.append(f"<td>{_fmt(float(col.mean()))}{std}</td>")
        rows.append(f"<tr><td>{layer}</td>{''.join(cells)}</tr>")
    return f"<table><tr><th>layer</th>{head}</tr>{''.join(rows)}</table>"


def _img(out: Path, file: str, caption: str) -> str:
    data = base64.b64encode((out / file).read_bytes()).decode("ascii")
    return (
        f'<figure><img alt="{html.escape(file)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{html.escape(caption)} <code>{html.escape(file)}</code></figcaption></figure>"
    )


def _summary_json(
    results: Mapping[str, AnalysisResult], series: Mapping[str, Tensor], meta: Mapping[str, Any]
) -> dict[str, Any]:
    first = next(iter(results.values()))
    per_image = {}
    for name, r in results.items():
        per_image[name] = {
            "kept": {m: k[0].tolist() for m, k in r.kept.items()},
            "tokens_per_layer": r.tokens_per_layer,
            "hub_indices": r.hub_indices[0].tolist(),
            "hub_votes": r.hub_votes[0].tolist(),
            "global_focus": r.global_focus[0].tolist(),
            "entropy_ratio": r.entropy_ratio[0].tolist(),
        }
    return {
        "meta": dict(meta),
        "tower": {
            "family": first.family,
            "has_cls": first.has_cls,
            "grid_hw": list(first.grid_hw),
            "num_layers": first.num_layers,
            "num_heads": first.num_heads,
            "attn_implementation": first.attn_implementation,
        },
        "keep": first.keep,
        "criteria_k": first.criteria.k,
        "feature_layer": first.feature_layer,
        "consume_layer": first.consume_layer,
        "images": list(results),
        "layers": {
            k: {"mean": v.mean(0).tolist(), "std": v.std(0, unbiased=False).tolist(), "per_image": v.tolist()}
            for k, v in series.items()
        },
        "per_image": per_image,
    }


_CSS = (
    "body{font-family:sans-serif;max-width:1200px;margin:auto;padding:1em}"
    "table{border-collapse:collapse;font-size:12px;margin:0.5em 0 1.5em}"
    "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}"
    "figure{display:inline-block;margin:0.5em;vertical-align:top}img{max-width:100%}"
    "figcaption{font-size:12px;color:#444;max-width:700px}"
)

_SECTIONS = (
    (
        "insight1",
        "Insight 1: information flow (Fig. 2 left)",
        "Inflow = argmax of a patch's attention row (its primary source), outflow = argmax of its column "
        "(primary destination); red dots: the CLS token.",
        ["patches whose top source is CLS"],
    ),
    (
        "insight2",
        "Insight 2: the global token as relay, hub tokens (Fig. 2 right, Fig. 3 left)",
        "Hub = patch most often chosen as top patch key by the patch queries. Global focus = argmax of the "
        "global token's attention over the patches.",
        [
            "top-hub vote share",
            "global focus = top hub",
            "global/hub top-5 overlap",
            "patches mirroring global focus",
            "attn distance (argmax)",
            "attn distance (weighted)",
        ],
    ),
    (
        "insight3",
        "Insight 3: progressive concentration (Fig. 3 middle / right)",
        "Entropy ratio = H(a / sum a) / log N of the global attention row a (FlowCut's h).",
        ["entropy ratio"],
    ),
    (
        "insight4",
        "Insight 4: criteria disagree (Fig. 4)",
        "Top-k overlap and Spearman rho between the attention, semantic-relevance and value-norm rankings.",
        None,
    ),
    (
        "density",
        "Information density with pruning (Figs. 6, 7)",
        "Value L1 norm of the tokens present at each layer's input: unpruned, and the survivors per method.",
        None,
    ),
)


def write_report(
    results: Mapping[str, AnalysisResult],
    views: Mapping[str, Image.Image],
    out_dir: str | Path,
    meta: Mapping[str, Any] | None = None,
) -> Path:
    """Write figures, ``analysis.json`` and ``report.html`` for per-image results; returns the HTML path.

    ``results``: ``{image name: AnalysisResult of that one image}``; ``views``: the images as the model saw
    them (for the kept-token pictures), same keys.
    """
    if not results:
        raise ValueError("results is empty")
    missing = set(results) - set(views)
    if missing:
        raise ValueError(f"views lacks images {sorted(missing)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(meta or {})
    series = _layer_series(results)
    figs = _figures(results, views, series, out)
    summary = _summary_json(results, series, meta)
    (out / "analysis.json").write_text(json.dumps(summary, indent=1) + "\n")

    first = next(iter(results.values()))
    parts = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>FlowCut analysis</title>"
        f"<style>{_CSS}</style></head><body><h1>FlowCut information-flow analysis</h1>"
    ]
    info = {
        **meta,
        "family": first.family,
        "grid": f"{first.grid_hw[0]} x {first.grid_hw[1]}",
        "layers": first.num_layers,
        "keep": first.keep,
        "criteria top-k": first.criteria.k,
        "feature_layer": first.feature_layer,
        "consumed layer F": first.consume_layer,
        "attention implementation (restored)": first.attn_implementation,
        "images": ", ".join(results),
    }
    parts.append(
        "<table>"
        + "".join(
            f"<tr><th>{html.escape(str(k))}</th><td style='text-align:left'>{html.escape(str(v))}</td></tr>"
            for k, v in info.items()
        )
        + "</table>"
    )
    parts.append(
        "<p>Curves and tables: mean ± std over the images. Layer l = the attention of encoder layer l "
        "(its input tokens).</p>"
    )
    for key, title, text, table_keys in _SECTIONS:
        parts.append(f"<h2>{html.escape(title)}</h2><p>{html.escape(text)}</p>")
        parts.extend(_img(out, f, c) for f, c in figs[key])
        if key == "insight4":
            table_keys = [k for k in series if k.startswith(("top-k overlap", "spearman"))]
            chance = first.criteria.k / first.num_patches
            parts.append(
                f"<p>k = {first.criteria.k} of N = {first.num_patches}: two unrelated rankings overlap "
                f"by k / N = {chance:.3f} on average.</p>"
            )
        if key == "density":
            table_keys = [k for k in series if k.startswith(("value norm mean", "max/median"))]
        parts.append(_layer_table(series, table_keys or []))
    parts.append("<h2>Kept tokens per image (Fig. 8)</h2>")
    methods = list(first.kept)
    head = "".join(f"<th>{html.escape(_LABELS.get(m, m))} patches after each layer</th>" for m in methods)
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td>"
        + "".join(f"<td>{html.escape(str(r.tokens_per_layer[m]))}</td>" for m in methods)
        + "</tr>"
        for name, r in results.items()
    )
    parts.append(f"<table><tr><th>image</th>{head}</tr>{rows}</table>")
    parts.extend(_img(out, f, c) for f, c in figs["kept"])
    parts.append("</body></html>\n")
    path = out / "report.html"
    path.write_text("\n".join(parts))
    return path
