"""The CUDA library's device code path, executed on the host through its test hook.

`kvc_cuda_host_emulate` runs the same launch splitting, vector-width choice, kernel index math
and staged copies as the GPU entry points, sequentially on host memory. This checks the CUDA
kernels' logic byte for byte on CPU-only machines (the CUDA library still has to compile, which
it does wherever nvcc exists). Real-GPU behaviour is covered by test_transfer_cuda.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvconn_plugin import ops
from kvconn_plugin.ops import _native

pytestmark = pytest.mark.skipif(
    _native.cuda_lib is None or _native.cpu_lib is None,
    reason=f"CUDA/C++ library not built: {_native.cuda_status}",
)

HYPO = settings(max_examples=40, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def emulate(tr, gather: bool, ids, slot: torch.Tensor, skip=0, staged=False, max_ctas=4):
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    staging = torch.full((slot.numel(),), 0x77, dtype=torch.uint8) if staged else None
    rc = _native.cuda_lib.kvc_cuda_host_emulate(
        int(gather), tr._geom, tr._bases.ctypes.data, ids.ctypes.data, len(ids), skip,
        slot.data_ptr(), staging.data_ptr() if staged else None, max_ctas)
    if rc != 0:
        raise AssertionError(_native.cuda_error())


@st.composite
def params(draw):
    split = draw(st.sampled_from(["packed", "packed", "planes", "mla"]))
    physical = draw(st.sampled_from(
        ["LBHNC", "BLHNC"] if split == "planes" else ["LBNHC", "LBHNC", "BLNHC", "BLHNC"]))
    return {
        "physical": physical, "split": split,
        "num_layers": draw(st.integers(1, 3)),
        "num_blocks": draw(st.integers(1, 6)),
        "num_heads": draw(st.integers(1, 3)),
        "block_size": draw(st.sampled_from([16, 32, 64])),
        "head_size": draw(st.sampled_from([3, 4, 8, 16, 64])),
        "elem_size": draw(st.sampled_from([1, 2, 4])),
        "pad_elems": draw(st.sampled_from([0, 1, 8])),
        "cross_layer": draw(st.booleans()),
        "content": draw(st.sampled_from([None, 72, 82])) if split == "mla" else None,
        "seed": draw(st.integers(0, 2**16)),
    }


@HYPO
@given(p=params(), data=st.data())
def test_emulated_kernel_matches_reference(kv, p, data):
    case = kv.build_case(**p)
    layout = ops.layout_from_vllm_views(case.views, case.head_size, case.split)
    tr = ops.KVTransfer(layout, case.views, backend="native")
    staged = data.draw(st.booleans())
    ctas = data.draw(st.sampled_from([1, 2, 7, 64]))
    offset = data.draw(st.sampled_from([0, 0, 1, 2, 8]))  # misaligned slots narrow the vectors

    ids = data.draw(st.lists(st.integers(0, case.num_blocks - 1), min_size=1, max_size=5))
    n = layout.slot_bytes(len(ids))
    big = torch.full((n + offset,), 0xA5, dtype=torch.uint8)
    emulate(tr, True, ids, big[offset:], staged=staged, max_ctas=ctas)
    assert torch.equal(big[offset:], kv.ref_gather(case, ids))

    uniq = data.draw(st.permutations(range(case.num_blocks)))
    uniq = uniq[: data.draw(st.integers(1, len(uniq)))]
    skip = data.draw(st.integers(0, len(uniq)))
    src = torch.randint(0, 256, (layout.slot_bytes(len(uniq)) + offset,), dtype=torch.uint8)
    expected = kv.ref_scatter(case, case.buffers, src[offset:], uniq, skip)
    emulate(tr, False, uniq, src[offset:], skip=skip, staged=staged, max_ctas=ctas)
    assert all(torch.equal(b, e) for b, e in zip(case.buffers, expected, strict=True))


@pytest.mark.parametrize("staged", [False, True])
def test_emulated_split_launches(kv, staged):
    """> 128 layers and > 448 blocks: several launches with layer and block offsets."""
    case = kv.build_case("LBNHC", "packed", num_layers=131, num_blocks=452, num_heads=1,
                         block_size=16, head_size=2, elem_size=2)
    layout = ops.layout_from_vllm_views(case.views, 2, "packed")
    tr = ops.KVTransfer(layout, case.views, backend="native")
    ids = list(range(451, -1, -1))
    slot = torch.full((layout.slot_bytes(len(ids)),), 0xA5, dtype=torch.uint8)
    emulate(tr, True, ids, slot, staged=staged, max_ctas=132)
    assert torch.equal(slot, kv.ref_gather(case, ids))
    src = slot.roll(3)
    expected = kv.ref_scatter(case, case.buffers, src, ids, 450)
    emulate(tr, False, ids, src, skip=450, staged=staged, max_ctas=132)
    assert all(torch.equal(b, e) for b, e in zip(case.buffers, expected, strict=True))


def test_emulated_rejects_bad_ids(kv):
    case = kv.build_case("LBNHC", "packed", num_blocks=3)
    layout = ops.layout_from_vllm_views(case.views, case.head_size, "packed")
    tr = ops.KVTransfer(layout, case.views, backend="native")
    slot = torch.full((layout.slot_bytes(1),), 9, dtype=torch.uint8)
    with pytest.raises(AssertionError, match="outside"):
        emulate(tr, True, [3], slot)
    assert bool((slot == 9).all())
