"""ctypes loader for the compiled transfer libraries (csrc/), which expose a plain C ABI.

Nothing here links or imports libtorch: the libraries take raw pointers, so one build serves
every torch release. Loading never touches the GPU; the CUDA runtime inside libkvconn_cuda.so
initialises lazily on the first CUDA call.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

ABI_VERSION = 1  # must match KVC_ABI_VERSION in csrc/kv_transfer.h

LIB_DIR = Path(__file__).resolve().parent.parent / "lib"
CPU_LIB_PATH = LIB_DIR / "libkvconn_cpu.so"
CUDA_LIB_PATH = LIB_DIR / "libkvconn_cuda.so"

KVC_OK = 0

# How the CUDA path moves bytes between the GPU and pinned host memory (KVCONN_CUDA_COPY or
# KVTransfer(cuda_copy=...) override it; benchmarks/bench_transfer.py times both).
# "staged": SM gather into a device staging buffer + ONE copy-engine DMA (retrieve: DMA, then SM
# scatter). "zerocopy": the SM kernel reads/writes the mapped host pages over PCIe.
# Default "staged" in both directions. NOT yet measured by this project: the session that wrote
# this had no GPU lent. The choice rests on published PCIe Gen5 anchors (shared/docs/anchors.md):
#   * H2D: SM zero-copy READS of host memory reach ~35 GB/s vs ~50-55 GB/s for a DMA, so staged
#     wins clearly; the extra D2D scatter of a 32 MiB chunk costs ~30 us at ~1 TB/s (~5%).
#   * D2H: zero-copy WRITES (~53 GB/s) are about as fast as a DMA, but a zero-copy kernel holds
#     its SMs for the whole PCIe transfer (~0.6 ms per 32 MiB chunk) while staged holds them only
#     for the D2D gather, and vLLM measured DMA beating faster SM copies end to end because SM
#     copies compete with the model. Staged also works from pageable memory.
# Re-run `python benchmarks/bench_transfer.py --sweep-ctas` on the target GPU to confirm.
DEFAULT_CUDA_COPY = "staged"
# CTAs per launch (out of 132 SMs on an H200): ~1 TB/s for the D2D staging pass (16 KiB in
# flight per CTA), so the pass stays a few % of the PCIe time, while a transfer overlapping a
# forward pass can never occupy the whole GPU.
DEFAULT_MAX_CTAS = 64


class KVGeometry(ctypes.Structure):
    """Mirror of `KVGeometry` in csrc/kv_transfer.h."""

    _fields_ = [
        ("abi_version", ctypes.c_int32),
        ("num_layers", ctypes.c_int32),
        ("num_planes", ctypes.c_int32),
        ("num_heads", ctypes.c_int32),
        ("block_size", ctypes.c_int32),
        ("reserved", ctypes.c_int32),
        ("num_blocks", ctypes.c_int64),
        ("run_bytes", ctypes.c_int64),
        ("block_stride", ctypes.c_int64),
        ("head_stride", ctypes.c_int64),
        ("token_stride", ctypes.c_int64),
        ("plane_stride", ctypes.c_int64),
    ]


_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_I32 = ctypes.c_int
_GEOM = ctypes.POINTER(KVGeometry)


def _bind(lib: ctypes.CDLL, name: str, restype, argtypes) -> None:
    fn = getattr(lib, name)
    fn.restype = restype
    fn.argtypes = argtypes


def _load_cpu() -> tuple[ctypes.CDLL | None, str]:
    if not CPU_LIB_PATH.exists():
        return None, f"{CPU_LIB_PATH} not found (package built without the C++ library?)"
    try:
        lib = ctypes.CDLL(str(CPU_LIB_PATH))
        _bind(lib, "kvc_abi_version", _I32, [])
        _bind(lib, "kvc_cpu_last_error", ctypes.c_char_p, [])
        _bind(lib, "kvc_cpu_gather", _I32, [_GEOM, _P, _P, _I64, _P, _I32])
        _bind(lib, "kvc_cpu_scatter", _I32, [_GEOM, _P, _P, _I64, _I64, _P, _I32])
    except (OSError, AttributeError) as exc:
        return None, f"cannot load {CPU_LIB_PATH}: {exc}"
    if lib.kvc_abi_version() != ABI_VERSION:
        return None, f"{CPU_LIB_PATH} has ABI {lib.kvc_abi_version()}, expected {ABI_VERSION}"
    return lib, "loaded"


def _load_cuda() -> tuple[ctypes.CDLL | None, str]:
    if not CUDA_LIB_PATH.exists():
        return None, f"{CUDA_LIB_PATH} not found (built without nvcc?)"
    try:
        lib = ctypes.CDLL(str(CUDA_LIB_PATH))
        _bind(lib, "kvc_cuda_abi_version", _I32, [])
        _bind(lib, "kvc_cuda_last_error", ctypes.c_char_p, [])
        _bind(lib, "kvc_cuda_runtime_version", _I32, [])
        _bind(lib, "kvc_cuda_device_count", _I32, [])
        _bind(lib, "kvc_cuda_check_device_ptr", _I32, [_P, _I32])
        _bind(lib, "kvc_cuda_is_mapped_host", _I32, [_P])
        _bind(lib, "kvc_cuda_host_register", _I32, [_P, _I64])
        _bind(lib, "kvc_cuda_host_unregister", _I32, [_P])
        _bind(lib, "kvc_cuda_stream_synchronize", _I32, [_P])
        _bind(lib, "kvc_cuda_gather", _I32, [_GEOM, _P, _P, _I64, _P, _P, _I32, _I32, _P])
        _bind(lib, "kvc_cuda_scatter", _I32, [_GEOM, _P, _P, _I64, _I64, _P, _P, _I32, _I32, _P])
        # Test hook: the device code path run on the host (no GPU needed).
        _bind(lib, "kvc_cuda_host_emulate", _I32, [_I32, _GEOM, _P, _P, _I64, _I64, _P, _P, _I32])
    except (OSError, AttributeError) as exc:
        return None, f"cannot load {CUDA_LIB_PATH}: {exc}"
    if lib.kvc_cuda_abi_version() != ABI_VERSION:
        return None, f"{CUDA_LIB_PATH} has ABI {lib.kvc_cuda_abi_version()}, expected {ABI_VERSION}"
    return lib, "loaded"


cpu_lib, cpu_status = _load_cpu()
cuda_lib, cuda_status = _load_cuda()


def cpu_error() -> str:
    return cpu_lib.kvc_cpu_last_error().decode(errors="replace") if cpu_lib else cpu_status


def cuda_error() -> str:
    return cuda_lib.kvc_cuda_last_error().decode(errors="replace") if cuda_lib else cuda_status
