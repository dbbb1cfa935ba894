"""The server's engine-driven SHM pool, mapped into this process.

The server owns the segment (``/dev/shm/lmcache_l1_pool_<name>``) and hands out slots as
``(offset, length, shape, dtype)``. Nothing it sends is trusted: every slot is checked
against the mapped size, the expected chunk shape and dtype before a tensor view is made,
so a bad descriptor can never make us write outside the slot.
"""

from __future__ import annotations

import logging
import math
import mmap
import os
import re
from typing import TYPE_CHECKING

from kvconn_plugin.client.protocol import SlotDescriptor
from kvconn_plugin.errors import KVConnProtocolError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,200}$")

# torch dtype names the server may send, with their sizes in bytes.
DTYPE_SIZES = {
    "float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int8": 1, "uint8": 1,
    "float8_e4m3fn": 1, "float8_e5m2": 1, "float8_e4m3fnuz": 1, "float8_e5m2fnuz": 1,
    "int16": 2, "int32": 4, "int64": 8,
}


class ShmPool:
    """A read-write mapping of the server's SHM pool.

    Args:
        shm_name: the name the server returned at registration (no leading ``/``).
        pool_size: the size the server announced; the segment must be at least that large.
    """

    def __init__(self, shm_name: str, pool_size: int):
        name = shm_name.lstrip("/")
        if not _SAFE_NAME.match(name):
            raise KVConnProtocolError(f"server sent an unusable SHM name {shm_name!r}")
        if pool_size <= 0:
            raise KVConnProtocolError(f"server sent SHM pool size {pool_size}")
        self.name = name
        path = os.path.join(SHM_DIR, name)
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError as exc:
            raise KVConnProtocolError(
                f"cannot open the server's SHM pool {path}: {exc}. The server and vLLM must "
                "share /dev/shm (same host, same IPC namespace)"
            ) from exc
        try:
            actual = os.fstat(fd).st_size
            if actual < pool_size:
                raise KVConnProtocolError(
                    f"SHM pool {path} is {actual} bytes, server announced {pool_size}"
                )
            self._mmap = mmap.mmap(fd, pool_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self.size = pool_size
        self._tensor: torch.Tensor | None = None

    @property
    def tensor(self) -> torch.Tensor:
        """The whole pool as one uint8 CPU tensor (zero-copy), created on first use.

        Always a normal tensor: the first use is usually on vLLM's engine thread under
        ``torch.inference_mode()``, and an inference tensor's slots could then not be
        written from our store finisher thread (outside inference mode)."""
        if self._tensor is None:
            import torch

            with torch.inference_mode(False):
                self._tensor = torch.frombuffer(self._mmap, dtype=torch.uint8)
        return self._tensor

    @property
    def address(self) -> int:
        return int(self.tensor.data_ptr())

    def check_slot(
        self, slot: SlotDescriptor, expected_shape: tuple[int, ...], expected_dtype: str
    ) -> None:
        """Raise ``KVConnProtocolError`` unless the slot is exactly one chunk inside the pool."""
        itemsize = DTYPE_SIZES.get(slot.dtype)
        if itemsize is None or slot.dtype != expected_dtype:
            raise KVConnProtocolError(f"slot dtype {slot.dtype!r}, expected {expected_dtype!r}")
        if tuple(slot.shape) != tuple(expected_shape):
            raise KVConnProtocolError(f"slot shape {slot.shape}, expected {list(expected_shape)}")
        nbytes = math.prod(expected_shape) * itemsize
        if slot.length != nbytes:
            raise KVConnProtocolError(f"slot length {slot.length}, expected {nbytes}")
        if slot.offset < 0 or slot.offset + slot.length > self.size:
            raise KVConnProtocolError(
                f"slot [{slot.offset}, {slot.offset + slot.length}) outside pool of {self.size}"
            )
        if slot.offset % itemsize:
            # torch refuses a dtype view of a misaligned byte offset (RuntimeError), and
            # the server always aligns slots (4096 by default).
            raise KVConnProtocolError(f"slot offset {slot.offset} not aligned to {itemsize}")

    def slot_view(
        self, slot: SlotDescriptor, expected_shape: tuple[int, ...], expected_dtype: str
    ) -> torch.Tensor:
        """A validated uint8 view of one slot (no copy)."""
        self.check_slot(slot, expected_shape, expected_dtype)
        return self.tensor[slot.offset : slot.offset + slot.length]

    def typed_view(
        self, slot: SlotDescriptor, expected_shape: tuple[int, ...], expected_dtype: str
    ) -> torch.Tensor:
        """A validated view of one slot with its dtype and shape (no copy).

        Prefer this for copies: torch copies a typed tensor markedly faster than the same
        bytes as uint8 (coarser parallel grain).
        """
        import torch

        raw = self.slot_view(slot, expected_shape, expected_dtype)
        return raw.view(getattr(torch, expected_dtype)).view(tuple(expected_shape))

    def close(self) -> None:
        self._tensor = None
        try:
            self._mmap.close()
        except BufferError:
            # A tensor view is still alive somewhere; the mapping goes when it does.
            logger.debug("SHM pool %s still referenced; unmapping deferred", self.name)

    def __enter__(self) -> ShmPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
