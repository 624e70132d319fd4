"""``vlmcut analyze``: the section-2 information-flow analysis of a model's vision tower, as an HTML report.

Registered by ``vlmcut/cli/__init__.py`` through :func:`add_parser`. Examples::

    vlmcut analyze --model path/to/llava --image cat.jpg --prompt "What is this?" --keep 64 --out report/
    vlmcut analyze --zoo --images scikit-image --keep 64 --out docs/analysis
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from PIL import Image

__all__ = ["SKIMAGE_PHOTOS", "add_parser", "load_tower", "run_analyze", "scene_images", "skimage_photos"]

# Colour (or grey) photographs shipped inside scikit-image (no download needed).
SKIMAGE_PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "stereo_motorcycle",
    "camera",
    "hubble_deep_field",
    "immunohistochemistry",
)


def skimage_photos(names: tuple[str, ...] = SKIMAGE_PHOTOS) -> dict[str, Image.Image]:
    """``{name: RGB image}`` of scikit-image sample photos (``stereo_motorcycle``: its left view)."""
    import numpy as np
    from skimage import data

    out = {}
    for name in names:
        arr = getattr(data, name)()
        if isinstance(arr, tuple):
            arr = arr[0]
        arr = np.asarray(arr)
        if arr.dtype == bool:
            arr = arr.astype(np.uint8) * 255
        image = Image.fromarray(arr)
        out[name.removeprefix("stereo_")] = image.convert("RGB")
    return out


def scene_images(n: int, split: str = "validation") -> dict[str, Image.Image]:
    """The images of the first ``n`` distinct synthetic scenes of ``vlmcut.eval.scenes``."""
    from vlmcut.eval.scenes import load_scenes

    out: dict[str, Image.Image] = {}
    if n <= 0:
        return out
    samples = 8 * n
    for _ in range(6):  # each scene has several questions; grow the request until n scenes are covered
        for sample in load_scenes(split, n=samples):
            key = f"scene_{str(sample.scene_id).rsplit('-', 1)[-1]}"
            if key not in out:
                out[key] = sample.image.convert("RGB")
            if len(out) == n:
                return out
        samples *= 4
    return out


def _feature_index(model: Any) -> int:
    """LLaVA's ``vision_feature_layer`` as one hidden-state index (for a list: the earliest layer read)."""
    value = getattr(model.config, "vision_feature_layer", -2)
    if isinstance(value, (list, tuple)):
        states = model.config.vision_config.num_hidden_layers + 1
        return int(min(value, key=lambda h: h if h >= 0 else states + h))
    return int(value)


def load_tower(model_dir: str | Path, dtype: str = "float32") -> tuple[Any, Any, int, str]:
    """``(vision tower, processor, feature_layer, kind)`` from a local LLaVA or bare vision tower directory."""
    from vlmcut.inference import model_config

    path = Path(model_dir)
    config = model_config(path)
    if "vision_config" in config or "llava" in str(config.get("model_type", "")):
        from vlmcut.inference import load_llava

        model, processor = load_llava(path, dtype=dtype)
        layer = _feature_index(model)
        return model.model.vision_tower, processor, layer, "llava"
    import torch
    from transformers import AutoImageProcessor, AutoModel

    tower = AutoModel.from_pretrained(path, local_files_only=True, dtype=getattr(torch, dtype)).eval()
    processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
    return tower, processor, -1, "tower"


def run_analyze(args: argparse.Namespace) -> int:
    """Entry point of ``vlmcut analyze``; returns the exit status (2, with one line on stderr, for a bad
    argument: see :func:`vlmcut.cli.report_errors`)."""
    from vlmcut.cli import report_errors

    return report_errors("analyze", _analyze, args)


