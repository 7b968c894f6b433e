#!/usr/bin/env bash
# Create ./.venv with the tested versions (requirements-tested.txt) and mt_dialog installed in
# editable mode with its test, hf and bench extras. Idempotent: a second run only checks a stamp.
# PYTHON=python3.11 bash scripts/setup.sh picks the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
python_bin=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($python_bin --version 2>&1)" >&2
  "$python_bin" -m venv .venv
fi
stamp=.venv/.mt_dialog-installed
want=$(cat requirements-tested.txt setup.py | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing the tested versions into .venv (about a minute)" >&2
  # torch first and pinned: an unpinned torch would pull a multi-GB CUDA build on CPU machines
  .venv/bin/python -m pip install -q --disable-pip-version-check -c requirements-tested.txt torch
  .venv/bin/python -m pip install -q --disable-pip-version-check -c requirements-tested.txt \
    -e ".[test,hf,bench]"
  echo "$want" > "$stamp"
fi
