"""Build script: only decides which native libraries to compile (all metadata is in pyproject).

* csrc/kv_transfer_cpu.cpp  -> kvconn_plugin/lib/libkvconn_cpu.so   always (system C++ compiler)
* csrc/kv_transfer_cuda.cu  -> kvconn_plugin/lib/libkvconn_cuda.so  when nvcc is found

Both are plain C ABIs loaded with ctypes: no torch at build time, no libtorch link, cudart
static. KVCONN_BUILD_CUDA=auto|0|1 (1: fail the build if the CUDA library cannot be built),
KVCONN_BUILD_CPU=auto|1 (1: fail if the C++ library cannot be built), KVCONN_CUDA_ARCHS
(e.g. "80;90", PTX of the last is embedded), CXX, CUDA_HOME, NVCC_THREADS, KVCONN_DEBUG=1.
Every build writes kvconn_plugin/_build_info.py with what was built and why.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from setuptools import Distribution, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
# Machine code for Ampere through Hopper, plus Blackwell where nvcc knows it (12.8+); the PTX of
# the newest listed arch is embedded too, so later GPUs still load the library (JIT).
DEFAULT_ARCHS = "80;86;89;90"
BLACKWELL_ARCHS = "100;120"


def default_archs(release: tuple[int, int]) -> str:
    return f"{DEFAULT_ARCHS};{BLACKWELL_ARCHS}" if release >= (12, 8) else DEFAULT_ARCHS


def log(msg: str) -> None:
    print(f"[kvconn-plugin setup] {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str]) -> None:
    log(" ".join(cmd))
    subprocess.run(cmd, check=True, cwd=ROOT)


def tool_version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        return f"unknown ({exc})"
    lines = [ln for ln in out.strip().splitlines() if ln.strip()]
    return lines[0] if lines else ""


def find_nvcc() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidates = [Path(cuda_home) / "bin" / "nvcc"] if cuda_home else []
    which = shutil.which("nvcc")
    candidates += [Path(which)] if which else []
    candidates.append(Path("/usr/local/cuda/bin/nvcc"))
    return next((str(c) for c in candidates if c.is_file()), None)


def nvcc_release(nvcc: str) -> tuple[int, int] | None:
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    except OSError:
        return None
    m = re.search(r"release (\d+)\.(\d+)", out) or re.search(r"V(\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def build_cpu(out_dir: Path, info: dict) -> None:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or "c++"
    opt = ["-O0", "-g"] if os.environ.get("KVCONN_DEBUG") == "1" else ["-O3"]
    flags = [*opt, "-std=c++17", "-fPIC", "-shared", "-pthread", "-fvisibility=hidden", "-Wall"]
    info.update(CPU_COMPILER=cxx, CPU_COMPILER_VERSION=tool_version([cxx, "--version"]),
                CPU_FLAGS=" ".join(flags))
    out = out_dir / "libkvconn_cpu.so"
    try:
        run([cxx, *flags, "-o", str(out), str(CSRC / "kv_transfer_cpu.cpp")])
    except (OSError, subprocess.CalledProcessError) as exc:
        info.update(CPU_LIBRARY=False, CPU_REASON=f"C++ build failed: {exc}")
        if os.environ.get("KVCONN_BUILD_CPU", "auto") == "1":
            raise
        log(f"C++ library NOT built ({exc}); the PyTorch fallback will be used")
        return
    info.update(CPU_LIBRARY=True, CPU_REASON="built")


def build_cuda(out_dir: Path, info: dict) -> None:
    mode = os.environ.get("KVCONN_BUILD_CUDA", "auto").strip().lower()
    out = out_dir / "libkvconn_cuda.so"
    if mode == "0":
        out.unlink(missing_ok=True)
        info.update(CUDA_LIBRARY=False, CUDA_REASON="KVCONN_BUILD_CUDA=0")
        return

    def skip(reason: str) -> None:
        if mode == "1":
            raise RuntimeError(f"KVCONN_BUILD_CUDA=1 but the CUDA library cannot be built: "
                               f"{reason}")
        log(f"CUDA library skipped: {reason}")
        out.unlink(missing_ok=True)
        info.update(CUDA_LIBRARY=False, CUDA_REASON=reason)

    nvcc = find_nvcc()
    if nvcc is None:
        return skip("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    release = nvcc_release(nvcc)
    if release is None or release < (11, 8):
        return skip(f"nvcc {release} is too old or unparsable (need >= 11.8)")
    archs = [a.strip().replace(".", "") for a in
             os.environ.get("KVCONN_CUDA_ARCHS", default_archs(release)).split(";") if a.strip()]
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    gencode.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")  # PTX
    opt = ["-O0", "-g", "-lineinfo"] if os.environ.get("KVCONN_DEBUG") == "1" else ["-O3"]
    flags = [*opt, "-std=c++17", "-shared", "-Xcompiler", "-fPIC,-fvisibility=hidden",
             "-cudart", "static", "--threads", os.environ.get("NVCC_THREADS", "2"), *gencode]
    info.update(NVCC=nvcc, NVCC_VERSION=f"{release[0]}.{release[1]}", CUDA_FLAGS=" ".join(flags),
                CUDA_ARCHS=";".join(archs) + "+PTX")
    try:
        run([nvcc, *flags, "-o", str(out), str(CSRC / "kv_transfer_cuda.cu")])
    except (OSError, subprocess.CalledProcessError) as exc:
        return skip(f"nvcc failed: {exc}")
    info.update(CUDA_LIBRARY=True, CUDA_REASON="built")


def write_build_info(pkg_dir: Path, info: dict) -> None:
    lines = ['"""Generated by setup.py: what the native build produced and why."""', ""]
    lines += [f"{key} = {value!r}" for key, value in sorted(info.items())]
    (pkg_dir / "_build_info.py").write_text("\n".join(lines) + "\n")


class BuildNativeLibs(build_ext):
    """Compiles the ctypes libraries; editable installs write them into the source tree."""

    def run(self) -> None:
        inplace = self.inplace or getattr(self, "editable_mode", False)
        pkg_dir = ROOT / "kvconn_plugin" if inplace else Path(self.build_lib) / "kvconn_plugin"
        out_dir = pkg_dir / "lib"
        out_dir.mkdir(parents=True, exist_ok=True)
        info: dict = {"BUILD_TIME": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "INPLACE": bool(inplace)}
        build_cpu(out_dir, info)
        build_cuda(out_dir, info)
        write_build_info(pkg_dir, info)
        self._outputs = [str(p) for p in out_dir.glob("*.so")] + [str(pkg_dir / "_build_info.py")]

    def get_outputs(self) -> list[str]:
        return list(getattr(self, "_outputs", []))

    def get_output_mapping(self) -> dict[str, str]:
        return {}


class NativeDistribution(Distribution):
    """Marks the wheel platform-specific (it carries .so files) and makes `build` run build_ext."""

    def has_ext_modules(self) -> bool:
        return True


setup(distclass=NativeDistribution, cmdclass={"build_ext": BuildNativeLibs})
