"""How many kept tokens land in the processor's padding, per vision-stage method, on non-square images.

    python scripts/padding_kept.py --data scenes-wide --n 500 --keeps 64 16

Runs only the vision tower (under ``vlmcut.prune``) of the small zoo LLaVA once per distinct image of the
first ``n`` questions, and prints a Markdown table: mean (and max) kept tokens that are padding patches.
"""

from __future__ import annotations

import argparse

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="scenes-wide")
    parser.add_argument("--split", default="test")
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--keeps", type=int, nargs="+", default=[64, 16])
    parser.add_argument(
        "--methods",
        nargs="+",
        default=[
            "flowcut",
            "flowcut:padding=compete",
            "flowcut:semantic_scaling=paper",
            "fastervlm",
            "visionzip",
            "random",
        ],
    )
    args = parser.parse_args()

    from vlmcut import prune
    from vlmcut.demo import load_demo_model
    from vlmcut.eval.datasets import load_dataset
    from vlmcut.models.vit import padding_patches

    model, processor, _ = load_demo_model()
    data = load_dataset(args.data, args.split, n=args.n)
    images = [data.image(sid) for sid in data.scene_ids()]
    pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    pad = padding_patches(pixels, model.config.vision_config.patch_size)
    print(f"{args.data}: {len(images)} images, {int(pad[0].sum())} of {pad.shape[1]} patches are padding\n")
    print("| method | " + " | ".join(f"keep {k}: padding kept, mean (max)" for k in args.keeps) + " |")
    print("|" + "---|" * (len(args.keeps) + 1))
    for entry in args.methods:
        method, _, opt = entry.partition(":")
        options = dict([opt.split("=")]) if opt else {}
        cells = []
        for keep in args.keeps:
            counts = []
            with torch.no_grad(), prune(model, method, keep=keep, **options) as handle:
                for b in range(0, len(images), 8):
                    model.model.get_image_features(pixel_values=pixels[b : b + 8])
                    kept = handle.kept_indices
                    for row, mask in zip(kept, pad[b : b + 8], strict=True):
                        counts.append(int(mask[row[row >= 0]].sum()))
            cells.append(f"{sum(counts) / len(counts):.1f} ({max(counts)})")
        print(f"| {entry} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
