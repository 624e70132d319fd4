"""Pictures of questions FlowCut gets wrong and a rival gets right, from a stored sweep.

    python scripts/losing_cases.py --out docs/eval/frontier --data scenes --keep 16 --rival visionzip --cases 4

For each case: the model's view of the image with FlowCut's kept patches and the rival's side by side, and
one line (question, gold, both answers) in ``<out>/losses/<data>-<rival>-<keep>.md``. Uses the small zoo
LLaVA with the shipped weights, the model the sweep was run with.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="the sweep's --out directory")
    parser.add_argument("--data", default="scenes")
    parser.add_argument("--split", default="test")
    parser.add_argument("--keep", type=int, default=16)
    parser.add_argument("--rival", default="visionzip")
    parser.add_argument("--cases", type=int, default=4)
    args = parser.parse_args()

    from vlmcut import prune
    from vlmcut.demo import load_demo_model
    from vlmcut.eval.datasets import load_dataset
    from vlmcut.eval.store import data_fingerprint
    from vlmcut.overlay import kept_patch_overlay, processed_image, side_by_side

    cells = {}
    for line in (Path(args.out) / "cells" / f"{args.data}.jsonl").read_text().splitlines():
        row = json.loads(line)
        cells[row["cell"]] = row
    ours, theirs = cells[f"flowcut@{args.keep}"], cells[f"{args.rival}@{args.keep}"]
    samples = list(load_dataset(args.data, args.split, n=ours["n"]))
    if data_fingerprint(samples) != ours["fingerprint"]:
        raise SystemExit("the stored cells were made with other questions; pass the sweep's --data / --split")
    pairs = list(zip(ours["correct"], theirs["correct"], strict=True))
    losses = [i for i, (a, b) in enumerate(pairs) if b and not a]
    wins = sum(1 for a, b in pairs if a and not b)
    # one case per image, spread over the families
    seen, picked = set(), []
    for i in sorted(losses, key=lambda i: (samples[i].family, i)):
        if samples[i].scene_id not in seen and len(picked) < args.cases:
            seen.add(samples[i].scene_id)
            picked.append(i)
    model, processor, _ = load_demo_model()
    ip = processor.image_processor
    patch = model.config.vision_config.patch_size
    out_dir = Path(args.out) / "losses"
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = [
        f"# {args.data}: FlowCut wrong, {args.rival} right, {args.keep} tokens",
        "",
        f"{len(losses)} such questions of {len(samples)} (and {wins} the other way round). "
        "Left: FlowCut's kept patches; right: the rival's.",
        "",
    ]
    for i in picked:
        s = samples[i]
        pv = ip(images=[s.image], return_tensors="pt")["pixel_values"]
        view = processed_image(pv[0], ip.image_mean, ip.image_std)
        grid = (pv.shape[-2] // patch, pv.shape[-1] // patch)
        panels = []
        for method in ("flowcut", args.rival):
            with torch.no_grad(), prune(model, method, keep=args.keep) as handle:
                model.model.get_image_features(pixel_values=pv)
                kept = handle.kept_indices[0]
            panels.append(kept_patch_overlay(view, kept[kept >= 0], grid))
        name = f"{args.data}-{args.rival}-{args.keep}-{i:03d}.png"
        side_by_side(panels, [f"flowcut@{args.keep}", f"{args.rival}@{args.keep}"]).save(out_dir / name)
        lines.append(
            f"* `{name}` ({s.family}): {s.question} gold **{s.answer}**, FlowCut *{ours['answers'][i]}*, "
            f"{args.rival} *{theirs['answers'][i]}*"
        )
    path = out_dir / f"{args.data}-{args.rival}-{args.keep}.md"
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path} and {len(picked)} picture(s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
