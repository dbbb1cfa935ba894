"""Chunk payloads of the engine-driven *pickle* fallback (server started without an SHM name).

In that mode the chunks travel inside the ZMQ messages:

* ``commit_store(key, instance_id, data)`` carries ``pickle.dumps([chunk0, chunk1, ...])``,
  one C-contiguous CPU torch tensor per chunk of ``[start, end)`` with the slot shape and
  dtype (the server unpickles it with plain ``pickle.loads`` and rejects numpy arrays);
* ``prepare_retrieve`` answers ``data = pickle.dumps([tensors])``.

Decoding server data with plain ``pickle.loads`` would let whoever answers on the port run
code in the vLLM worker. :func:`decode_chunks` therefore uses an unpickler that resolves
only the three globals a torch CPU tensor pickle needs, and loads the embedded storage
bytes with torch's own weights-only loader instead of ``torch.storage._load_from_bytes``
(which calls ``torch.load(weights_only=False)``, i.e. full pickle).
"""

from __future__ import annotations

import collections
import io
import math
import pickle
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from kvconn_plugin.errors import KVConnProtocolError

if TYPE_CHECKING:
    import torch

# What ``pickle.dumps(list[cpu tensor])`` references (torch 2.x): the tensor rebuild
# function, the storage loader, and an empty OrderedDict for backward hooks.
_REBUILD = ("torch._utils", "_rebuild_tensor_v2")
_LOAD_STORAGE = ("torch.storage", "_load_from_bytes")
_ORDERED_DICT = ("collections", "OrderedDict")

# Pickle protocol the server's own pickle.dumps uses by default; any protocol decodes.
PICKLE_PROTOCOL = pickle.DEFAULT_PROTOCOL


def _torch_dtype(dtype: torch.dtype | str) -> torch.dtype:
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown torch dtype {dtype!r}")
    return value


def encode_chunks(
    chunks: Sequence[torch.Tensor],
    expected_shape: tuple[int, ...],
    expected_dtype: torch.dtype | str,
) -> bytes:
    """Pickle chunks for ``commit_store`` in the pickle fallback.

    Each chunk is either a tensor of ``expected_shape`` and ``expected_dtype`` or a flat
    uint8 slot image of exactly that many bytes (what the gather kernels and
    :meth:`ShmPool.slot_view` produce); images are reinterpreted, never converted, because
    the server ``copy_``-s each tensor into its object and would convert values otherwise.
    Each tensor is moved to the CPU and made compact: a tensor pickles its whole storage,
    so a view into a larger buffer would ship that whole buffer.

    Raises:
        ValueError: a chunk has another shape, dtype or byte size than expected.
    """
    import torch

    want_dtype = _torch_dtype(expected_dtype)
    shape = tuple(int(d) for d in expected_shape)
    nbytes = math.prod(shape) * torch.empty((), dtype=want_dtype).element_size()
    out: list[torch.Tensor] = []
    for i, chunk in enumerate(chunks):
        if not isinstance(chunk, torch.Tensor):
            raise ValueError(f"chunk {i} is a {type(chunk).__name__}, not a torch.Tensor")
        t = chunk.detach().to("cpu")
        if t.dtype == torch.uint8 and want_dtype != torch.uint8 and t.dim() == 1:
            if t.numel() != nbytes:
                raise ValueError(f"chunk {i} has {t.numel()} bytes, expected {nbytes}")
            t = t.contiguous().view(want_dtype).view(shape)
        elif tuple(t.shape) != shape or t.dtype != want_dtype:
            raise ValueError(
                f"chunk {i} is {t.dtype} {tuple(t.shape)}, expected {want_dtype} {shape}"
            )
        t = t.contiguous()
        if t.storage_offset() != 0 or t.untyped_storage().nbytes() != nbytes:
            t = t.clone()
        out.append(t)
    return pickle.dumps(out, protocol=PICKLE_PROTOCOL)


