"""Byte geometry of vLLM's paged KV cache, reduced to one strided formula.

Run (plane p, layer l, block b, head h, token s) of `run_bytes` bytes starts at
``layer_base[l] + b*block_stride + h*head_stride + s*token_stride + p*plane_stride``.
The slot image LMCache stores is ``[P, L, T, H, run_bytes]`` bytes, C-contiguous, with
``T = len(block_ids) * block_size`` (lmcache-mp-protocol.md §9.4).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvconn_plugin.errors import KVConnTransferError

if TYPE_CHECKING:
    import torch

SPLITS = ("fused", "packed", "planes", "mla")


@dataclass(frozen=True)
class PagedKVLayout:
    """Geometry shared by every layer; strides are in bytes."""

    num_layers: int
    num_blocks: int
    block_size: int
    num_heads: int
    num_planes: int
    run_bytes: int
    block_stride: int
    head_stride: int
    token_stride: int
    plane_stride: int
    device: str  # "cpu" or "cuda:N"

    @property
    def chunk_bytes_per_block(self) -> int:
        """Slot-image bytes contributed by one block of the chunk (all planes and layers)."""
        return (
            self.num_planes * self.num_heads * self.run_bytes * self.block_size * self.num_layers
        )

    def slot_bytes(self, num_chunk_blocks: int) -> int:
        return self.chunk_bytes_per_block * num_chunk_blocks

    def slot_shape(self, num_chunk_blocks: int) -> tuple[int, int, int, int]:
        """``[P, L, T, H*R]`` in bytes."""
        return (
            self.num_planes,
            self.num_layers,
            num_chunk_blocks * self.block_size,
            self.num_heads * self.run_bytes,
        )

    def layer_extent(self) -> int:
        """Bytes from a layer's base to the end of its last run (for bounds checks)."""
        return (
            (self.num_blocks - 1) * self.block_stride
            + (self.num_heads - 1) * self.head_stride
            + (self.block_size - 1) * self.token_stride
            + (self.num_planes - 1) * self.plane_stride
            + self.run_bytes
        )

    def validate(self) -> None:
        ints = {
            "num_layers": self.num_layers,
            "num_blocks": self.num_blocks,
            "block_size": self.block_size,
            "num_heads": self.num_heads,
            "run_bytes": self.run_bytes,
        }
        for name, value in ints.items():
            if not isinstance(value, int) or value < 1:
                raise KVConnTransferError(f"layout.{name} must be a positive int, got {value!r}")
        if self.num_planes not in (1, 2):
            raise KVConnTransferError(f"layout.num_planes must be 1 or 2, got {self.num_planes}")
        for name in ("block_stride", "head_stride", "token_stride", "plane_stride"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise KVConnTransferError(f"layout.{name} must be an int >= 0, got {value!r}")
        if self.device != "cpu" and not self.device.startswith("cuda:"):
            raise KVConnTransferError(f"layout.device must be 'cpu' or 'cuda:N', got {self.device}")


def _device_str(t: torch.Tensor) -> str:
    if t.device.type == "cpu":
        return "cpu"
    if t.device.type == "cuda":
        return f"cuda:{t.device.index if t.device.index is not None else 0}"
    raise KVConnTransferError(f"unsupported KV cache device {t.device}")


def layout_from_vllm_views(views: list[torch.Tensor], head_size: int, split: str) -> PagedKVLayout:
    """Derive the byte geometry from vLLM's per-layer ``[B, H, N, C]`` views.

    Args:
        views: one view per layer, in registration order, as ``register_kv_caches`` receives
            them (any dtype; the strides encode LBNHC/LBHNC/BL** and shared storage).
        head_size: elements per head of K (and of V). Ignored for ``fused`` and ``mla``,
            whose whole C is one run.
        split: ``fused`` (one plane: each (head, token)'s whole content C copied as opaque
            bytes, giving the slot ``[L, T, H*C]`` LMCache's own connector writes for vLLM's
            packed layouts, whatever sits inside C), ``packed`` (K = C[:head_size],
            V = C[head_size:], GPU backends), ``planes`` (vLLM's CPU backend: each
            (block, head) region is ``[2N, head_size]``, K rows then V rows; LBHNC only) or
            ``mla`` (``fused`` with H == 1).

    Raises:
        KVConnTransferError: inconsistent layers or a layout the formula cannot express.
    """
    if split not in SPLITS:
        raise KVConnTransferError(f"split must be one of {SPLITS}, got {split!r}")
    if not views:
        raise KVConnTransferError("no KV cache views given")
    first = views[0]
    for i, v in enumerate(views):
        if v.dim() != 4:
            raise KVConnTransferError(
                f"layer {i}: expected a 4-D [B, H, N, C] view, got {v.dim()}-D"
            )
        if v.shape != first.shape or v.stride() != first.stride():
            raise KVConnTransferError(
                f"layer {i}: shape/stride {tuple(v.shape)}/{v.stride()} differs from layer 0 "
                f"{tuple(first.shape)}/{first.stride()}"
            )
        if v.dtype != first.dtype or v.device != first.device:
            raise KVConnTransferError(f"layer {i}: dtype/device differs from layer 0")
    num_blocks, num_heads, block_size, content = (int(x) for x in first.shape)
    sb, sh, sn, sc = (int(x) for x in first.stride())
    es = first.element_size()
    if sc != 1:
        raise KVConnTransferError(f"the content dim must be contiguous (stride 1), got {sc}")
    if min(sb, sh, sn) < 0:
        raise KVConnTransferError(f"negative strides are not supported: {first.stride()}")

    if split in ("fused", "mla"):
        if split == "mla" and num_heads != 1:
            raise KVConnTransferError(f"mla expects one head slot, got H={num_heads}")
        planes, run, plane_stride = 1, content * es, 0
        token_stride, head_stride = sn * es, sh * es
    else:
        if head_size < 1 or content != 2 * head_size:
            raise KVConnTransferError(
                f"{split}: content dim C={content} must equal 2*head_size ({2 * head_size})"
            )
        planes, run = 2, head_size * es
        head_stride = sh * es
        if split == "packed":
            token_stride, plane_stride = sn * es, head_size * es
        else:  # planes: the (block, head) region of N*C elements is read as [2N, head_size]
            if sn != content:
                raise KVConnTransferError(
                    f"planes split needs each (block, head) region contiguous (stride(2) == C "
                    f"== {content}), got stride(2)={sn}; vLLM's CPU backend uses LBHNC"
                )
            token_stride, plane_stride = head_size * es, block_size * head_size * es
    layout = PagedKVLayout(
        num_layers=len(views),
        num_blocks=num_blocks,
        block_size=block_size,
        num_heads=num_heads,
        num_planes=planes,
        run_bytes=run,
        block_stride=sb * es,
        head_stride=head_stride,
        token_stride=token_stride,
        plane_stride=plane_stride,
        device=_device_str(first),
    )
    layout.validate()
    return layout


def layer_base_pointers(layout: PagedKVLayout, views: list[torch.Tensor]) -> list[int]:
    """Byte address of each layer's block 0, after checking every run lies inside its storage."""
    if len(views) != layout.num_layers:
        raise KVConnTransferError(
            f"layout has {layout.num_layers} layers but {len(views)} views were given"
        )
    extent = layout.layer_extent()
    bases = []
    for i, v in enumerate(views):
        if _device_str(v) != layout.device:
            raise KVConnTransferError(f"layer {i} is on {v.device}, layout says {layout.device}")
        storage = v.untyped_storage()
        lo, hi = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
        base = v.data_ptr()
        if base < lo or base + extent > hi:
            raise KVConnTransferError(
                f"layer {i}: runs span [{base:#x}, {base + extent:#x}) outside its storage "
                f"[{lo:#x}, {hi:#x})"
            )
        bases.append(base)
    return bases
