"""Argument checks: bad calls raise KVConnTransferError and write nothing (CPU)."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from kvconn_plugin import ops
from kvconn_plugin.errors import KVConnTransferError
from kvconn_plugin.ops import _native

BACKENDS = ["torch"] + (["native"] if _native.cpu_lib is not None else [])


@pytest.fixture
def setup(kv):
    case = kv.build_case("LBNHC", "packed", num_blocks=4)
    layout = ops.layout_from_vllm_views(case.views, case.head_size, "packed")
    return case, layout


BAD_GATHER = [
    ("out-of-range", [0, 4], None),
    ("negative-id", [1, -1], None),
    ("float-ids", [0.0, 1.0], None),
    ("2d-ids", [[0, 1]], None),
    ("tensor-floats", torch.tensor([0.0, 1.0]), None),
    ("short-dst", [0, 1], -1),
    ("long-dst", [0, 1], +16),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("what", "ids", "size_delta"), BAD_GATHER, ids=[b[0] for b in BAD_GATHER])
def test_bad_gather_leaves_dst_untouched(setup, backend, what, ids, size_delta):
    case, layout = setup
    tr = ops.KVTransfer(layout, case.views, backend=backend)
    size = layout.slot_bytes(2) + (size_delta or 0)
    dst = torch.full((size,), 0x5A, dtype=torch.uint8)
    with pytest.raises(KVConnTransferError):
        tr.gather(ids, dst)
    assert bool((dst == 0x5A).all())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad_dst", ["int16", "noncontig", "numpy"])
def test_bad_dst_kind(setup, backend, bad_dst):
    case, layout = setup
    tr = ops.KVTransfer(layout, case.views, backend=backend)
    n = layout.slot_bytes(1)
    if bad_dst == "int16":
        dst = torch.zeros(n // 2, dtype=torch.int16)
    elif bad_dst == "noncontig":
        dst = torch.zeros(2 * n, dtype=torch.uint8)[::2]
    else:
        dst = np.zeros(n, dtype=np.uint8)
    with pytest.raises(KVConnTransferError):
        tr.gather([0], dst)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("ids", "skip"), [([0, 1], 3), ([0, 1], -1), ([0, 9], 0), ([0, 1], 1.5),
                                          ([0, -2], 1)])
def test_bad_scatter_writes_nothing(setup, backend, ids, skip):
    case, layout = setup
    tr = ops.KVTransfer(layout, case.views, backend=backend)
    before = [b.clone() for b in case.buffers]
    src = torch.randint(0, 256, (layout.slot_bytes(2),), dtype=torch.uint8)
    with pytest.raises(KVConnTransferError):
        tr.scatter(src, ids, skip_blocks=skip)
    assert all(torch.equal(a, b) for a, b in zip(before, case.buffers, strict=True))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_and_full_skip_are_noops(setup, backend):
    case, layout = setup
    tr = ops.KVTransfer(layout, case.views, backend=backend)
    before = [b.clone() for b in case.buffers]
    tr.gather([], torch.empty(0, dtype=torch.uint8))
    tr.scatter(torch.zeros(layout.slot_bytes(2), dtype=torch.uint8), [0, 1], skip_blocks=2)
    assert all(torch.equal(a, b) for a, b in zip(before, case.buffers, strict=True))


def test_layout_rejections(kv):
    case = kv.build_case("LBNHC", "packed")
    with pytest.raises(KVConnTransferError, match="split"):
        ops.layout_from_vllm_views(case.views, 8, "bogus")
    with pytest.raises(KVConnTransferError, match="2\\*head_size"):
        ops.layout_from_vllm_views(case.views, 7, "packed")
    with pytest.raises(KVConnTransferError, match="planes split"):
        ops.layout_from_vllm_views(case.views, 8, "planes")  # LBNHC cannot be the CPU split
    with pytest.raises(KVConnTransferError, match="one head"):
        ops.layout_from_vllm_views(case.views, 8, "mla")
    with pytest.raises(KVConnTransferError, match="4-D"):
        ops.layout_from_vllm_views([case.views[0][0]], 8, "packed")
    other = kv.build_case("LBHNC", "packed")
    with pytest.raises(KVConnTransferError, match="differs from layer 0"):
        ops.layout_from_vllm_views([case.views[0], other.views[1]], 8, "packed")
    with pytest.raises(KVConnTransferError, match="no KV cache"):
        ops.layout_from_vllm_views([], 8, "packed")


def test_bind_rejects_layout_larger_than_storage(kv):
    case = kv.build_case("LBNHC", "packed", num_blocks=4)
    layout = ops.layout_from_vllm_views(case.views, 8, "packed")
    too_big = ops.PagedKVLayout(**{**layout.__dict__, "num_blocks": 5})
    with pytest.raises(KVConnTransferError, match="outside its storage"):
        ops.KVTransfer(too_big, case.views)
    with pytest.raises(KVConnTransferError, match="layers"):
        ops.KVTransfer(layout, case.views[:1])
    with pytest.raises(KVConnTransferError, match="backend"):
        ops.KVTransfer(layout, case.views, backend="fast")


@pytest.mark.skipif(_native.cpu_lib is None, reason="C++ library not built")
def test_c_abi_rejects_bad_arguments(kv):
    """The library re-checks everything itself; a bad call returns an error and writes nothing."""
    case = kv.build_case("LBNHC", "packed", num_blocks=4)
    layout = ops.layout_from_vllm_views(case.views, 8, "packed")
    tr = ops.KVTransfer(layout, case.views, backend="native")
    lib = _native.cpu_lib
    dst = torch.full((layout.slot_bytes(2),), 7, dtype=torch.uint8)
    bad_ids = np.array([0, 4], dtype=np.int64)
    rc = lib.kvc_cpu_gather(tr._geom, tr._bases.ctypes.data, bad_ids.ctypes.data, 2,
                            dst.data_ptr(), 1)
    assert rc == -1 and "outside" in _native.cpu_error()
    assert bool((dst == 7).all())
    geom = _native.KVGeometry.from_buffer_copy(tr._geom)
    geom.abi_version = 99
    ids = np.array([0, 1], dtype=np.int64)
    rc = lib.kvc_cpu_gather(ctypes.byref(geom), tr._bases.ctypes.data, ids.ctypes.data, 2,
                            dst.data_ptr(), 1)
    assert rc == -1 and "ABI" in _native.cpu_error()
    rc = lib.kvc_cpu_scatter(tr._geom, tr._bases.ctypes.data, ids.ctypes.data, 2, 3,
                             dst.data_ptr(), 1)
    assert rc == -1 and "skip_blocks" in _native.cpu_error()


def _run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=full_env, timeout=120)


def test_backend_env_and_import_lightness():
    code = (
        "import sys, kvconn_plugin; assert 'torch' not in sys.modules, 'torch imported';"
        "import kvconn_plugin.ops as o; print(o.BACKEND, o.backend_info()['requested'])"
    )
    res = _run_python(code, KVCONN_KERNELS="torch")
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["torch", "torch"]
    res = _run_python("import kvconn_plugin.ops", KVCONN_KERNELS="fastest")
    assert res.returncode != 0 and "KVCONN_KERNELS" in res.stderr


def test_pin_host_memory_without_gpu_is_false():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present; covered by the CUDA tests")
    buf = torch.zeros(4096, dtype=torch.uint8)
    assert ops.pin_host_memory(buf.data_ptr(), buf.numel()) is False
    with pytest.raises(KVConnTransferError):
        ops.pin_host_memory(0, 10)
