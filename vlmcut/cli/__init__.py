"""The ``vlmcut`` command line: run, demo, eval, analyze, bench, serve.

A bad invocation prints one line, ``vlmcut <command>: error: <message>``, and exits with status 2: argparse's
own usage errors, the checks here (:class:`UsageError`), and the library's ``ValueError`` / ``TypeError`` /
``OSError`` / ``ImportError`` / ``NotImplementedError`` (and ``RuntimeError`` raised by vlmcut's own code).
Anything else keeps its traceback; ``VLMCUT_DEBUG=1`` shows the traceback of every error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..api import available_methods

DEBUG_ENV = "VLMCUT_DEBUG"
# What the library raises for bad inputs, whoever raised it (RuntimeError only from vlmcut's own code).
_INPUT_ERRORS = (ValueError, TypeError, OSError, ImportError, NotImplementedError)
_PACKAGE_DIR = Path(__file__).resolve().parent


class UsageError(Exception):
    """A bad command-line argument: reported as ``vlmcut <command>: error: <message>`` (exit status 2)."""


def _int_at_least(minimum: int, what: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {what}, got {value}")
        return value

    return parse


# argparse ``type=`` for counts: the argument's name, the rule and the value given end up in one message.
positive_int = _int_at_least(1, "an integer >= 1")
non_negative_int = _int_at_least(0, "an integer >= 0")


def _message(err: BaseException) -> str:
    """``err``'s text on one line (a ``KeyError`` without its quotes)."""
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    return " ".join(text.split()) or type(err).__name__


@contextmanager
def blame(flag: str) -> Iterator[None]:
    """Report an input error raised inside the block as a :class:`UsageError` about ``flag``."""
    try:
        yield
    except UsageError:
        raise
    except (ValueError, TypeError, OSError, KeyError, ImportError, NotImplementedError) as err:
        raise UsageError(f"argument {flag}: {_message(err)}") from err


def check_out_dir(path: str | Path, flag: str = "--out") -> Path:
    """An output directory: missing (it will be created) or an existing directory."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"argument {flag}: {path} exists and is not a directory; pass a directory path")
    return path


def check_out_file(path: str | Path, flag: str) -> Path:
    """An output file whose directory exists and which is not itself a directory."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"argument {flag}: {path} is a directory; pass a file path")
    if not path.parent.is_dir():
        raise UsageError(f"argument {flag}: the directory {path.parent} does not exist; create it first")
    return path


def _debug() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def _raised_by_vlmcut(err: BaseException) -> bool:
    """Whether the innermost frame of ``err``'s traceback is in vlmcut's own code."""
    tb = err.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    try:
        Path(tb.tb_frame.f_code.co_filename).resolve().relative_to(_PACKAGE_DIR)
    except ValueError:
        return False
    return True


