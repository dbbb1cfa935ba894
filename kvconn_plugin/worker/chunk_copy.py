"""Copies one chunk object to and from vLLM's paged KV cache, for one or several KV cache
groups.

The object is LMCache's single-plane slot ``[layers, tokens, heads * content]``; with several
groups (a hybrid model) its layers are ordered group by group, so each group's layers are one
contiguous byte range of the slot and are copied by that group's own ``KVTransfer`` with that
group's block ids. Split K/V layouts (two planes) only exist for a single group.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kvconn_plugin.errors import KVConnTransferError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class GroupCopy:
    transfer: Any        # ops.KVTransfer over this group's layers
    first_layer: int     # where its layers start in the object
    num_layers: int


class ChunkCopier:
    def __init__(self, parts: Sequence[GroupCopy]):
        if not parts:
            raise KVConnTransferError("no KV cache layers to copy")
        self.parts = tuple(parts)
        first = parts[0].transfer.layout
        if len(parts) > 1 and first.num_planes != 1:
            raise KVConnTransferError("several KV cache groups need the single-plane layout")
        for p in parts[1:]:
            lay = p.transfer.layout
            if (lay.num_heads * lay.run_bytes, lay.block_size, lay.num_planes, lay.device) != (
                    first.num_heads * first.run_bytes, first.block_size, first.num_planes,
                    first.device):
                raise KVConnTransferError(
                    "KV cache groups differ in per-token bytes, block size or device")
        self.layout = first
        self.num_layers = sum(p.num_layers for p in parts)
        # Bytes of one layer's tokens in a chunk of one block (the slot is layer-major).
        self._layer_block_bytes = first.num_heads * first.run_bytes * first.block_size

    def _range(self, part: GroupCopy, slot: torch.Tensor, nblocks: int) -> torch.Tensor:
        if len(self.parts) == 1:
            return slot
        step = self._layer_block_bytes * nblocks
        return slot[part.first_layer * step:(part.first_layer + part.num_layers) * step]

    def gather(self, group_blocks: Sequence[Sequence[int]], dst: torch.Tensor) -> None:
        """Copy one chunk's blocks (one id list per group, equal lengths) into ``dst``."""
        nblocks = self._check(group_blocks)
        for part, blocks in zip(self.parts, group_blocks, strict=True):
            part.transfer.gather(blocks, self._range(part, dst, nblocks))

    def scatter(self, src: torch.Tensor, group_blocks: Sequence[Sequence[int]],
                skips: Sequence[int]) -> None:
        """Copy ``src`` into each group's blocks after that group's first ``skips[g]``."""
        nblocks = self._check(group_blocks)
        for part, blocks, skip in zip(self.parts, group_blocks, skips, strict=True):
            if skip < nblocks:
                part.transfer.scatter(self._range(part, src, nblocks), blocks, skip_blocks=skip)

    def synchronize(self) -> None:
        for part in self.parts:
            part.transfer.synchronize()

    def _check(self, group_blocks: Sequence[Sequence[int]]) -> int:
        if len(group_blocks) != len(self.parts):
            raise KVConnTransferError(
                f"{len(group_blocks)} block lists for {len(self.parts)} KV cache groups")
        sizes = {len(b) for b in group_blocks}
        if len(sizes) != 1:
            raise KVConnTransferError(f"groups have different block counts: {sorted(sizes)}")
        return sizes.pop()
