"""Front door of the KV gather/scatter kernels.

`KVTransfer` moves one LMCache chunk (all layers) between vLLM's paged KV cache and a
C-contiguous slot image ``[P, L, T, H*R]`` bytes (lmcache-mp-protocol.md §9.4).

The backend is chosen ONCE, at import, from ``KVCONN_KERNELS``:
  * ``auto`` (default): the compiled libraries when they load, else the PyTorch fallback
    (one INFO log with the loader's reason);
  * ``torch``: always the fallback;
  * ``native`` (alias ``cuda``): raise ImportError with the loader's reason when the CPU library,
    or on a CUDA build of torch the CUDA library, cannot be loaded.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from kvconn_plugin.errors import KVConnTransferError
from kvconn_plugin.ops import _native
from kvconn_plugin.ops._torch_impl import TorchTransfer
from kvconn_plugin.ops.layout import (
    PagedKVLayout,
    layer_base_pointers,
    layout_from_vllm_views,
)

__all__ = [
    "BACKEND",
    "KVTransfer",
    "PagedKVLayout",
    "backend_info",
    "layout_from_vllm_views",
    "pin_host_memory",
    "unpin_host_memory",
]

logger = logging.getLogger(__name__)

CUDA_COPY_MODES = ("staged", "zerocopy")


def _resolve_backend() -> tuple[str, str, str]:
    """Returns (BACKEND, requested, why)."""
    requested = os.environ.get("KVCONN_KERNELS", "auto").strip().lower() or "auto"
    if requested == "torch":
        return "torch", requested, "KVCONN_KERNELS=torch"
    if requested in ("native", "cuda"):
        if _native.cpu_lib is None:
            raise ImportError(f"KVCONN_KERNELS={requested}: {_native.cpu_status}")
        if torch.version.cuda is not None and _native.cuda_lib is None:
            raise ImportError(f"KVCONN_KERNELS={requested}: {_native.cuda_status}")
        return "native", requested, f"KVCONN_KERNELS={requested}"
    if requested != "auto":
        raise ImportError(f"KVCONN_KERNELS must be auto, torch or native; got {requested!r}")
    if _native.cpu_lib is None:
        logger.info("kvconn kernels: using the PyTorch fallback (%s)", _native.cpu_status)
        return "torch", requested, _native.cpu_status
    return "native", requested, "native libraries loaded"


BACKEND, _REQUESTED, _WHY = _resolve_backend()


def _default_threads() -> int:
    env = os.environ.get("KVCONN_CPU_THREADS")
    if env:
        return max(1, int(env))
    # Copies are memory-bound: a few threads reach DRAM bandwidth, more only steal cores from
    # the engine (vLLM's CPU backend pins its OpenMP threads to most cores).
    return max(1, min(8, (os.cpu_count() or 1) // 4))


def _cuda_index(device: str) -> int:
    return int(device.split(":", 1)[1])


class KVTransfer:
    """Gathers/scatters the blocks of one chunk for a fixed layout and set of layer tensors.

    Binds the layer tensors once: base pointers and their bounds are checked here, not per
    call. Every call checks its block ids, sizes and pointers before anything is written and
    raises `KVConnTransferError` on a bad argument.

    CUDA calls are queued on `stream` (default: torch's current stream on the KV device) and
    return at once; `synchronize()` waits for them. The host memory must then stay valid and
    untouched until the copies land.
    """

    def __init__(
        self,
        layout: PagedKVLayout,
        views: list[torch.Tensor],
        backend: str | None = None,
        *,
        cuda_copy: str | None = None,
        max_ctas: int | None = None,
        num_threads: int | None = None,
    ) -> None:
        layout.validate()
        bases = layer_base_pointers(layout, views)
        self.layout = layout
        self._views = list(views)  # keeps the storages alive while pointers are in use
        self._is_cuda = layout.device != "cpu"
        self.backend = self._pick_backend(backend)
        self.cuda_copy = cuda_copy or os.environ.get("KVCONN_CUDA_COPY", _native.DEFAULT_CUDA_COPY)
        if self.cuda_copy not in CUDA_COPY_MODES:
            raise KVConnTransferError(f"cuda_copy must be one of {CUDA_COPY_MODES}")
        self.max_ctas = int(max_ctas or os.environ.get("KVCONN_MAX_CTAS", _native.DEFAULT_MAX_CTAS))
        if self.max_ctas < 1:
            raise KVConnTransferError("max_ctas must be >= 1")
        self.num_threads = num_threads or _default_threads()
        self._device = torch.device(layout.device)
        self._last_stream: Any = None
        self._torch: TorchTransfer | None = None
        if self.backend == "torch":
            self._torch = TorchTransfer(layout, self._views, bases)
            return
        self._geom = _native.KVGeometry(
            _native.ABI_VERSION,
            layout.num_layers,
            layout.num_planes,
            layout.num_heads,
            layout.block_size,
            0,
            layout.num_blocks,
            layout.run_bytes,
            layout.block_stride,
            layout.head_stride,
            layout.token_stride,
            layout.plane_stride,
        )
        self._bases = np.asarray(bases, dtype=np.uint64)
        if self._is_cuda:
            dev = _cuda_index(layout.device)
            for layer, base in enumerate(bases):
                if _native.cuda_lib.kvc_cuda_check_device_ptr(base, dev) != _native.KVC_OK:
                    raise KVConnTransferError(f"layer {layer}: {_native.cuda_error()}")

    def _pick_backend(self, backend: str | None) -> str:
        chosen = backend or BACKEND
        if chosen not in ("native", "torch"):
            raise KVConnTransferError(f"backend must be 'native' or 'torch', got {chosen!r}")
        if chosen == "torch":
            return chosen
        lib, status = (
            (_native.cuda_lib, _native.cuda_status)
            if self._is_cuda
            else (_native.cpu_lib, _native.cpu_status)
        )
        if lib is not None:
            return "native"
        if backend == "native" or _REQUESTED in ("native", "cuda"):
            raise KVConnTransferError(f"native backend unavailable: {status}")
        logger.info("kvconn kernels: %s transfers use the PyTorch fallback (%s)",
                    self.layout.device, status)
        return "torch"

    # ----------------------------------------------------------------------------- checks

    def _block_ids(self, block_ids: Sequence[int] | torch.Tensor | np.ndarray) -> np.ndarray:
        if isinstance(block_ids, torch.Tensor):
            if block_ids.is_floating_point() or block_ids.is_complex() or (
                block_ids.dtype == torch.bool
            ):
                raise KVConnTransferError(f"block ids must be integers, got {block_ids.dtype}")
            ids = block_ids.detach().to("cpu", torch.int64).numpy()
        else:
            try:
                ids = np.asarray(block_ids)
            except (TypeError, ValueError) as exc:
                raise KVConnTransferError(f"block ids are not a sequence of ints: {exc}") from exc
            if ids.size == 0:
                ids = ids.astype(np.int64)
            if ids.dtype.kind not in "iu":
                raise KVConnTransferError(f"block ids must be integers, got dtype {ids.dtype}")
        if ids.ndim != 1:
            raise KVConnTransferError(f"block ids must be 1-D, got shape {ids.shape}")
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= self.layout.num_blocks):
            raise KVConnTransferError(
                f"block ids must lie in [0, {self.layout.num_blocks}); got min {int(ids.min())}, "
                f"max {int(ids.max())}"
            )
        return np.ascontiguousarray(ids, dtype=np.int64)

    def _check_slot(self, slot: torch.Tensor, n: int, what: str) -> None:
        if not isinstance(slot, torch.Tensor):
            raise KVConnTransferError(f"{what} must be a torch.Tensor, got {type(slot).__name__}")
        if slot.dtype != torch.uint8:
            raise KVConnTransferError(f"{what} must be uint8, got {slot.dtype}")
        if not slot.is_contiguous():
            raise KVConnTransferError(f"{what} must be contiguous")
        want = self.layout.slot_bytes(n)
        if slot.numel() != want:
            raise KVConnTransferError(
                f"{what} has {slot.numel()} bytes, {n} blocks need exactly {want}"
            )
        if slot.device.type != "cpu" and slot.device != self._device:
            raise KVConnTransferError(
                f"{what} is on {slot.device}; it must be host memory or on {self._device}"
            )

    def _stream(self, stream: Any) -> tuple[Any, int]:
        """(torch stream object, raw cudaStream_t) for a CUDA call."""
        if stream is None:
            s = torch.cuda.current_stream(self._device)
        elif isinstance(stream, int):
            s = torch.cuda.ExternalStream(stream, device=self._device)
        else:
            s = stream
        return s, int(s.cuda_stream)

    # ----------------------------------------------------------------------------- transfers

    def gather(self, block_ids, dst: torch.Tensor, stream=None) -> None:
        """Copies blocks `block_ids` of every layer into the slot image `dst`.

        Args:
            block_ids: this chunk's block ids, in chunk order (duplicates allowed).
            dst: uint8 contiguous tensor of exactly ``layout.slot_bytes(len(block_ids))``
                bytes: host memory (pinned/registered for async CUDA copies) or on the KV device.
            stream: CUDA stream (torch stream or raw handle int); ignored on CPU.

        Raises:
            KVConnTransferError: bad ids, size, dtype or device; `dst` is then untouched.
        """
        ids = self._block_ids(block_ids)
        self._check_slot(dst, len(ids), "dst")
        if len(ids) == 0:
            return
        if not self._is_cuda:
            self._cpu_call(ids, dst, 0, gather=True)
        else:
            self._cuda_call(ids, dst, 0, stream, gather=True)

    def scatter(self, src: torch.Tensor, block_ids, skip_blocks: int = 0, stream=None) -> None:
        """Copies the slot image `src` into blocks ``block_ids[skip_blocks:]`` of every layer.

        The first `skip_blocks` blocks of the chunk are left alone (vLLM's prefix cache shares
        them). Block ids written must be distinct; the caller owns that invariant.

        Raises:
            KVConnTransferError: bad ids, size, skip count or device; nothing is written.
        """
        ids = self._block_ids(block_ids)
        self._check_slot(src, len(ids), "src")
        if isinstance(skip_blocks, bool) or not isinstance(skip_blocks, (int, np.integer)):
            raise KVConnTransferError(f"skip_blocks must be an int, got {skip_blocks!r}")
        skip = int(skip_blocks)
        if skip < 0 or skip > len(ids):
            raise KVConnTransferError(f"skip_blocks={skip} outside [0, {len(ids)}]")
        if skip == len(ids):
            return
        if not self._is_cuda:
            self._cpu_call(ids, src, skip, gather=False)
        else:
            self._cuda_call(ids, src, skip, stream, gather=False)

    def synchronize(self) -> None:
        """Waits until every CUDA copy issued by this object's last stream has finished."""
        if not self._is_cuda or self._last_stream is None:
            return
        self._last_stream.synchronize()

    def _cpu_call(self, ids: np.ndarray, slot: torch.Tensor, skip: int, gather: bool) -> None:
        if self._torch is not None:
            tids = torch.from_numpy(ids)
            if gather:
                self._torch.gather(tids, slot)
            else:
                self._torch.scatter(slot, tids, skip)
            return
        lib = _native.cpu_lib
        if gather:
            rc = lib.kvc_cpu_gather(self._geom, self._bases.ctypes.data, ids.ctypes.data,
                                    len(ids), slot.data_ptr(), self.num_threads)
        else:
            rc = lib.kvc_cpu_scatter(self._geom, self._bases.ctypes.data, ids.ctypes.data,
                                     len(ids), skip, slot.data_ptr(), self.num_threads)
        if rc != _native.KVC_OK:
            raise KVConnTransferError(_native.cpu_error())

    def _cuda_call(self, ids: np.ndarray, slot: torch.Tensor, skip: int, stream: Any,
                   gather: bool) -> None:
        torch_stream, handle = self._stream(stream)
        self._last_stream = torch_stream
        with torch.cuda.stream(torch_stream):
            if self._torch is not None:
                tids = torch.from_numpy(ids).to(self._device)
                if gather:
                    self._torch.gather(tids, slot)
                else:
                    self._torch.scatter(slot, tids, skip)
                return
            lib = _native.cuda_lib
            on_host = slot.device.type == "cpu"
            # Zero-copy needs host pages the kernel can address (pinned and mapped); pageable
            # or unmapped memory quietly takes the staged path, which works for any host memory.
            staged = on_host and (self.cuda_copy == "staged" or not lib.kvc_cuda_is_mapped_host(
                slot.data_ptr()))
            # Allocated on `torch_stream`, so the caching allocator only hands this memory out
            # again to work ordered after the copies queued below.
            staging = torch.empty(slot.numel(), dtype=torch.uint8, device=self._device) \
                if staged else None
            staging_ptr = staging.data_ptr() if staging is not None else None
            dev = _cuda_index(self.layout.device)
            if gather:
                rc = lib.kvc_cuda_gather(self._geom, self._bases.ctypes.data, ids.ctypes.data,
                                         len(ids), slot.data_ptr(), staging_ptr, dev,
                                         self.max_ctas, handle)
            else:
                rc = lib.kvc_cuda_scatter(self._geom, self._bases.ctypes.data, ids.ctypes.data,
                                          len(ids), skip, slot.data_ptr(), staging_ptr, dev,
                                          self.max_ctas, handle)
        if rc != _native.KVC_OK:
            raise KVConnTransferError(_native.cuda_error())


# --------------------------------------------------------------------------------- host memory


def pin_host_memory(ptr: int, nbytes: int) -> bool:
    """Page-locks an existing host range (e.g. the server's SHM pool) for async DMA.

    Returns True when the range is registered (now or before), False when CUDA is not
    available or registration failed (logged); callers then fall back to pageable copies.
    """
    if ptr <= 0 or nbytes <= 0:
        raise KVConnTransferError("pin_host_memory needs a non-null pointer and nbytes > 0")
    lib = _native.cuda_lib
    if lib is not None:
        if lib.kvc_cuda_device_count() < 1:
            return False
        rc = lib.kvc_cuda_host_register(ptr, nbytes)
        if rc < 0:
            logger.warning("cudaHostRegister of %d bytes failed: %s", nbytes, _native.cuda_error())
        return rc >= 0
    if not torch.cuda.is_available():
        return False
    err = torch.cuda.cudart().cudaHostRegister(ptr, nbytes, 0)
    code = int(getattr(err, "value", err))
    return code in (0, 712)  # 712 = cudaErrorHostMemoryAlreadyRegistered


def unpin_host_memory(ptr: int) -> bool:
    """Undoes `pin_host_memory`. Returns False when nothing was unregistered."""
    lib = _native.cuda_lib
    if lib is not None:
        if lib.kvc_cuda_device_count() < 1:
            return False
        return lib.kvc_cuda_host_unregister(ptr) == _native.KVC_OK
    if not torch.cuda.is_available():
        return False
    err = torch.cuda.cudart().cudaHostUnregister(ptr)
    return int(getattr(err, "value", err)) == 0


def backend_info() -> dict[str, Any]:
    """What was built, why, and which backend is active (for the doctor command)."""
    try:
        from kvconn_plugin import _build_info  # generated by setup.py

        build = {k: v for k, v in vars(_build_info).items() if k.isupper()}
    except ImportError:
        build = {"missing": "kvconn_plugin/_build_info.py not generated (not built via setup.py)"}
    return {
        "backend": BACKEND,
        "requested": _REQUESTED,
        "reason": _WHY,
        "cpu_library": {
            "path": str(_native.CPU_LIB_PATH),
            "loaded": _native.cpu_lib is not None,
            "status": _native.cpu_status,
        },
        "cuda_library": {
            "path": str(_native.CUDA_LIB_PATH),
            "loaded": _native.cuda_lib is not None,
            "status": _native.cuda_status,
            "runtime_version": (
                _native.cuda_lib.kvc_cuda_runtime_version() if _native.cuda_lib else None
            ),
        },
        "cpu_transfers": "native" if BACKEND == "native" and _native.cpu_lib else "torch",
        "cuda_transfers": "native" if BACKEND == "native" and _native.cuda_lib else "torch",
        "cuda_copy_default": _native.DEFAULT_CUDA_COPY,
        "max_ctas_default": _native.DEFAULT_MAX_CTAS,
        "build": build,
    }