def report_errors(command: str, func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run ``func(args)``; an input error becomes one line on stderr and exit status 2 (see the module
    docstring). ``VLMCUT_DEBUG=1`` re-raises it with its traceback."""
    prog = f"vlmcut {command}"
    try:
        return func(args)
    except KeyboardInterrupt:
        if _debug():
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if _debug():
            raise
        ours = isinstance(err, UsageError) or _raised_by_vlmcut(err)
        if not isinstance(err, (UsageError, *_INPUT_ERRORS)) and not (ours and isinstance(err, RuntimeError)):
            raise  # a bug, not a bad input: keep the traceback
        hint = "" if ours else f" ({DEBUG_ENV}=1 shows the traceback)"
        print(f"{prog}: error: {_message(err)}{hint}", file=sys.stderr)
        return 2


def _cmd_run(args: argparse.Namespace) -> int:
    from ..inference import compare, load_image, load_llava, model_config, save_overlay

    image_path = Path(args.image)
    out_dir = check_out_dir(args.out)
    if args.json:
        check_out_file(args.json, "--json")
    with blame("--image"):
        image = load_image(image_path)
    with blame("--model"):
        model_config(args.model, ("llava",))
        model, processor = load_llava(args.model, dtype=args.dtype, attn=args.attn)
    base, pruned = compare(
        model,
        processor,
        image,
        args.prompt,
        keep=args.keep,
        method=args.method,
        max_new_tokens=args.max_new_tokens,
    )
    out_png = out_dir / f"{image_path.stem}-{args.method}-keep{args.keep}.png"
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
    from ..demo import run_demo

    check_out_dir(args.out)
    run_demo(args.out, keep=args.keep, n_scenes=args.scenes, max_new_tokens=args.max_new_tokens)
    return 0


def parse_cell(text: str) -> tuple[str, int | str, dict[str, object]]:
    """``"flowcut@64"``, ``"flowcut@64:padding=compete"``, ``"flowcut@auto:mass=0.9,max_keep=128"`` ->
    ``(method, keep, options)`` (option values that read as numbers become numbers)."""
    head, _, tail = text.partition(":")
    method, at, keep_text = head.partition("@")
    if not at or method not in available_methods():
        raise argparse.ArgumentTypeError(
            f"must be METHOD@KEEP[:option=value,...] with METHOD one of {', '.join(available_methods())}, "
            f"got {text!r}"
        )
    keep: int | str
    if keep_text == "auto":
        keep = "auto"
    else:
        try:
            keep = int(keep_text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"KEEP must be an integer >= 1 or 'auto', got {text!r}"
            ) from None
        if keep < 1:
            raise argparse.ArgumentTypeError(f"KEEP must be an integer >= 1 or 'auto', got {text!r}")
    options: dict[str, object] = {}
    for item in filter(None, tail.split(",")):
        name, eq, value = item.partition("=")
        if not eq or not name:
            raise argparse.ArgumentTypeError(f"options must be name=value, got {item!r} in {text!r}")
        for cast in (int, float):
            try:
                options[name] = cast(value)
                break
            except ValueError:
                continue
        else:
            options[name] = value
    return method, keep, options


def _write_sweep_reports(rows: list[dict], out: str, split: str) -> None:
    """``sweep.md/json/png`` and ``frontier.md`` from stored cells; per-family tables where the questions
    can be rebuilt and match the stored fingerprint."""
    from ..eval.datasets import load_dataset
    from ..eval.report import frontier_report
    from ..eval.runner import EvalResult, write_reports
    from ..eval.store import data_fingerprint

    results = [EvalResult.from_row(r) for r in rows]
    paths = write_reports(results, out, "sweep")
    families = {}
    for name in sorted({r["dataset"] for r in rows}):
        first = next(r for r in rows if r["dataset"] == name)
        try:
            samples = list(load_dataset(name, split, n=first["n"]))
        except (ValueError, ImportError, OSError):
            continue
        if data_fingerprint(samples) == first["fingerprint"]:
            families[name] = [s.family for s in samples]
    paths["frontier"] = Path(out) / "frontier.md"
    frontier_report(results, families, paths["frontier"])
    print("wrote " + ", ".join(str(p) for p in paths.values()))


def _cmd_eval(args: argparse.Namespace) -> int:
    from ..eval.datasets import load_dataset
    from ..eval.runner import evaluate, markdown_table, sweep, write_reports
    from ..eval.store import ResultStore
    from ..inference import load_llava, model_config

    check_out_dir(args.out)
    if args.report:  # the reports of a (possibly unfinished) sweep, from its stored cells; no model
        rows = [r for r in ResultStore.read_all(args.out) if not r.get("skipped")]
        if not rows:
            raise UsageError(
                f"argument --report: no stored cells in {Path(args.out) / 'cells'}; run --sweep first"
            )
        _write_sweep_reports(rows, args.out, args.split)
        return 0
    # Every argument is checked before the model is loaded (the slow part).
    if not args.sweep and (args.method is None or args.keep is None):
        missing = " and ".join(f for f, v in (("--method", args.method), ("--keep", args.keep)) if v is None)
        raise UsageError(f"give {missing} (one pruned run against the unpruned model), or --sweep")
    if args.model and args.weights:
        raise UsageError(
            "argument --weights: it loads weights into the small zoo LLaVA; drop --model or --weights"
        )
    if args.weights and not Path(args.weights).is_file():
        raise UsageError(
            f"argument --weights: no file {args.weights}; give a .safetensors file written by vlmcut.zoo.train"
        )
    if args.model:
        with blame("--model"):
            model_config(args.model, ("llava",))
    data = {}
    for name in args.data:
        try:
            data[name] = list(load_dataset(name, args.split, n=args.n))
        except (ValueError, ImportError, OSError) as err:
            flag = "--split" if "split" in str(err) and not isinstance(err, ImportError) else "--data"
            raise UsageError(f"argument {flag}: {_message(err)}") from err
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.model:
        with blame("--model"):
            model, processor = load_llava(args.model, dtype=args.dtype)
        model_id = str(Path(args.model).resolve())
    else:
        from ..demo import TRAINED_PROJECTOR
        from ..zoo import load_small_llava
        from ..zoo.small_llava import sha256_file

        weights = Path(args.weights) if args.weights else TRAINED_PROJECTOR
        with blame("--weights"):
            model, processor = load_small_llava(projector_path=weights if weights.is_file() else None)
        model_id = f"zoo:{sha256_file(weights)[:16]}" if weights.is_file() else "zoo:random"
    if args.sweep:
        results = sweep(
            model,
            processor,
            data,
            args.methods,
            args.keeps,
            batch_size=args.batch_size,
            out=args.out,
            model_id=model_id,
            extra=args.extra,
        )
        print(markdown_table(results))
        # The reports cover every stored cell of the directory (another process may sweep another set).
        rows = [r for r in ResultStore.read_all(args.out) if not r.get("skipped")]
        _write_sweep_reports(rows, args.out, args.split)
        return 0
    else:
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
    print(markdown_table(results))
    paths = write_reports(results, args.out, stem)
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def supported_text() -> str:
    """The supported models and the methods each family runs, from the registries (for ``--help``)."""
    from ..models.registry import ADAPTERS

    lines = ["supported models (family: classes -> methods):"]
    for adapter in ADAPTERS:
        options = "".join(f"; option {o.name}" for o in adapter.options)
        lines.append(
            f"  {adapter.title}: {', '.join(adapter.classes)} -> {', '.join(adapter.supported_methods())}{options}"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlmcut",
        description="Visual token pruning for Hugging Face VLMs.",
        epilog=supported_text(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="answer a question about an image, unpruned and pruned, with timings")
    run.add_argument("--model", required=True, help="local Hugging Face LLaVA directory")
    run.add_argument("--image", required=True, help="image file")
    run.add_argument(
        "--prompt", required=True, help="question (wrapped in the chat template unless it has <image>)"
    )
    run.add_argument("--keep", type=positive_int, default=64, help="visual tokens per image (default 64)")
    run.add_argument("--method", default="flowcut", choices=available_methods())
    run.add_argument("--max-new-tokens", type=positive_int, default=32)
    run.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    run.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    run.add_argument("--out", default="vlmcut-out", help="directory for the kept-patch PNG")
    run.add_argument("--json", default=None, help="also write the report as JSON to this file")
    run.set_defaults(func=_cmd_run)

    demo = sub.add_parser(
        "demo", help="the small real LLaVA (built offline), unpruned vs FlowCut on a few images"
    )
    demo.add_argument("--keep", type=positive_int, default=64)
    demo.add_argument("--scenes", type=non_negative_int, default=3, help="synthetic scenes to include")
    demo.add_argument("--max-new-tokens", type=positive_int, default=12)
    demo.add_argument("--out", default="vlmcut-demo")
    demo.set_defaults(func=_cmd_demo)

    ev = sub.add_parser("eval", help="accuracy, retention and agreement of a method on a VQA dataset")
    ev.add_argument("--model", default=None, help="local LLaVA directory (default: the small zoo LLaVA)")
    ev.add_argument("--data", nargs="+", default=["scenes"], help="datasets: scenes, easy-vqa")
    ev.add_argument("--split", default="test")
    ev.add_argument("--n", type=positive_int, default=200, help="questions per dataset")
    ev.add_argument("--method", default=None, choices=available_methods())
    ev.add_argument("--keep", type=positive_int, default=None)
    ev.add_argument(
        "--sweep",
        action="store_true",
        help="methods x keeps: table with paired 95%% intervals vs flowcut, plot; resumable (cells kept in "
        "--out/cells, finished cells skipped on a rerun)",
    )
    ev.add_argument(
        "--report",
        action="store_true",
        help="only rewrite the reports from the cells stored in --out (no model)",
    )
    ev.add_argument(
        "--weights",
        default=None,
        help="projector + LoRA .safetensors for the small zoo LLaVA (default: shipped)",
    )
    ev.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    ev.add_argument(
        "--methods",
        nargs="+",
        default=["flowcut", "visionzip", "fastervlm", "sparsevlm", "pdrop", "fastv", "random", "grid"],
        choices=available_methods(),
    )
    ev.add_argument("--keeps", nargs="+", type=positive_int, default=[64, 32, 16])
    ev.add_argument(
        "--extra",
        nargs="+",
        type=parse_cell,
        default=[],
        metavar="METHOD@KEEP[:opt=val,...]",
        help="more sweep cells, e.g. flowcut@64:padding=compete or flowcut@auto:mass=0.9",
    )
    ev.add_argument("--batch-size", type=positive_int, default=8)
    ev.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ev.add_argument("--out", default="vlmcut-eval")
    ev.set_defaults(func=_cmd_eval)

    from .analyze import add_parser as add_analyze
    from .bench import add_parser as add_bench
    from .lmms import add_parser as add_lmms

    add_analyze(sub)
    add_bench(sub)
    _add_serve(sub)
    add_lmms(sub)
    return parser


def _add_serve(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser(
        "serve",
        allow_abbrev=False,
        help="vLLM's OpenAI-compatible server for a pruned LLaVA (needs vLLM; other arguments go to vLLM)",
    )
    serve.add_argument("model", help="local LLaVA directory")
    serve.add_argument("--method", default="flowcut", help="a vision-stage method (default flowcut)")
    serve.add_argument("--keep", type=positive_int, default=64, help="visual tokens per image (default 64)")
    serve.add_argument(
        "--option", action="append", default=[], metavar="NAME=VALUE", help="a method option (JSON value)"
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.set_defaults(func=_cmd_serve)


def _cmd_serve(args: argparse.Namespace) -> int:
    from ..integrations.vllm.serve import serve

    options = {}
    for item in args.option:
        name, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"argument --option: expected NAME=VALUE, got {item!r}")
        try:
            options[name] = json.loads(value)
        except json.JSONDecodeError:
            options[name] = value
    return serve(args.model, args.method, args.keep, options, args.host, args.vllm_args)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "serve":  # only `serve` passes unknown arguments on (to vLLM)
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.vllm_args = extra
    return report_errors(args.command, args.func, args)
