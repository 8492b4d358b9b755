#!/usr/bin/env bash
# Creates .venv in the checkout and installs visioncoach with everything it needs.
# Idempotent: does nothing when pyproject.toml, setup.py and csrc/ are unchanged since the
# last successful run. On a machine with an NVIDIA GPU it adds the `gpu` extra.
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for cand in python3.11 python3; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
      PY="$cand"; break
    fi
  done
fi
if [ -z "$PY" ]; then
  echo "setup: Python 3.11 is required; set PYTHON=/path/to/python3.11" >&2
  exit 1
fi

VENV=.venv
GPU=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then GPU=1; fi
STAMP="$VENV/.visioncoach-installed"
HASH="$( { cat pyproject.toml setup.py; find csrc -type f | sort | xargs cat; echo "gpu=$GPU"; } | sha256sum | cut -d' ' -f1)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$HASH" ] && [ -x "$VENV/bin/python" ]; then
  exit 0
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip setuptools wheel ninja
# torch first, at the pins pyproject.toml names: the native extension and DeepSpeed build
# against it without build isolation (an isolated build would fetch another multi-GB torch).
TORCH_PINS="$("$VENV/bin/python" -c 'import tomllib; d = tomllib.load(open("pyproject.toml", "rb")); print(" ".join(r for r in d["project"]["dependencies"] if r.split("=")[0] in ("torch", "torchvision", "triton")))')"
echo "setup: installing $TORCH_PINS"
$PIP install $TORCH_PINS
# DeepSpeed: no prebuilt ops (they JIT-compile on GPU machines when first used).
echo "setup: installing visioncoach and its dependencies"
DS_BUILD_OPS=0 $PIP install --no-build-isolation -e ".[dev]"
if [ "$GPU" = 1 ]; then
  echo "setup: NVIDIA GPU found: adding the gpu extra (flash-attn, CuPy)"
  if ! DS_BUILD_OPS=0 $PIP install --no-build-isolation -e ".[dev,gpu]"; then
    echo "setup: WARNING: the gpu extra did not install; attention falls back to sdpa" >&2
  fi
fi
"$VENV/bin/python" -c "import visioncoach, visioncoach.kernels, visioncoach.ops as o; print('setup: native ops', o.native_info())"
echo "$HASH" > "$STAMP"
