#!/usr/bin/env bash
# The suite against the newest releases of every test, tool, serve and export dependency: a fresh
# virtual environment, torch and torchvision pinned as README.md pins them, then
# `pip install -e '.[dev]'` WITHOUT constraints.txt, so pip takes the newest release that
# pyproject.toml's ranges allow. Prints what differs from constraints.txt, then runs the README's
# test command. docs/testing.md says what to do when it fails.
#
#   bash tools/test_newest.sh                    # the whole `-m "not slow"` suite (~5 min, 2 cores)
#   bash tools/test_newest.sh tests/test_serve.py -x    # other pytest arguments instead
#   PRN_NEWEST_VENV=/tmp/newest PRN_NEWEST_PRE=1 bash tools/test_newest.sh   # pre-releases too
#
# The venv (default /tmp/prn-newest-venv) is recreated on every run; a folder that is not a venv
# is refused rather than emptied.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${PRN_NEWEST_VENV:-/tmp/prn-newest-venv}"
PYTHON="${PYTHON:-python3}"
TORCH_PINS=(torch==2.14.1 torchvision==0.29.1)   # as README.md and .ci/run
PRE=()
[ -n "${PRN_NEWEST_PRE:-}" ] && PRE=(--pre)

if [ -e "$VENV" ] && [ ! -f "$VENV/pyvenv.cfg" ] && [ -n "$(ls -A "$VENV" 2>/dev/null)" ]; then
    echo "test_newest: $VENV exists and is not a virtual environment; set PRN_NEWEST_VENV" >&2
    exit 2
fi
echo "== fresh venv in $VENV"
"$PYTHON" -m venv --clear "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install --quiet --upgrade pip
"$PY" -m pip install --quiet "${TORCH_PINS[@]}"
# no constraints.txt: the newest releases pyproject.toml allows (--upgrade-strategy eager also
# lifts anything the torch step happened to bring at an older version); only torch and
# torchvision stay at the pins, which eager would otherwise lift too
TORCH_ONLY="$VENV/torch-pins.txt"
printf '%s\n' "${TORCH_PINS[@]}" > "$TORCH_ONLY"
"$PY" -m pip install --quiet --upgrade --upgrade-strategy eager "${PRE[@]}" -c "$TORCH_ONLY" -e '.[dev]'

echo "== versions that differ from constraints.txt (locked, here)"
"$PY" tools/lock_constraints.py --check || true
echo "== held back by pyproject.toml (upper bounds, each for a known break)"
"$PY" - <<'EOF'
import re, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
reqs = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
bounded = [r for r in reqs if re.search(r"<(?!=?\s*$)", r)]
print("\n".join(bounded) if bounded else "none")
EOF
"$PY" -c "import pytest, sys; print(f'== pytest {pytest.__version__} on Python {sys.version.split()[0]}')"

export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
if [ "$#" -eq 0 ]; then
    set -- -m "not slow" -n auto
fi
"$PY" -m pytest -p no:cacheprovider "$@"
