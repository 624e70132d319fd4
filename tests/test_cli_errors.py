"""Bad ``vlmcut`` invocations: one line on stderr that names the argument, a non-zero exit, no traceback.

Every case runs in-process through ``vlmcut.cli.main`` and must fail *before* any model is built or
loaded (the tiny LLaVA below is the only model on disk), so the whole table runs in seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tiny
import torch

from vlmcut import cli

# (argv, fragment the error line must contain). Placeholders in braces are paths made by ``paths``.
RUN = ["run", "--model", "{model}", "--image", "{png}", "--prompt", "what is in the image ?"]
BENCH = ["bench", "--preset", "tiny", "--no-progress", "--repeats", "1", "--warmup", "0", "--out", "{out}"]
ANALYZE = ["analyze", "--model", "{model}", "--image", "{png}", "--out", "{out}"]
EVAL = ["eval", "--out", "{out}"]

CASES: list[tuple[list[str], str]] = [
    # --- no / unknown command
    ([], "command"),
    (["nope"], "command"),
    # --- run
    ([*RUN, "--keep", "0"], "--keep"),
    ([*RUN, "--keep", "-3"], "--keep"),
    ([*RUN, "--keep", "many"], "--keep"),
    ([*RUN, "--keep", "1.5"], "--keep"),
    (["run", "--image", "{png}", "--prompt", "q"], "--model"),
    (["run", "--model", "{model}", "--image", "{png}"], "--prompt"),
    (["run", "--model", "{missing}", "--image", "{png}", "--prompt", "q"], "--model"),
    (["run", "--model", "{empty_dir}", "--image", "{png}", "--prompt", "q"], "--model"),
    (["run", "--model", "{png}", "--image", "{png}", "--prompt", "q"], "--model"),
    (["run", "--model", "{bad_config}", "--image", "{png}", "--prompt", "q"], "--model"),
    (["run", "--model", "{tower}", "--image", "{png}", "--prompt", "q"], "--model"),
    (["run", "--model", "{model}", "--image", "{missing}", "--prompt", "q"], "--image"),
    (["run", "--model", "{model}", "--image", "{dir}", "--prompt", "q"], "is a directory"),
    (["run", "--model", "{model}", "--image", "{txt}", "--prompt", "q"], "--image"),
    (["run", "--model", "{model}", "--image", "{truncated}", "--prompt", "q"], "--image"),
    (["run", "--model", "{model}", "--image", "{empty}", "--prompt", "q"], "--image"),
    ([*RUN, "--max-new-tokens", "0"], "--max-new-tokens"),
    ([*RUN, "--max-new-tokens", "-1"], "--max-new-tokens"),
    ([*RUN, "--method", "nope"], "--method"),
    ([*RUN, "--dtype", "float8"], "--dtype"),
    ([*RUN, "--attn", "flash"], "--attn"),
    ([*RUN, "--out", "{png}"], "--out"),
    ([*RUN, "--json", "{dir}"], "--json"),
    ([*RUN, "--json", "{missing}/sub/r.json"], "--json"),
    # --- demo
    (["demo", "--keep", "0"], "--keep"),
    (["demo", "--scenes", "-1"], "--scenes"),
    (["demo", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["demo", "--out", "{png}"], "--out"),
    # --- eval
    ([*EVAL, "--sweep", "--n", "0"], "--n"),
    ([*EVAL, "--sweep", "--n", "-1"], "--n"),
    ([*EVAL, "--sweep", "--batch-size", "0"], "--batch-size"),
    ([*EVAL, "--method", "flowcut", "--keep", "0"], "--keep"),
    ([*EVAL, "--sweep", "--keeps", "0", "16"], "--keeps"),
    ([*EVAL, "--sweep", "--keeps", "16", "-1"], "--keeps"),
    ([*EVAL, "--method", "flowcut"], "--keep"),
    ([*EVAL, "--keep", "16"], "--method"),
    (EVAL, "--sweep"),
    ([*EVAL, "--sweep", "--data", "nope"], "--data"),
    ([*EVAL, "--sweep", "--split", "nope"], "--split"),
    ([*EVAL, "--sweep", "--methods", "nope"], "--methods"),
    ([*EVAL, "--sweep", "--model", "{missing}"], "--model"),
    ([*EVAL, "--sweep", "--model", "{tower}", "--n", "1"], "--model"),
    (["eval", "--sweep", "--out", "{png}"], "--out"),
    ([*EVAL, "--sweep", "--extra", "flowcut"], "--extra"),
    ([*EVAL, "--sweep", "--extra", "nope@16"], "--extra"),
    ([*EVAL, "--sweep", "--extra", "flowcut@0"], "--extra"),
    ([*EVAL, "--sweep", "--extra", "flowcut@16:mass"], "--extra"),
    ([*EVAL, "--sweep", "--weights", "{missing}"], "--weights"),
    ([*EVAL, "--sweep", "--weights", "{png}", "--model", "{model}"], "--weights"),
    (["eval", "--report", "--out", "{dir}"], "--report"),
    ([*EVAL, "--sweep", "--threads", "0"], "--threads"),
    # --- analyze
    (["analyze", "--image", "{png}"], "--model"),
    ([*ANALYZE, "--zoo"], "--zoo"),
    (["analyze", "--model", "{missing}", "--image", "{png}"], "--model"),
    (["analyze", "--model", "{empty_dir}", "--image", "{png}"], "--model"),
    (["analyze", "--model", "{bad_config}", "--image", "{png}"], "--model"),
    (["analyze", "--model", "{model}", "--image", "{missing}"], "--image"),
    (["analyze", "--model", "{model}", "--image", "{dir}"], "is a directory"),
    (["analyze", "--model", "{model}", "--image", "{txt}"], "--image"),
    (["analyze", "--model", "{model}", "--image", "{truncated}"], "--image"),
    (["analyze", "--model", "{model}"], "--image"),
    ([*ANALYZE, "--keep", "0"], "--keep"),
    ([*ANALYZE, "--scenes", "-1"], "--scenes"),
    ([*ANALYZE, "--methods", "nope"], "--methods"),
    ([*ANALYZE, "--methods", ", ,"], "--methods"),
    ([*ANALYZE, "--feature-layer", "99"], "--feature-layer"),
    (["analyze", "--model", "{model}", "--image", "{png}", "--out", "{png}"], "--out"),
    # --- bench
    ([*BENCH, "--keeps", "0"], "--keeps"),
    ([*BENCH, "--keeps", "16", "-5"], "--keeps"),
    ([*BENCH, "--repeats", "0"], "--repeats"),
    ([*BENCH, "--warmup", "-1"], "--warmup"),
    ([*BENCH, "--decode-tokens", "-1"], "--decode-tokens"),
    ([*BENCH, "--batch-size", "0"], "--batch-size"),
    ([*BENCH, "--layers", "0"], "--layers"),
    ([*BENCH, "--layers", "99"], "--layers"),
    ([*BENCH, "--image-size", "0", "0"], "--image-size"),
    ([*BENCH, "--image-size", "224", "-1"], "--image-size"),
    ([*BENCH, "--image-size", "64", "64"], "--image-size"),  # LLaVA-1.5 resizes every image itself
    ([*BENCH, "--text-tokens", "0"], "--text-tokens"),
    ([*BENCH, "--seed", "-1"], "--seed"),
    ([*BENCH, "--methods", "nope"], "--methods"),
    (["bench", "--preset", "nope"], "--preset"),
    (["bench", "--preset", "tiny", "--model", "{model}"], "--model"),
    (["bench", "--preset", "tiny-qwen2-vl", "--methods", "random", "grid", "--out", "{out}"], "--methods"),
    (["bench", "--model", "{missing}", "--out", "{out}"], "--model"),
    (["bench", "--model", "{empty_dir}", "--out", "{out}"], "--model"),
    (["bench", "--model", "{bad_config}", "--out", "{out}"], "--model"),
    (["bench", "--model", "{tower}", "--out", "{out}"], "--model"),
    (["bench", "--model", "{model}", "--image-size", "64", "64", "--out", "{out}"], "--image-size"),
    (["bench", "--model", "{model}", "--layers", "99", "--out", "{out}"], "--layers"),
    (["run", "--model", "{config_only}", "--image", "{png}", "--prompt", "q"], "--model"),
    ([*EVAL, "--sweep", "--model", "{config_only}", "--n", "1"], "--model"),
    (["analyze", "--model", "{config_only}", "--image", "{png}", "--out", "{out}"], "--model"),
    ([*BENCH[:-2], "--out", "{png}"], "--out"),
]

CUDA_CASES: list[tuple[list[str], str]] = [([*BENCH, "--device", "cuda"], "--device")]


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Default output directories (vlmcut-out, ...) land in a temporary directory, never in the checkout."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("cli-errors")
    model = root / "llava"
    tiny.llava(seed=3).save_pretrained(model)
    tiny.processor().save_pretrained(model)
    tower = root / "tower"
    tiny.clip_tower().save_pretrained(tower)
    bad_config = root / "bad-config"
    bad_config.mkdir()
    (bad_config / "config.json").write_text('{"model_type": "llava", "vision_con')
    (root / "empty-dir").mkdir()
    config_only = root / "config-only"  # a LLaVA config.json, but no weights and no processor files
    config_only.mkdir()
    (config_only / "config.json").write_text((model / "config.json").read_text())
    (root / "a-dir").mkdir()
    png = root / "img.png"
    tiny.images(1)[0].save(png)
    data = png.read_bytes()
    (root / "truncated.png").write_bytes(data[: len(data) // 2])
    (root / "notes.txt").write_text("not an image\n")
    (root / "empty.png").write_bytes(b"")
    return {
        "model": str(model),
        "tower": str(tower),
        "bad_config": str(bad_config),
        "empty_dir": str(root / "empty-dir"),
        "config_only": str(config_only),
        "dir": str(root / "a-dir"),
        "png": str(png),
        "truncated": str(root / "truncated.png"),
        "txt": str(root / "notes.txt"),
        "empty": str(root / "empty.png"),
        "missing": str(root / "no-such-path"),
        "out": str(root / "out"),
    }


def _invoke(
    argv: list[str], paths: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> tuple[int, list[str]]:
    args = [a.format(**paths) for a in argv]
    try:
        code = cli.main(args)
    except SystemExit as exit_:  # argparse's usage errors
        code = exit_.code if isinstance(exit_.code, int) else 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return code, lines


def _check(argv: list[str], fragment: str, paths: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    code, lines = _invoke(argv, paths, capsys)
    assert code != 0, f"exit 0 for {argv}"
    assert lines, f"nothing on stderr for {argv}"
    assert not any("Traceback" in line for line in lines)
    last = lines[-1]
    assert last.startswith("vlmcut") and "error:" in last, lines
    assert fragment in last, f"{fragment!r} not in {last!r}"
    if not lines[0].startswith("usage:"):  # not argparse's own usage error: exactly one line
        assert len(lines) == 1, lines


@pytest.mark.parametrize(
    ("argv", "fragment"), CASES, ids=[" ".join(c[0][:4]) + f" [{i}]" for i, c in enumerate(CASES)]
)
def test_bad_invocation_is_one_clear_line(argv, fragment, paths, capsys) -> None:
    _check(argv, fragment, paths, capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
@pytest.mark.parametrize(("argv", "fragment"), CUDA_CASES)
def test_cuda_without_a_gpu(argv, fragment, paths, capsys) -> None:
    _check(argv, fragment, paths, capsys)


def test_enough_cases() -> None:
    assert len(CASES) + len(CUDA_CASES) >= 40


def test_our_errors_exit_2_with_the_command_name(paths, capsys) -> None:
    code, lines = _invoke(["run", "--model", "{model}", "--image", "{dir}", "--prompt", "q"], paths, capsys)
    assert code == 2
    assert lines == [
        f"vlmcut run: error: argument --image: {paths['dir']} is a directory; pass an image file"
    ]


def test_debug_env_off_values(paths, monkeypatch, capsys) -> None:
    for off in ("", "0", "false"):
        monkeypatch.setenv("VLMCUT_DEBUG", off)
        code, lines = _invoke(
            ["run", "--model", "{model}", "--image", "{missing}", "--prompt", "q"], paths, capsys
        )
        assert code == 2 and len(lines) == 1


def test_debug_env_shows_the_traceback(paths, monkeypatch) -> None:
    monkeypatch.setenv("VLMCUT_DEBUG", "1")
    with pytest.raises(cli.UsageError, match="--image") as info:
        cli.main(["run", "--model", paths["model"], "--image", paths["missing"], "--prompt", "q"])
    assert isinstance(info.value.__cause__, FileNotFoundError)


def test_real_bugs_are_not_hidden(paths, monkeypatch) -> None:
    """A RuntimeError raised outside vlmcut's own checks (torch, a bug) keeps its traceback."""

    def boom(args):
        torch.zeros(2) @ torch.zeros(3)  # RuntimeError from torch

    monkeypatch.setattr(cli, "_cmd_demo", boom)
    with pytest.raises(RuntimeError):
        cli.main(["demo"])


