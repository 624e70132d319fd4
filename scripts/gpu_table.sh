#!/usr/bin/env bash
# The paper's Table 5 on a GPU, in one call (issue 19): LLaVA-1.5-7B (576 visual tokens, keeps 192/128/64)
# and LLaVA-NeXT-7B (672x672 -> 2x2 grid + base crop = 5 x 576 = 2880 tokens, keeps 640/320/160), full
# depth, bf16, SDPA, random weights from the presets' configs, every method each model supports plus the
# unpruned and oracle rows; 2 warm-up + 5 timed rounds, 8 decode steps. Writes into $OUT (default
# out/table5): table5.md, table5.json, and per model <preset>/bench.md + bench.json (6 files, 1 folder level;
# the device returns at most 8 files). The Python side is vlmcut/bench/table5.py.
#
#   bash scripts/gpu_table.sh [OUTDIR]             # the GPU run (needs CUDA)
#   bash scripts/gpu_table.sh --dry-run [OUTDIR]   # the same code path on CPU: tiny presets, float32,
#                                                  # 1 warm-up + 1 timed round (tests/test_gpu_table.py)
#
# On the device machine (an H200; python3 = Python 3.12 with torch 2.11 + transformers 5.17 preinstalled,
# nothing can be downloaded there) nothing is installed from the network. Our declared range is
# transformers>=5.19,<5.25 and the lock pins 5.24.0, so the run carries the wheel in .whl/ (git-ignored):
#
#   .whl/transformers-5.24.0-py3-none-any.whl   (13.5 MB; pure Python). Made on a machine with a registry:
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl transformers==5.24.0
#   Its Requires-Dist are met by the device's preinstalled packages (huggingface_hub 1.33.0 >= 1.31,
#   tokenizers 0.23.2 in [0.23.1, 0.24), safetensors 0.8.0 >= 0.8.0, numpy, regex >= 2025.10.22 as 5.17
#   already required, typer, pyyaml, packaging, tqdm), so nothing else is carried. matplotlib and pillow are
#   not needed (no PNG is written).
#
# The one call on a lent device (the `run` tool):
#   command "bash scripts/gpu_table.sh", carry [".whl"], timeout_s 600
#
# Time estimate on one H200: ~0.5 min for the wheel install, imports and CUDA start; per model ~28 variants
# x 7 rounds x (prefill 30-90 ms + 8 decode steps of ~20-30 ms, eager) ~ 1-1.5 min, plus ~10 s to build
# the random 7B model on the GPU and the untimed set-up passes: about 3-4 min in all, < 6 min if decode
# runs at 50 ms/token. table5.* is rewritten after each model, so a run cut short keeps the first model.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-python3}"

dry=()
if [[ "${1:-}" == "--dry-run" ]]; then
    dry=(--dry-run)
    shift
fi
if [[ $# -gt 1 || "${1:-}" == -* ]]; then
    echo "usage: bash scripts/gpu_table.sh [--dry-run] [OUTDIR]" >&2
    exit 2
fi
if [[ ${#dry[@]} -gt 0 ]]; then
    out="${1:-${OUT:-$root/out/table5-dry-run}}"
else
    out="${1:-${OUT:-$root/out/table5}}"
fi
mkdir -p "$out"

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1

# The carried wheels, installed without the network into a private folder in front of site-packages. The
# dry run installs them too (into a temporary folder), so the install line is checked before the GPU call.
shopt -s nullglob
wheels=(.whl/*.whl)
shopt -u nullglob
if [[ ${#wheels[@]} -gt 0 ]]; then
    if [[ ${#dry[@]} -gt 0 ]]; then
        site="$(mktemp -d)"
        trap 'rm -rf "$site"' EXIT
    else
        site=/tmp/site
    fi
    if "$py" -m pip --version >/dev/null 2>&1; then
        "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
            "${wheels[@]}" && export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    else  # no pip: a pure-Python wheel is a zip of the package
        for w in "${wheels[@]}"; do
            [[ "$w" == *-none-any.whl ]] || { echo "gpu_table: no pip to install $w" >&2; exit 1; }
            "$py" -m zipfile -e "$w" "$site"
        done
        export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    fi
    echo "gpu_table: installed ${wheels[*]} into $site" >&2
fi

# vlmcut is not installed on the device: run it from the checkout.
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
"$py" -c 'import sys, torch, transformers; print(f"gpu_table: python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__} ({transformers.__file__}), cuda {torch.cuda.is_available()}")' >&2

start=$SECONDS
status=0
"$py" -m vlmcut.bench.table5 "${dry[@]}" --out "$out" || status=$?
echo "gpu_table: exit $status after $((SECONDS - start)) s; output in $out" >&2
exit "$status"