def _analyze(args: argparse.Namespace) -> int:
    """``vlmcut analyze`` itself: every argument is checked before a model is loaded."""
    from vlmcut.analysis.report import analyze_images
    from vlmcut.api import available_methods
    from vlmcut.cli import UsageError, blame, check_out_dir
    from vlmcut.inference import load_image, model_config

    if args.zoo and args.model:
        raise UsageError(
            "argument --zoo: not allowed with --model; pass exactly one of --model DIR and --zoo"
        )
    if not args.zoo and not args.model:
        raise UsageError("argument --model: pass exactly one of --model DIR and --zoo")
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    if not methods:
        raise UsageError(
            f"argument --methods: no method in {args.methods!r}; pass a comma-separated list of "
            f"{', '.join(available_methods())}"
        )
    unknown = [m for m in methods if m not in available_methods()]
    if unknown:
        raise UsageError(
            f"argument --methods: unknown method(s) {', '.join(unknown)}; available: {', '.join(available_methods())}"
        )
    check_out_dir(args.out)
    if args.model:
        with blame("--model"):
            config = model_config(args.model)
        vision = config.get("vision_config") or config
        depth = vision.get("num_hidden_layers") if isinstance(vision, dict) else None
        if args.feature_layer is not None and isinstance(depth, int):
            from vlmcut.models.vit import consumed_layer

            with blame("--feature-layer"):
                consumed_layer(args.feature_layer, depth)
    images: dict[str, Image.Image] = {}
    for file in args.image or []:
        with blame("--image"):
            images[Path(file).stem] = load_image(file)
    if args.images == "scikit-image":
        with blame("--images"):
            images.update(skimage_photos())
            images.update(scene_images(args.scenes))
    if not images:
        raise UsageError(
            "argument --image: no images; pass --image FILE (repeatable) and/or --images scikit-image"
        )

    start = time.perf_counter()
    if args.zoo:
        from vlmcut.zoo import load_small_llava

        with blame("--zoo"):
            model, processor = load_small_llava()
        tower = model.model.vision_tower
        feature_layer = _feature_index(model)
        source = "vlmcut.zoo.load_small_llava()"
    else:
        with blame("--model"):
            tower, processor, feature_layer, kind = load_tower(args.model, dtype=args.dtype)
        source = f"{args.model} ({kind})"
    if args.feature_layer is not None:
        from vlmcut.models.vit import consumed_layer, tower_spec

        with blame("--feature-layer"):
            consumed_layer(args.feature_layer, tower_spec(tower).num_layers)
        feature_layer = args.feature_layer
    meta = {"model": source, "prompt": args.prompt or "", "methods": ", ".join(methods)}
    report = analyze_images(
        tower,
        processor,
        images,
        args.out,
        keep=args.keep,
        methods=methods,
        feature_layer=feature_layer,
        meta=meta,
    )
    elapsed = time.perf_counter() - start
    print(f"analysed {len(images)} image(s) with {type(tower).__name__} in {elapsed:.1f} s")
    print(f"report: {report}")
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``analyze`` on an ``argparse`` sub-parser collection; sets ``func=run_analyze``."""
    from vlmcut.cli import non_negative_int, positive_int

    p = subparsers.add_parser(
        "analyze",
        help="information-flow analysis of a vision tower (paper section 2) as an HTML report",
        description="Entropy, attention distance, flow maps and hub tokens, criteria agreement, value norms "
        "and every method's kept tokens, per encoder layer; writes PNGs, analysis.json and report.html.",
    )
    p.add_argument("--model", help="local Hugging Face LLaVA directory or bare vision tower directory")
    p.add_argument("--zoo", action="store_true", help="use vlmcut.zoo.load_small_llava() (DINOv2-S tower)")
    p.add_argument("--image", action="append", help="image file (repeatable)")
    p.add_argument(
        "--images",
        choices=["scikit-image"],
        help="add the scikit-image sample photos and --scenes synthetic scenes",
    )
    p.add_argument(
        "--scenes", type=non_negative_int, default=4, help="synthetic scenes added by --images (default 4)"
    )
    p.add_argument("--prompt", default="", help="question recorded in the report (the tower does not see it)")
    p.add_argument(
        "--keep", type=positive_int, default=64, help="patch tokens kept by each method (default 64)"
    )
    p.add_argument("--methods", default="flowcut,random,grid", help="comma-separated pruning methods")
    p.add_argument(
        "--feature-layer",
        type=int,
        default=None,
        help="hidden_states index the consumer reads (default: LLaVA's vision_feature_layer, -1 for a tower)",
    )
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--out", default="vlmcut-analysis", help="output directory (default ./vlmcut-analysis)")
    p.set_defaults(func=run_analyze)
    return p
