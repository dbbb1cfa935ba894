"""CUDA transfers: parity with the logical reference, poisoned outputs, stream ordering, bounds.

Skipped without a GPU. Run on a GPU host with ``KVCONN_KERNELS=native pytest -m cuda``.
"""

from __future__ import annotations

import mmap
import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvconn_plugin import ops
from kvconn_plugin.errors import KVConnTransferError
from kvconn_plugin.ops import _native

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]

BACKENDS = ["torch"] + (["native"] if _native.cuda_lib is not None else [])
MODES = ["staged", "zerocopy"]
# scripts/gpu_check.sh lowers this for its compute-sanitizer pass.
HYPO = settings(max_examples=int(os.environ.get("KVCONN_HYPOTHESIS_EXAMPLES", "30")),
                deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _slot(nbytes: int, where: str, fill: int = 0xA5) -> torch.Tensor:
    """A poisoned slot in pinned host memory, pageable host memory or device memory."""
    if where == "device":
        return torch.full((nbytes,), fill, dtype=torch.uint8, device="cuda")
    t = torch.full((nbytes,), fill, dtype=torch.uint8)
    return t.pin_memory() if where == "pinned" else t


@st.composite
def gpu_case_params(draw):
    split = draw(st.sampled_from(["packed", "packed", "mla"]))
    return {
        "physical": draw(st.sampled_from(["LBNHC", "LBHNC", "BLNHC", "BLHNC"])),
        "split": split,
        "num_layers": draw(st.integers(1, 3)),
        "num_blocks": draw(st.integers(2, 8)),
        "num_heads": draw(st.integers(1, 4)),
        "block_size": draw(st.sampled_from([16, 32, 64, 128])),
        "head_size": draw(st.sampled_from([3, 4, 8, 64, 128])),
        "elem_size": draw(st.sampled_from([1, 2, 4])),
        "pad_elems": draw(st.sampled_from([0, 1, 8])),
        "cross_layer": draw(st.booleans()),
        "content": draw(st.sampled_from([None, 576, 656])) if split == "mla" else None,
        "device": "cuda",
        "seed": draw(st.integers(0, 2**16)),
    }


@HYPO
@given(params=gpu_case_params(), data=st.data())
def test_gpu_gather_scatter_parity(kv, params, data):
    case = kv.build_case(**params)
    layout = ops.layout_from_vllm_views(case.views, case.head_size, case.split)
    backend = data.draw(st.sampled_from(BACKENDS))
    mode = data.draw(st.sampled_from(MODES))
    where = data.draw(st.sampled_from(["pinned", "pinned", "device", "pageable"]))
    tr = ops.KVTransfer(layout, case.views, backend=backend, cuda_copy=mode,
                        max_ctas=data.draw(st.sampled_from([1, 3, 32])))
    ids = data.draw(st.lists(st.integers(0, case.num_blocks - 1), min_size=1, max_size=6))
    dst = _slot(layout.slot_bytes(len(ids)), where)
    tr.gather(ids, dst)
    tr.synchronize()
    assert torch.equal(dst.cpu(), kv.ref_gather(case, ids)), (backend, mode, where)

    uniq = data.draw(st.permutations(range(case.num_blocks)))
    uniq = uniq[: data.draw(st.integers(1, len(uniq)))]
    skip = data.draw(st.integers(0, len(uniq)))
    src_cpu = torch.randint(0, 256, (layout.slot_bytes(len(uniq)),), dtype=torch.uint8)
    src = _slot(src_cpu.numel(), where)
    src.copy_(src_cpu)
    expected = kv.ref_scatter(case, case.buffers, src_cpu, uniq, skip)
    tr.scatter(src, uniq, skip_blocks=skip)
    tr.synchronize()
    for buf, exp in zip(case.buffers, expected, strict=True):
        assert torch.equal(buf.cpu(), exp), (backend, mode, where, skip)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unaligned_slot_and_split_launches(kv, backend):
    """> 128 layers and > 448 blocks force several launches; an odd slot address forces 1-byte
    vectors."""
    case = kv.build_case("LBNHC", "packed", num_layers=130, num_blocks=460, num_heads=1,
                         block_size=16, head_size=4, elem_size=2, device="cuda")
    layout = ops.layout_from_vllm_views(case.views, 4, "packed")
    tr = ops.KVTransfer(layout, case.views, backend=backend)
    ids = list(range(459, -1, -1))
    n = layout.slot_bytes(len(ids))
    big = torch.full((n + 1,), 0xA5, dtype=torch.uint8).pin_memory()
    dst = big[1:]
    tr.gather(ids, dst)
    tr.synchronize()
    assert torch.equal(dst, kv.ref_gather(case, ids))
    assert big[0].item() == 0xA5
    src = dst.roll(5).pin_memory()
    expected = kv.ref_scatter(case, case.buffers, src, ids, 2)
    tr.scatter(src, ids, skip_blocks=2)
    tr.synchronize()
    assert all(torch.equal(b.cpu(), e) for b, e in zip(case.buffers, expected, strict=True))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_stream_ordering(kv, backend, mode):
    """Work queued on the same stream before/after a transfer is ordered with it."""
    case = kv.build_case("LBNHC", "packed", num_layers=4, num_blocks=64, num_heads=8,
                         block_size=16, head_size=128, elem_size=2, device="cuda")
    layout = ops.layout_from_vllm_views(case.views, 128, "packed")
    tr = ops.KVTransfer(layout, case.views, backend=backend, cuda_copy=mode)
    side = torch.cuda.Stream()
    ids = list(range(0, 64, 4))
    dst = _slot(layout.slot_bytes(len(ids)), "pinned")
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        torch.cuda._sleep(2_000_000)  # keeps the stream busy so a missing dependency shows
        for buf in case.buffers:
            buf.fill_(0x3C)
    tr.gather(ids, dst, stream=side)
    tr.synchronize()
    assert bool((dst == 0x3C).all())

    src = torch.randint(0, 256, (dst.numel(),), dtype=torch.uint8).pin_memory()
    with torch.cuda.stream(side):
        torch.cuda._sleep(2_000_000)
    tr.scatter(src, ids, stream=side.cuda_stream)  # raw handle form
    out = _slot(dst.numel(), "pinned")
    tr.gather(ids, out, stream=side)
    tr.synchronize()
    assert torch.equal(out, src)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_bad_arguments_write_nothing(kv, backend):
    case = kv.build_case("LBNHC", "packed", num_blocks=4, device="cuda")
    layout = ops.layout_from_vllm_views(case.views, case.head_size, "packed")
    tr = ops.KVTransfer(layout, case.views, backend=backend)
    dst = _slot(layout.slot_bytes(2), "pinned", fill=0x11)
    for ids in ([0, 4], [-1, 0], [[0, 1]]):
        with pytest.raises(KVConnTransferError):
            tr.gather(ids, dst)
    with pytest.raises(KVConnTransferError):
        tr.gather([0, 1], dst[:-1])
    other_gpu_or_cpu_wrong = torch.zeros(layout.slot_bytes(2), dtype=torch.int8, device="cuda")
    with pytest.raises(KVConnTransferError):
        tr.gather([0, 1], other_gpu_or_cpu_wrong)
    torch.cuda.synchronize()
    assert bool((dst == 0x11).all())
    before = [b.clone() for b in case.buffers]
    for ids, skip in (([0, 1], 3), ([0, 1], -1), ([0, 7], 0)):
        with pytest.raises(KVConnTransferError):
            tr.scatter(dst, ids, skip_blocks=skip)
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(before, case.buffers, strict=True))