def _load_storage(data: Any) -> Any:
    """Stand-in for ``torch.storage._load_from_bytes`` that never runs full pickle."""
    import torch

    if not isinstance(data, (bytes, bytearray)):
        raise pickle.UnpicklingError("storage payload is not bytes")
    storage = torch.load(io.BytesIO(bytes(data)), weights_only=True, map_location="cpu")
    if not isinstance(storage, (torch.TypedStorage, torch.UntypedStorage)):
        raise pickle.UnpicklingError(f"storage payload holds a {type(storage).__name__}")
    return storage


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any,
                    requires_grad: Any, backward_hooks: Any, metadata: Any = None) -> Any:
    """Checked front of ``torch._utils._rebuild_tensor_v2`` (no hooks, no metadata)."""
    import torch
    from torch._utils import _rebuild_tensor_v2

    if not isinstance(storage, (torch.TypedStorage, torch.UntypedStorage)):
        raise pickle.UnpicklingError("tensor without a storage")
    ints = (storage_offset, *size, *stride) if isinstance(size, tuple) and isinstance(
        stride, tuple) else None
    if ints is None or not all(type(v) is int and v >= 0 for v in ints):
        raise pickle.UnpicklingError("tensor geometry is not a tuple of non-negative ints")
    if backward_hooks or metadata or requires_grad is not False:
        raise pickle.UnpicklingError("tensor carries hooks, metadata or requires_grad")
    # set_() inside checks that the view fits its storage and raises otherwise.
    return _rebuild_tensor_v2(storage, storage_offset, size, stride, False,
                              collections.OrderedDict())


class _TensorUnpickler(pickle.Unpickler):
    """Resolves only the globals of a CPU tensor pickle; everything else is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == _REBUILD:
            return _rebuild_tensor
        if (module, name) == _LOAD_STORAGE:
            return _load_storage
        if (module, name) == _ORDERED_DICT:
            return collections.OrderedDict
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in chunk data")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not allowed in chunk data")


def decode_chunks(
    data: bytes,
    expected_count: int,
    expected_shape: tuple[int, ...],
    expected_dtype: torch.dtype | str,
) -> list[torch.Tensor]:
    """Unpickle the server's ``prepare_retrieve`` data into checked slot images.

    Returns one flat, contiguous uint8 CPU tensor per chunk (the same form as
    :meth:`ShmPool.slot_view`, which the scatter kernels take); ``.view(dtype).view(shape)``
    gives the typed chunk.

    Raises:
        KVConnProtocolError: the payload is not a list of ``expected_count`` CPU tensors
            of ``expected_shape`` and ``expected_dtype``, or uses anything outside the
            allowed globals.
    """
    import torch

    want_dtype = _torch_dtype(expected_dtype)
    shape = tuple(int(d) for d in expected_shape)
    try:
        obj = _TensorUnpickler(io.BytesIO(data)).load()
    except Exception as exc:  # anything the payload provokes is its fault
        raise KVConnProtocolError(f"undecodable chunk data: {exc!r}") from exc
    if not isinstance(obj, list):
        raise KVConnProtocolError(f"chunk data is a {type(obj).__name__}, expected a list")
    if len(obj) != expected_count:
        raise KVConnProtocolError(f"chunk data has {len(obj)} chunks, expected {expected_count}")
    images = []
    for i, t in enumerate(obj):
        if not isinstance(t, torch.Tensor):
            raise KVConnProtocolError(f"chunk {i} is a {type(t).__name__}, not a tensor")
        if t.device.type != "cpu" or t.dtype != want_dtype or tuple(t.shape) != shape:
            raise KVConnProtocolError(
                f"chunk {i} is {t.device.type} {t.dtype} {tuple(t.shape)}, expected cpu "
                f"{want_dtype} {shape}"
            )
        images.append(t.contiguous().view(-1).view(torch.uint8))
    return images
