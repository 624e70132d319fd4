"""Kept-token pictures with Pillow only (no matplotlib), for ``vlmcut run`` and the demo."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw


def processed_image(pixel_values: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> Image.Image:
    """Undo the processor's normalisation: the image exactly as the model saw it. ``(3, H, W)`` -> RGB image."""
    if pixel_values.dim() != 3 or pixel_values.shape[0] != 3:
        raise ValueError(f"expected one (3, H, W) image, got shape {tuple(pixel_values.shape)}")
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    x = (pixel_values.detach().float().cpu() * s + m).clamp(0, 1)
    return Image.fromarray((x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def kept_patch_overlay(
    image: Image.Image, kept: torch.Tensor | Sequence[int], grid: tuple[int, int], dim: float = 0.3
) -> Image.Image:
    """Dim the dropped patches and outline the kept ones.

    ``kept``: patch indices on the ``grid = (rows, cols)`` raster (0-based). Returns a new RGB image.
    """
    rows, cols = grid
    idx = [int(i) for i in (kept.tolist() if isinstance(kept, torch.Tensor) else kept)]
    if any(not 0 <= i < rows * cols for i in idx):
        raise ValueError(f"kept indices must lie in [0, {rows * cols}) for a {rows}x{cols} patch grid")
    base = image.convert("RGB")
    w, h = base.size
    mask = np.zeros((rows, cols), dtype=bool)
    for i in idx:
        mask[i // cols, i % cols] = True
    # Upsample the patch mask to pixels with the same rounding as the outlines below.
    ys = np.minimum((np.arange(h) * rows) // h, rows - 1)
    xs = np.minimum((np.arange(w) * cols) // w, cols - 1)
    pix_mask = mask[ys][:, xs]
    arr = np.asarray(base).astype(np.float32)
    arr[~pix_mask] *= dim
    out = Image.fromarray(arr.round().astype(np.uint8))
    draw = ImageDraw.Draw(out)
    for i in idx:
        r, c = divmod(i, cols)
        box = (c * w // cols, r * h // rows, (c + 1) * w // cols - 1, (r + 1) * h // rows - 1)
        draw.rectangle(box, outline=(255, 220, 0))
    return out


def side_by_side(
    images: Sequence[Image.Image], labels: Sequence[str] | None = None, pad: int = 6
) -> Image.Image:
    """Tile images in a row, each with an optional caption above it."""
    if not images:
        raise ValueError("no images to tile")
    caption = 14 if labels else 0
    width = sum(im.width for im in images) + pad * (len(images) + 1)
    height = max(im.height for im in images) + 2 * pad + caption
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    x = pad
    for k, im in enumerate(images):
        if labels:
            draw.text((x, pad // 2), labels[k], fill=(0, 0, 0))
        canvas.paste(im.convert("RGB"), (x, pad + caption))
        x += im.width + pad
    return canvas
