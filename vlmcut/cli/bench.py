"""``vlmcut bench``: the efficiency benchmark of :mod:`vlmcut.bench.runner` on the command line.

Registered by ``vlmcut/cli/__init__.py`` with ``from .bench import add_parser``; runnable on its own as
``python -m vlmcut.cli.bench ...`` (same arguments).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

DEFAULT_PRESET = "llava-1.5-7b"


def _family_and_depth(args: argparse.Namespace) -> tuple[str, int | None]:
    """``(model family, decoder layers or None when unknown)`` of the preset or ``--model`` directory,
    read from configs only (nothing is built)."""
    from ..bench.presets import get_preset
    from ..inference import model_config
    from . import UsageError, blame

    if args.model is not None:
        with blame("--model"):
            config = model_config(args.model, ("llava", "llava_next", "qwen2_vl"))
        text = config.get("text_config") or {}
        depth = text.get("num_hidden_layers") if isinstance(text, dict) else None
        if isinstance(depth, bool) or not isinstance(depth, int):
            depth = None  # not recorded (the class default): the runner checks it after loading
        return str(config["model_type"]), depth
    name = args.preset or DEFAULT_PRESET
    try:
        preset = get_preset(name)
    except KeyError as err:
        raise UsageError(f"argument --preset: {err.args[0]}") from None
    return preset.family, int(preset.build(None).text_config.num_hidden_layers)


def check_args(args: argparse.Namespace) -> None:
    """Everything ``vlmcut bench`` can check before building the model; a :class:`vlmcut.cli.UsageError`
    naming the argument otherwise."""
    import torch

    from ..models.registry import adapter_named
    from . import UsageError, check_out_dir

    check_out_dir(args.out)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError(
            "argument --device: cuda was asked for but no CUDA GPU is available; use --device cpu"
        )
    family, depth = _family_and_depth(args)
    source = args.model if args.model is not None else f"preset {args.preset or DEFAULT_PRESET}"
    if args.layers is not None and depth is not None and args.layers > depth:
        raise UsageError(
            f"argument --layers: {source} has {depth} decoder layers; --layers shortens it, so pass 1..{depth}"
        )
    if args.image_size is not None and family == "llava":
        raise UsageError(
            f"argument --image-size: {source} is LLaVA-1.5, which resizes every image to its tower's square "
            f"size; --image-size is for LLaVA-NeXT and Qwen2-VL only"
        )
    adapter = adapter_named(family)  # the config's model_type names its family
    if not set(args.methods) & set(adapter.supported_methods()):
        raise UsageError(
            f"argument --methods: none of {', '.join(args.methods)} runs on {adapter.title} ({source}); "
            f"pass some of {', '.join(adapter.supported_methods())}"
        )


def _cmd_bench(args: argparse.Namespace) -> int:
    from ..bench.results import print_summary
    from ..bench.runner import run_benchmark

    check_args(args)
    source: str = args.model if args.model is not None else (args.preset or DEFAULT_PRESET)
    result = run_benchmark(
        source,
        methods=tuple(args.methods),
        keeps=tuple(args.keeps),
        layers=args.layers,
        image_size=args.image_size,
        text_tokens=args.text_tokens,
        repeats=args.repeats,
        warmup=args.warmup,
        decode_tokens=args.decode_tokens,
        batch_size=args.batch_size,
        dtype=args.dtype,
        device=args.device,
        oracle=not args.no_oracle,
        seed=args.seed,
        progress=not args.no_progress,
    )
    paths = result.save(args.out)
    print_summary(result, paths)
    if args.strict and any(t.passed is False for t in result.targets):  # n/a targets do not fail
        return 1
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``bench`` on ``subparsers`` (from ``parser.add_subparsers()``); sets ``func=_cmd_bench``."""
    from ..api import available_methods
    from ..bench.presets import list_presets
    from . import non_negative_int, positive_int

    p = subparsers.add_parser(
        "bench",
        help="efficiency benchmark: TFLOPs, prefill / vision / decode time, memory, vs unpruned and oracle",
        description=(
            "Time the unpruned model, every method x keep, and an oracle per keep (FlowCut's gathers replayed "
            "without scoring), interleaved; write bench.json, bench.md and bench.png into --out. Runs LLaVA-1.5, "
            "LLaVA-NeXT and Qwen2-VL; methods a model does not support (Qwen2-VL: fastv, flowcut, pdrop, "
            "sparsevlm only) and budgets a staged method cannot reach are skipped with a note."
        ),
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--model", default=None, help="local Hugging Face LLaVA, LLaVA-NeXT or Qwen2-VL directory"
    )
    src.add_argument(
        "--preset",
        default=None,
        choices=list_presets(),
        help=f"model-shape preset with random weights (default {DEFAULT_PRESET})",
    )
    p.add_argument(
        "--layers", type=positive_int, default=None, help="shorten the LLM to N decoder layers (CPU runs)"
    )
    p.add_argument("--methods", nargs="+", default=["flowcut", "random", "grid"], choices=available_methods())
    p.add_argument(
        "--keeps", nargs="+", type=positive_int, default=[128, 64], help="visual tokens kept per image"
    )
    p.add_argument(
        "--image-size",
        nargs=2,
        type=positive_int,
        default=None,
        metavar=("H", "W"),
        help="image height and width in pixels (LLaVA-NeXT crops / Qwen2-VL patch grid); default: NeXT the "
        "paper's 640x427 (w x h), Qwen2-VL 448x448",
    )
    p.add_argument("--repeats", type=positive_int, default=5, help="timed rounds (default 5)")
    p.add_argument("--warmup", type=non_negative_int, default=2, help="untimed rounds first (default 2)")
    p.add_argument(
        "--decode-tokens", type=non_negative_int, default=8, help="greedy decode steps per prefill (0: skip)"
    )
    p.add_argument(
        "--text-tokens", type=positive_int, default=65, help="prompt text tokens (default 65, POPE)"
    )
    p.add_argument("--batch-size", type=positive_int, default=1)
    p.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="default: float32 on CPU, bfloat16 on CUDA",
    )
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--no-oracle", action="store_true", help="skip the oracle rows")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--strict", action="store_true", help="exit with status 1 when a target is missed")
    p.add_argument("--out", default="vlmcut-bench", help="output directory (default vlmcut-bench)")
    p.set_defaults(func=_cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vlmcut")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    from . import report_errors

    return report_errors("bench", args.func, args)


if __name__ == "__main__":
    sys.exit(main())
