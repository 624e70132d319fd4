"""The ``flowcut`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .api import available_methods


def _cmd_run(args: argparse.Namespace) -> int:
    from PIL import Image

    from .inference import compare, load_llava, save_overlay

    image_path = Path(args.image)
    if not image_path.is_file():
        raise SystemExit(f"error: image {image_path} does not exist")
    model, processor = load_llava(args.model, dtype=args.dtype, attn=args.attn)
    image = Image.open(image_path).convert("RGB")
    base, pruned = compare(
        model,
        processor,
        image,
        args.prompt,
        keep=args.keep,
        method=args.method,
        max_new_tokens=args.max_new_tokens,
    )
    out_png = Path(args.out) / f"{image_path.stem}-{args.method}-keep{args.keep}.png"
    save_overlay(processor, model, image, pruned.kept_indices[0], out_png)
    rows = [("unpruned", base), (f"{args.method} keep={args.keep}", pruned)]
    report = {}
    for label, ans in rows:
        t = ans.times.as_dict()
        print(f"[{label}] visual tokens: {ans.visual_tokens}")
        print(f"  answer: {ans.text}")
        print(
            f"  vision {t['vision_s'] * 1e3:.1f} ms | LLM prefill {t['llm_prefill_s'] * 1e3:.1f} ms | "
            f"decode {t['decode_per_token_s'] * 1e3:.1f} ms/token x {int(t['decode_steps'])} | total {ans.total_s:.2f} s"
        )
        report[label] = {"answer": ans.text, "visual_tokens": ans.visual_tokens, "total_s": ans.total_s, **t}
    print(f"  tokens per encoder layer: {pruned.tokens_per_layer}")
    print(f"kept patches: {out_png}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flowcut", description="Visual token pruning for Hugging Face VLMs."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="answer a question about an image, unpruned and pruned, with timings")
    run.add_argument("--model", required=True, help="local Hugging Face LLaVA directory")
    run.add_argument("--image", required=True, help="image file")
    run.add_argument(
        "--prompt", required=True, help="question (wrapped in the chat template unless it has <image>)"
    )
    run.add_argument("--keep", type=int, default=64, help="visual tokens per image (default 64)")
    run.add_argument("--method", default="flowcut", choices=available_methods())
    run.add_argument("--max-new-tokens", type=int, default=32)
    run.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    run.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    run.add_argument("--out", default="flowcut-out", help="directory for the kept-patch PNG")
    run.add_argument("--json", default=None, help="also write the report as JSON to this file")
    run.set_defaults(func=_cmd_run)

    from .analysis.cli_analyze import add_parser as add_analyze

    add_analyze(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