@pytest.mark.skipif(_native.cuda_lib is None, reason="CUDA library not built")
def test_registered_mmap_zero_copy_and_staged(kv):
    """The server's SHM pool is an mmap registered with cudaHostRegister: both paths work."""
    case = kv.build_case("LBHNC", "packed", num_layers=2, num_blocks=8, num_heads=2,
                         block_size=32, head_size=64, elem_size=2, device="cuda")
    layout = ops.layout_from_vllm_views(case.views, 64, "packed")
    ids = [7, 2, 5]
    n = layout.slot_bytes(len(ids))
    region = mmap.mmap(-1, n + 4096)
    try:
        host = torch.from_numpy(np.frombuffer(region, dtype=np.uint8, count=n + 4096))
        assert ops.pin_host_memory(host.data_ptr(), host.numel())
        assert ops.pin_host_memory(host.data_ptr(), host.numel())  # already registered: True
        try:
            slot = host[4096:]
            for mode in MODES:
                slot.fill_(0xEE)
                tr = ops.KVTransfer(layout, case.views, backend="native", cuda_copy=mode)
                tr.gather(ids, slot)
                tr.synchronize()
                assert torch.equal(slot, kv.ref_gather(case, ids)), mode
        finally:
            assert ops.unpin_host_memory(host.data_ptr())
        del host, slot
    finally:
        region.close()
