#!/usr/bin/env bash
# The GPU check kit (README "GPU work"): on a machine with one NVIDIA GPU, every GPU step in
# order, each in its own process with its own time limit, in at most 8 minutes; writes
# gpu_check_report.md and gpu_check_report.json to --out (default runs/gpu_check). Without a
# GPU it runs the CPU-safe parts, marks every GPU step skipped, and exits 0.
#   bash scripts/gpu_check.sh [--out DIR] [--steps gpu_tests,kernels,train,video] [--no-gpu] [--plan]
set -euo pipefail
cd "$(dirname "$0")/.."
# Only the installed package is imported (never the checkout's kernels/ as a top-level module).
export PYTHONSAFEPATH=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY="${PYTHON:-.venv/bin/python}"
exec "$PY" bench/gpu_check.py "$@"
