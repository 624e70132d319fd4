"""The ``vlmcut`` command line: run, demo, eval, analyze, bench."""

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


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.out, keep=args.keep, n_scenes=args.scenes, max_new_tokens=args.max_new_tokens)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from .eval.datasets import load_dataset
    from .eval.runner import evaluate, sweep, write_reports
    from .inference import load_llava

    if args.model:
        model, processor = load_llava(args.model, dtype=args.dtype)
    else:
        from .demo import load_demo_model

        model, processor, _ = load_demo_model()
    data = {name: list(load_dataset(name, args.split, n=args.n)) for name in args.data}
    if args.sweep:
        results = sweep(model, processor, data, args.methods, args.keeps, batch_size=args.batch_size)
        stem = "sweep"
    else:
        if args.method is None or args.keep is None:
            raise SystemExit("error: give --method and --keep, or --sweep")
        results = []
        for name, samples in data.items():
            ref = evaluate(model, processor, samples, name, batch_size=args.batch_size)
            results += [
                ref,
                evaluate(
                    model, processor, samples, name, args.method, args.keep, ref, batch_size=args.batch_size
                ),
            ]
        stem = f"eval-{args.method}-{args.keep}"
    from .eval.runner import markdown_table

    print(markdown_table(results))
    paths = write_reports(results, args.out, stem)
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlmcut", description="Visual token pruning for Hugging Face VLMs."
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
    run.add_argument("--out", default="vlmcut-out", help="directory for the kept-patch PNG")
    run.add_argument("--json", default=None, help="also write the report as JSON to this file")
    run.set_defaults(func=_cmd_run)

    demo = sub.add_parser(
        "demo", help="the small real LLaVA (built offline), unpruned vs FlowCut on a few images"
    )
    demo.add_argument("--keep", type=int, default=64)
    demo.add_argument("--scenes", type=int, default=3, help="synthetic scenes to include")
    demo.add_argument("--max-new-tokens", type=int, default=12)
    demo.add_argument("--out", default="vlmcut-demo")
    demo.set_defaults(func=_cmd_demo)

    ev = sub.add_parser("eval", help="accuracy, retention and agreement of a method on a VQA dataset")
    ev.add_argument("--model", default=None, help="local LLaVA directory (default: the small zoo LLaVA)")
    ev.add_argument("--data", nargs="+", default=["scenes"], help="datasets: scenes, easy-vqa")
    ev.add_argument("--split", default="test")
    ev.add_argument("--n", type=int, default=200, help="questions per dataset")
    ev.add_argument("--method", default=None, choices=available_methods())
    ev.add_argument("--keep", type=int, default=None)
    ev.add_argument("--sweep", action="store_true", help="methods x keeps table and plot")
    ev.add_argument(
        "--methods",
        nargs="+",
        default=["flowcut", "visionzip", "fastervlm", "sparsevlm", "pdrop", "fastv", "random", "grid"],
        choices=available_methods(),
    )
    ev.add_argument("--keeps", nargs="+", type=int, default=[128, 64, 32, 16])
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ev.add_argument("--out", default="vlmcut-eval")
    ev.set_defaults(func=_cmd_eval)

    from .analysis.cli_analyze import add_parser as add_analyze
    from .bench.cli_bench import add_parser as add_bench

    add_analyze(sub)
    add_bench(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