def test_foreign_value_error_gets_a_debug_hint(monkeypatch, capsys) -> None:
    """A ValueError from third-party code is one line too, pointing at VLMCUT_DEBUG for the traceback."""

    def foreign(args):
        json.loads("{")

    monkeypatch.setattr(cli, "_cmd_demo", foreign)
    assert cli.main(["demo"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("vlmcut demo: error: ") and "VLMCUT_DEBUG=1" in lines[0]


def test_bench_module_main_reports_one_line(paths, capsys) -> None:
    """``python -m vlmcut.cli.bench`` goes through the same handler."""
    from vlmcut.cli import bench as cli_bench

    for argv, fragment in (
        (["--preset", "tiny", "--keeps", "16", "--repeats", "0"], "--repeats"),
        (["--model", paths["missing"]], "--model"),
    ):
        try:
            code = cli_bench.main(argv)
        except SystemExit as exit_:
            code = exit_.code
        assert code == 2
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert lines[-1].startswith("vlmcut bench: error:") and fragment in lines[-1]


def test_console_entry_point_prints_no_traceback(paths, tmp_path: Path) -> None:
    env = {**os.environ, "VLMCUT_DEBUG": ""}
    argv = ["run", "--model", paths["model"], "--image", paths["txt"], "--prompt", "q"]
    proc = subprocess.run(
        [sys.executable, "-m", "vlmcut.cli", *argv],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [
        f"vlmcut run: error: argument --image: {paths['txt']} is not a readable image (cannot identify image file "
        f"{paths['txt']!r}); pass a PNG, JPEG or other image file"
    ]


# ---------------------------------------------------------------------------------------------------
# vlmcut.eval.runner: its arguments are checked before anything runs (no model needed)
# ---------------------------------------------------------------------------------------------------

RUNNER_CASES = [
    ("evaluate", {"samples": []}, ValueError, "no samples"),
    ("evaluate", {"batch_size": 0}, ValueError, "batch_size"),
    ("evaluate", {"batch_size": 2.0}, TypeError, "batch_size"),
    ("evaluate", {"method": "grid"}, ValueError, "both method and keep"),
    ("sweep", {"datasets": {}}, ValueError, "datasets"),
    ("sweep", {"datasets": {"scenes": []}}, ValueError, "no samples"),
    ("sweep", {"methods": []}, ValueError, "methods"),
    ("sweep", {"methods": "grid"}, ValueError, "methods"),
    ("sweep", {"methods": ["nope"]}, ValueError, "unknown method"),
    ("sweep", {"keeps": []}, ValueError, "keeps"),
    ("sweep", {"keeps": [16, 0]}, ValueError, "keeps"),
    ("sweep", {"keeps": [True]}, TypeError, "keeps"),
    ("sweep", {"batch_size": -1}, ValueError, "batch_size"),
]


@pytest.mark.parametrize(("func", "change", "exc", "fragment"), RUNNER_CASES)
def test_eval_runner_checks_its_arguments(func, change, exc, fragment) -> None:
    from vlmcut.eval import runner

    sample = object()  # never read: the checks come first
    if func == "evaluate":
        kwargs = {"samples": [sample], "dataset": "scenes", "batch_size": 4, **change}
        call = lambda: runner.evaluate(None, None, **kwargs)  # noqa: E731
    else:
        kwargs = {
            "datasets": {"scenes": [sample]},
            "methods": ["grid"],
            "keeps": [16],
            "batch_size": 4,
            **change,
        }
        call = lambda: runner.sweep(None, None, **kwargs)  # noqa: E731
    with pytest.raises(exc, match=fragment):
        call()
