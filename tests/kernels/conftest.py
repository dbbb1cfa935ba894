"""Builders and references for the transfer-kernel tests.

Exposed as the session fixture `kv` (a namespace), so helpers work under any pytest import mode
and inside hypothesis tests (no function-scoped fixtures).

A "case" is a paged KV cache laid out the way vLLM 0.32/0.33 allocates it: one flat byte
buffer per storage and one strided logical ``[B, H, N, C]`` view per layer. References are
written against the LOGICAL views (vLLM's own K/V split semantics), never against the byte
formula the kernels use, so they check the formula too.
"""

from __future__ import annotations

import shutil
import tempfile
import types
from dataclasses import dataclass, field

import pytest
import torch
from hypothesis.configuration import set_hypothesis_home_dir

# Hypothesis caches extracted constants on disk even with database=None; keep that out of the
# checkout and remove it when the session ends.
_HYPOTHESIS_HOME = tempfile.mkdtemp(prefix="kvconn-hypothesis-")
set_hypothesis_home_dir(_HYPOTHESIS_HOME)


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_HYPOTHESIS_HOME, ignore_errors=True)

INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32}
DTYPE_OF_SIZE = {1: torch.uint8, 2: torch.bfloat16, 4: torch.float32}
PHYSICAL = ("LBNHC", "LBHNC", "BLNHC", "BLHNC")


@dataclass
class Case:
    physical: str          # LBNHC | LBHNC | BLNHC | BLHNC
    split: str             # packed | planes | mla
    num_layers: int
    num_blocks: int
    num_heads: int
    block_size: int
    content: int           # C, elements
    head_size: int
    elem_size: int
    pad_elems: int         # extra elements after each block (padded pages)
    cross_layer: bool      # all layers in one storage
    device: str = "cpu"
    buffers: list[torch.Tensor] = field(default_factory=list)  # flat uint8 storages
    views: list[torch.Tensor] = field(default_factory=list)

    def make_views(self, buffers: list[torch.Tensor], dtype: torch.dtype | None = None):
        """Per-layer [B, H, N, C] views over `buffers` (dtype defaults to the case's)."""
        dtype = dtype or DTYPE_OF_SIZE[self.elem_size]
        L, B, H, N, C = (self.num_layers, self.num_blocks, self.num_heads, self.block_size,
                         self.content)
        page = H * N * C
        head_major = self.physical.endswith("HNC")
        inner = (N * C, C) if head_major else (C, H * C)  # (head, token) strides
        views = []
        for layer in range(L):
            if self.physical.startswith("BL"):
                typed = buffers[0].view(dtype)
                bstride = L * page + self.pad_elems
                offset = layer * page
            else:
                bstride = page + self.pad_elems
                if self.cross_layer:
                    typed = buffers[0].view(dtype)
                    offset = layer * B * bstride
                else:
                    typed = buffers[layer].view(dtype)
                    offset = 0
            views.append(typed.as_strided((B, H, N, C), (bstride, *inner, 1), offset))
        return views

    def alloc(self, fill: str = "random", seed: int = 0) -> list[torch.Tensor]:
        L, B = self.num_layers, self.num_blocks
        page = self.num_heads * self.block_size * self.content
        if self.physical.startswith("BL"):
            sizes = [B * (L * page + self.pad_elems)]
        elif self.cross_layer:
            sizes = [L * B * (page + self.pad_elems)]
        else:
            sizes = [B * (page + self.pad_elems)] * L
        gen = torch.Generator().manual_seed(seed)
        out = []
        for n in sizes:
            nbytes = n * self.elem_size
            if fill == "random":
                buf = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen)
            else:
                buf = torch.full((nbytes,), int(fill), dtype=torch.uint8)
            out.append(buf.to(self.device))
        return out


def build_case(physical, split, *, num_layers=2, num_blocks=5, num_heads=2, block_size=16,
               head_size=8, elem_size=2, pad_elems=0, cross_layer=False, device="cpu",
               content=None, seed=0) -> Case:
    if split == "mla":
        num_heads = 1
        content = content or head_size
    else:
        content = 2 * head_size
    case = Case(physical, split, num_layers, num_blocks, num_heads, block_size, content,
                head_size, elem_size, pad_elems, cross_layer, device)
    case.buffers = case.alloc(seed=seed)
    case.views = case.make_views(case.buffers)
    return case


def _int_views(case: Case, buffers: list[torch.Tensor]):
    return case.make_views(buffers, INT_OF_SIZE[case.elem_size])


def _planes_of(case: Case, sel: torch.Tensor) -> list[torch.Tensor]:
    """Logical per-plane tensors [n, N, H, D] of selected blocks `sel` [n, H, N, C]."""
    n, H, N, _ = sel.shape
    HS = case.head_size
    if case.split == "mla":
        return [sel[:, 0].unsqueeze(2)]  # [n, N, 1, C]
    if case.split == "packed":
        return [sel[..., :HS].permute(0, 2, 1, 3), sel[..., HS:].permute(0, 2, 1, 3)]
    regions = sel.reshape(n, H, 2 * N, HS)  # vLLM CPU backend: K rows, then V rows
    return [regions[:, :, :N].permute(0, 2, 1, 3), regions[:, :, N:].permute(0, 2, 1, 3)]


def ref_gather(case: Case, ids: list[int]) -> torch.Tensor:
    """Slot image bytes from the logical views (CPU uint8 tensor)."""
    views = [v.cpu() if v.device.type != "cpu" else v for v in _int_views(case, case.buffers)]
    idx = torch.tensor(ids, dtype=torch.long)
    per_plane = []
    for layer_view in views:
        per_plane.append(_planes_of(case, layer_view[idx]))
    n = len(ids)
    planes = []
    for p in range(len(per_plane[0])):
        planes.append(torch.stack([
            lp[p].reshape(n * case.block_size, -1) for lp in per_plane
        ]))
    return torch.stack(planes).contiguous().view(torch.uint8).reshape(-1)


def ref_scatter(case: Case, buffers: list[torch.Tensor], slot: torch.Tensor, ids: list[int],
                skip: int) -> list[torch.Tensor]:
    """Expected storages after scattering `slot` into blocks ids[skip:] (CPU copies)."""
    out = [b.cpu().clone() for b in buffers]
    views = _int_views(case, out)
    n, N, H = len(ids), case.block_size, case.num_heads
    P = 1 if case.split == "mla" else 2
    vals = slot.cpu().clone().view(INT_OF_SIZE[case.elem_size])
    vals = vals.reshape(P, case.num_layers, n, N, H, -1)
    idx = torch.tensor(ids[skip:], dtype=torch.long)
    HS = case.head_size
    for layer, v in enumerate(views):
        for p in range(P):
            data = vals[p, layer, skip:].permute(0, 2, 1, 3)  # [n', H, N, D]
            if case.split == "mla":
                v[idx, 0] = data[:, 0]
            elif case.split == "packed":
                v[idx, :, :, p * HS:(p + 1) * HS] = data
            else:
                regions = v.view(v.shape[0], H, 2 * N, HS)
                regions[idx, :, p * N:(p + 1) * N] = data
    return out


@pytest.fixture(scope="session")
def kv():
    return types.SimpleNamespace(
        Case=Case,
        build_case=build_case,
        ref_gather=ref_gather,
        ref_scatter=ref_scatter,
        PHYSICAL=PHYSICAL,
        DTYPE_OF_SIZE=DTYPE_OF_SIZE,
    )
