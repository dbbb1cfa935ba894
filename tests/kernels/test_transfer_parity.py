"""Byte-exact parity of the native library, the PyTorch fallback and logical references (CPU)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvconn_plugin import ops
from kvconn_plugin.ops import _native

BACKENDS = ["torch"] + (["native"] if _native.cpu_lib is not None else [])
HYPO = settings(max_examples=40, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
MAX_CASE_BYTES = 1 << 20


@st.composite
def case_params(draw):
    split = draw(st.sampled_from(["packed", "packed", "planes", "mla"]))
    physical = draw(st.sampled_from(
        ["LBHNC", "BLHNC"] if split == "planes" else ["LBNHC", "LBHNC", "BLNHC", "BLHNC"]))
    elem_size = draw(st.sampled_from([1, 2, 4]))
    block_size = draw(st.sampled_from([16, 32, 64, 128, 256, 1024]))
    head_size = draw(st.sampled_from([3, 4, 8, 16, 64]))
    num_heads = draw(st.integers(1, 4))
    num_layers = draw(st.integers(1, 3))
    num_blocks = draw(st.integers(1, 6))
    content = draw(st.sampled_from([head_size, 72, 82])) if split == "mla" else None
    pad = draw(st.sampled_from([0, 0, 1, 8, 24]))
    cross = draw(st.booleans())
    c = content or 2 * head_size
    heads = 1 if split == "mla" else num_heads
    total = num_layers * num_blocks * (heads * block_size * c + pad) * elem_size
    if total > MAX_CASE_BYTES:  # keep tensors small: shrink the block count first
        num_blocks = 1
        num_layers = 1
        heads = 1
        num_heads = 1
    return {"physical": physical, "split": split, "num_layers": num_layers,
            "num_blocks": num_blocks, "num_heads": num_heads, "block_size": block_size,
            "head_size": head_size, "elem_size": elem_size, "pad_elems": pad, "cross_layer": cross,
            "content": content, "seed": draw(st.integers(0, 2**16))}


def _transfers(case):
    layout = ops.layout_from_vllm_views(case.views, case.head_size, case.split)
    return layout, {b: ops.KVTransfer(layout, case.views, backend=b) for b in BACKENDS}


@HYPO
@given(params=case_params(), data=st.data())
def test_gather_matches_reference(kv, params, data):
    case = kv.build_case(**params)
    layout, transfers = _transfers(case)
    ids = data.draw(st.lists(st.integers(0, case.num_blocks - 1), min_size=1, max_size=5))
    expected = kv.ref_gather(case, ids)
    for name, tr in transfers.items():
        dst = torch.full((layout.slot_bytes(len(ids)),), 0xA5, dtype=torch.uint8)
        tr.gather(ids, dst)
        assert torch.equal(dst, expected), f"{name} gather differs from the reference"


@HYPO
@given(params=case_params(), data=st.data())
def test_scatter_matches_reference(kv, params, data):
    case = kv.build_case(**params)
    layout, transfers = _transfers(case)
    ids = data.draw(st.permutations(range(case.num_blocks)))
    ids = ids[: data.draw(st.integers(1, len(ids)))]
    skip = data.draw(st.integers(0, len(ids)))
    slot = torch.randint(0, 256, (layout.slot_bytes(len(ids)),), dtype=torch.uint8)
    expected = kv.ref_scatter(case, case.buffers, slot, ids, skip)
    original = [b.clone() for b in case.buffers]
    for name, tr in transfers.items():
        for buf, orig in zip(case.buffers, original, strict=True):
            buf.copy_(orig)
        tr.scatter(slot, ids, skip_blocks=skip)
        for buf, exp in zip(case.buffers, expected, strict=True):
            assert torch.equal(buf, exp), f"{name} scatter differs (skip={skip}, ids={ids})"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("content", "elem_size"), [(576, 2), (656, 1)])
def test_mla_shapes(kv, backend, content, elem_size):
    """DeepSeek-style MLA: 576 x bf16 = 1152-byte runs, and 656-byte fp8 pages."""
    case = kv.build_case("LBNHC", "mla", num_layers=3, num_blocks=6, block_size=64,
                         content=content, elem_size=elem_size, pad_elems=64)
    layout = ops.layout_from_vllm_views(case.views, content, "mla")
    assert layout.run_bytes == content * elem_size and layout.num_planes == 1
    tr = ops.KVTransfer(layout, case.views, backend=backend)
    ids = [4, 0, 5]
    dst = torch.empty(layout.slot_bytes(3), dtype=torch.uint8)
    tr.gather(ids, dst)
    assert torch.equal(dst, kv.ref_gather(case, ids))
    expected = kv.ref_scatter(case, case.buffers, dst.flip(0).contiguous(), ids, 1)
    tr.scatter(dst.flip(0).contiguous(), ids, skip_blocks=1)
    assert all(torch.equal(b, e) for b, e in zip(case.buffers, expected, strict=True))


def test_naive_python_reference(kv):
    """Independent per-element loop over the logical views for one small packed LBNHC case."""
    case = kv.build_case("LBNHC", "packed", num_layers=2, num_blocks=3, num_heads=2,
                         block_size=16, head_size=4, elem_size=2, cross_layer=True)
    ids = [2, 0]
    views16 = [v.view(torch.int16) for v in case.views]
    expected = []
    for plane in range(2):
        for v in views16:
            for b in ids:
                for s in range(case.block_size):
                    for h in range(case.num_heads):
                        row = v[b, h, s].tolist()
                        expected += row[plane * 4:(plane + 1) * 4]
    want = torch.tensor(expected, dtype=torch.int16).view(torch.uint8)
    layout = ops.layout_from_vllm_views(case.views, 4, "packed")
    for backend in BACKENDS:
        dst = torch.empty(layout.slot_bytes(2), dtype=torch.uint8)
        ops.KVTransfer(layout, case.views, backend=backend).gather(ids, dst)
        assert torch.equal(dst, want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pad", [0, 40])
def test_large_chunk_multithreaded(kv, backend, pad):
    """Big enough (> 2 MiB) that the native path splits the work across threads and writes
    with streaming stores; one layout with line-aligned runs, one (planes) without."""
    case = kv.build_case("LBNHC", "packed", num_layers=8, num_blocks=20, num_heads=8,
                         block_size=16, head_size=64, elem_size=2, pad_elems=pad)
    layout = ops.layout_from_vllm_views(case.views, 64, "packed")
    tr = ops.KVTransfer(layout, case.views, backend=backend, num_threads=4)
    ids = list(range(19, 3, -1))
    dst = torch.empty(layout.slot_bytes(len(ids)), dtype=torch.uint8)
    tr.gather(ids, dst)
    assert torch.equal(dst, kv.ref_gather(case, ids))
    expected = kv.ref_scatter(case, case.buffers, dst.roll(7), ids, 3)
    tr.scatter(dst.roll(7), ids, skip_blocks=3)
    assert all(torch.equal(b, e) for b, e in zip(case.buffers, expected, strict=True))


@pytest.mark.parametrize(
    ("physical", "split", "expect"),
    [
        # (block, head, token, plane) strides in bytes for B=5, H=2, N=16, HS=8, bf16.
        ("LBNHC", "packed", (2 * 16 * 32, 32, 2 * 32, 16)),
        ("LBHNC", "packed", (2 * 16 * 32, 16 * 32, 32, 16)),
        ("LBHNC", "planes", (2 * 16 * 32, 16 * 32, 16, 16 * 16)),
        ("BLNHC", "packed", (2 * (2 * 16 * 32) + 6, 32, 2 * 32, 16)),
    ],
)
def test_layout_strides(kv, physical, split, expect):
    case = kv.build_case(physical, split, pad_elems=3 if physical.startswith("BL") else 0)
    lay = ops.layout_from_vllm_views(case.views, 8, split)
    assert (lay.block_stride, lay.head_stride, lay.token_stride, lay.plane_stride) == expect
    assert lay.run_bytes == 16 and lay.device == "cpu"
    assert lay.chunk_bytes_per_block == 2 * 2 * 16 * 16 * 2
