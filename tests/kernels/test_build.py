"""The native build itself: what setup.py produced must match what this machine can build.

`KVCONN_BUILD_CUDA=auto` (the default) skips the CUDA library when nvcc fails, so that a user
without a working toolkit still gets an install. That leniency would also hide a compile break
from CI, whose machines have nvcc but no GPU: every CUDA-library test would simply skip. These
tests turn "nvcc is here but the library was not built" into a failure that names nvcc's reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kvconn_plugin.ops import _native

ROOT = Path(__file__).resolve().parents[2]


def _nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    for cand in ([Path(home) / "bin" / "nvcc"] if home else []) + [
        Path(p) for p in [shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"] if p
    ]:
        if cand.is_file():
            return str(cand)
    return None


def _build_info() -> dict:
    try:
        from kvconn_plugin import _build_info as info
    except ImportError:
        pytest.fail("kvconn_plugin/_build_info.py is missing: the package was not built by "
                    "setup.py (pip install -e . writes it)")
    return {k: v for k, v in vars(info).items() if k.isupper()}


def test_cpu_library_was_built_and_loads():
    info = _build_info()
    assert info.get("CPU_LIBRARY") is True, info.get("CPU_REASON")
    assert _native.cpu_lib is not None, _native.cpu_status


@pytest.mark.skipif(_nvcc() is None, reason="no nvcc on this machine")
@pytest.mark.skipif(os.environ.get("KVCONN_BUILD_CUDA", "auto").strip() == "0",
                    reason="KVCONN_BUILD_CUDA=0")
def test_cuda_library_is_built_wherever_nvcc_is():
    info = _build_info()
    assert info.get("CUDA_LIBRARY") is True, (
        f"nvcc is at {_nvcc()} but the CUDA library was not built: {info.get('CUDA_REASON')}"
    )
    assert _native.cuda_lib is not None, _native.cuda_status
    assert _native.cuda_lib.kvc_cuda_abi_version() == _native.ABI_VERSION


def test_doctor_prints_the_build_record():
    out = subprocess.run([sys.executable, "-m", "kvconn_plugin"], capture_output=True,
                         text=True, timeout=120, cwd=ROOT, check=True).stdout
    assert '"backend"' in out and '"build"' in out and "CPU_REASON" in out
