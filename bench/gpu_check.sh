#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py has what it runs and why), from any folder:
#   bash bench/gpu_check.sh                     # results in $OUT, or: bash bench/gpu_check.sh --out DIR
#   bash bench/gpu_check.sh --dry-run --out DIR # CPU, tiny shapes: the same code paths
# Python: $PYTHON, else the checkout's .venv, else python3 (a GPU box's own, with its CUDA torch).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
py="${PYTHON:-}"
if [ -z "$py" ]; then
  if [ -x "$repo/.venv/bin/python" ]; then py="$repo/.venv/bin/python"; else py=python3; fi
fi
exec "$py" "$repo/bench/gpu_check.py" "$@"
