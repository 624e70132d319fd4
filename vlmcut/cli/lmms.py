"""``vlmcut lmms export | sweep``: vlmcut's data as lmms-eval tasks, and methods x budgets through lmms-eval.

Importing this module needs neither lmms-eval nor ``datasets``; each command imports what it runs.
"""

from __future__ import annotations

import argparse
from typing import Any

from ..api import available_methods
from ..integrations.lmms_eval.options import NO_PRUNING
from . import blame, check_out_dir, positive_int


def _cmd_export(args: argparse.Namespace) -> int:
    from ..integrations.lmms_eval.export import export_tasks, export_zoo_model

    check_out_dir(args.out)
    if args.zoo_model:
        check_out_dir(args.zoo_model, "--zoo-model")
    with blame("--data"):
        written = export_tasks(args.data, args.split, args.n, args.out, seed=args.seed)
    for w in written:
        print(f"{w.dataset}: {w.n} questions -> {w.parquet}; tasks: {', '.join(w.tasks)}")
    if args.zoo_model:
        print(f"zoo LLaVA -> {export_zoo_model(args.zoo_model)}")
    print(
        f"run: python -m lmms_eval --model vlmcut --include_path {args.out} --tasks {next(iter(written[0].tasks))} ..."
    )
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    try:
        import lmms_eval  # noqa: F401
    except ImportError as err:
        raise ImportError(
            "vlmcut lmms sweep needs lmms-eval: pip install --no-deps lmms-eval==0.7.3 (README)"
        ) from err
    from ..integrations.lmms_eval.model import load_model
    from ..integrations.lmms_eval.sweep import run_sweep, write_sweep

    check_out_dir(args.out)
    with blame("--model"):
        model, processor = load_model(args.model, dtype=args.dtype)
    model = model.to(args.device)
    results, effs = run_sweep(
        model,
        processor,
        args.tasks,
        args.methods,
        args.keeps,
        include_path=args.include_path,
        batch_size=args.batch_size,
        limit=args.limit,
        chat=not args.simple,
    )
    from vlmcut.eval.runner import pivot_table

    from ..integrations.lmms_eval.sweep import efficiency_table

    print(pivot_table(results))
    print()
    print(efficiency_table(effs))
    paths = write_sweep(results, effs, args.out)
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def add_parser(sub: Any) -> None:
    """Add ``lmms`` (``export``, ``sweep``) to ``vlmcut``'s subcommands."""
    lmms = sub.add_parser("lmms", help="lmms-eval: export vlmcut's data as tasks; sweep methods x budgets")
    actions = lmms.add_subparsers(dest="lmms_command", required=True)

    ex = actions.add_parser(
        "export", help="write vlmcut's VQA data as local lmms-eval tasks (parquet + YAML)"
    )
    ex.add_argument("--data", nargs="+", default=["scenes"], help="datasets: scenes, easy-vqa")
    ex.add_argument("--split", default="test")
    ex.add_argument(
        "--n", type=positive_int, default=200, help="questions per dataset (the first n, as vlmcut eval)"
    )
    ex.add_argument("--seed", type=int, default=None, help="as vlmcut eval's loaders (default: the split's)")
    ex.add_argument("--out", required=True, help="directory for the tasks (then --include_path DIR)")
    ex.add_argument("--zoo-model", default=None, help="also save the small zoo LLaVA here (pretrained=DIR)")
    ex.set_defaults(func=_cmd_export)

    sw = actions.add_parser("sweep", help="methods x keeps through lmms-eval: the Table 1 layout")
    sw.add_argument("--model", required=True, help="local Hugging Face model directory")
    sw.add_argument("--tasks", nargs="+", required=True, help="lmms-eval task names")
    sw.add_argument("--include-path", default=None, help="directory of local task YAMLs (vlmcut lmms export)")
    sw.add_argument(
        "--methods",
        nargs="+",
        default=["flowcut", "visionzip", "fastv"],
        choices=[NO_PRUNING, *available_methods()],
    )
    sw.add_argument("--keeps", nargs="+", type=positive_int, default=[128, 64, 32])
    sw.add_argument("--batch-size", type=positive_int, default=8)
    sw.add_argument("--limit", type=positive_int, default=None, help="questions per task (lmms-eval --limit)")
    sw.add_argument("--simple", action="store_true", help="lmms-eval's simple interface instead of chat")
    sw.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    sw.add_argument("--device", default="cpu")
    sw.add_argument("--out", default="vlmcut-lmms")
    sw.set_defaults(func=_cmd_sweep)
