"""`vlmcut run` on a local LLaVA directory saved from tiny real classes."""

from __future__ import annotations

import json

import numpy as np
import tiny
import torch
from PIL import Image

from vlmcut.cli import main
from vlmcut.overlay import kept_patch_overlay, processed_image


def test_flowcut_run_end_to_end(tmp_path, capsys) -> None:
    model_dir = tmp_path / "llava"
    tiny.llava(seed=11).save_pretrained(model_dir)
    tiny.processor().save_pretrained(model_dir)
    image = tmp_path / "img.png"
    tiny.images(1, seed=11)[0].save(image)
    out = tmp_path / "out"
    code = main(
        [
            "run",
            "--model",
            str(model_dir),
            "--image",
            str(image),
            "--prompt",
            "what is in the image ?",
            "--keep",
            "8",
            "--max-new-tokens",
            "3",
            "--out",
            str(out),
            "--json",
            str(tmp_path / "r.json"),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "[unpruned] visual tokens: 64" in printed
    assert "[flowcut keep=8] visual tokens: 8" in printed
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["flowcut keep=8"]["visual_tokens"] == 8
    assert report["unpruned"]["llm_prefill_s"] > 0
    png = out / "img-flowcut-keep8.png"
    picture = np.asarray(Image.open(png))
    assert picture.shape == (tiny.IMAGE, tiny.IMAGE, 3)


def test_overlay_highlights_exactly_the_kept_patches() -> None:
    white = Image.new("RGB", (40, 40), (200, 200, 200))
    out = np.asarray(kept_patch_overlay(white, torch.tensor([0, 5]), (4, 4), dim=0.5)).astype(int)
    # kept patch 5 = row 1, col 1 -> pixels 10..19; its inside keeps the original value
    assert (out[12:18, 12:18] == 200).all()
    # a dropped patch (row 3, col 3) is dimmed
    assert (out[32:38, 32:38] == 100).all()


def test_processed_image_inverts_normalisation() -> None:
    x = torch.rand(3, 8, 8)
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    norm = (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    back = np.asarray(processed_image(norm, mean, std)).astype(float) / 255
    assert np.abs(back - x.permute(1, 2, 0).numpy()).max() < 1 / 255 + 1e-6
