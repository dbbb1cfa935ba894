"""Which KV cache groups the cache moves, and how one chunk object holds several groups."""

from __future__ import annotations

import pytest
import torch
from vllm.v1.kv_cache_interface import (
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
    MambaSpec,
    SlidingWindowSpec,
)

from kvconn_plugin import ops
from kvconn_plugin.errors import KVConnTransferError
from kvconn_plugin.kv_groups import HYBRID_NAMESPACE, SINGLE, describe_groups, leading_nulls
from kvconn_plugin.worker.chunk_copy import ChunkCopier, GroupCopy

BS, HEADS, HEAD = 16, 2, 64


def _config(*specs) -> KVCacheConfig:
    groups = [KVCacheGroupSpec([f"g{i}.l{j}" for j in range(2)], spec)
              for i, spec in enumerate(specs)]
    return KVCacheConfig(num_blocks=64, kv_cache_tensors=[], kv_cache_groups=groups)


def _full():
    return FullAttentionSpec(block_size=BS, num_kv_heads=HEADS, head_size=HEAD,
                             dtype=torch.bfloat16)


def _sliding(window=256):
    return SlidingWindowSpec(block_size=BS, num_kv_heads=HEADS, head_size=HEAD,
                             dtype=torch.bfloat16, sliding_window=window)


def test_single_group_model_keeps_its_name():
    g = describe_groups(_config(_full()))
    assert not g.hybrid and g.unsupported is None and g.model_name("m") == "m"
    assert describe_groups(None) is SINGLE


def test_sliding_and_full_groups_are_moved_in_their_own_namespace():
    g = describe_groups(_config(_full(), _sliding(), _sliding()))
    assert g.unsupported is None and g.hybrid
    assert g.describe() == "full:2,sliding(256):2,sliding(256):2"
    assert g.model_name("m") == "m" + HYBRID_NAMESPACE


def test_state_the_cache_cannot_restore_turns_it_off():
    mamba = MambaSpec(block_size=BS, shapes=((4, 8),), dtypes=(torch.float32,))
    g = describe_groups(_config(_full(), mamba))
    assert g.unsupported is not None and "MambaSpec" in g.unsupported


def test_leading_nulls():
    assert leading_nulls([0, 0, 5, 0]) == 2 and leading_nulls([3, 0]) == 0
    assert leading_nulls([]) == 0


def _group(num_layers: int, num_blocks: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    views = [torch.randn(num_blocks, HEADS, BS, 2 * HEAD, generator=g).to(torch.bfloat16)
             for _ in range(num_layers)]
    layout = ops.layout_from_vllm_views(views, HEAD, "fused")
    return views, ops.KVTransfer(layout, views)


def test_one_object_holds_every_group_and_skips_a_windows_null_prefix():
    full, t_full = _group(2, seed=1)
    sliding, t_sliding = _group(3, seed=2)
    copier = ChunkCopier([GroupCopy(t_full, 0, 2), GroupCopy(t_sliding, 2, 3)])
    assert copier.num_layers == 5
    slot = torch.empty(5 * 4 * BS * HEADS * 2 * HEAD * 2, dtype=torch.uint8)
    copier.gather(([1, 2, 3, 4], [5, 6, 7, 8]), slot)
    obj = slot.view(torch.bfloat16).view(5, 4 * BS, HEADS, 2 * HEAD)
    # Layer-major, the full group's layers first: token t of block j is obj[l, j*BS + t].
    assert torch.equal(obj[1, BS:2 * BS], full[1][2].transpose(0, 1))
    assert torch.equal(obj[4, 3 * BS:], sliding[2][8].transpose(0, 1))
    # Load into other blocks; the sliding group's first two blocks are its null prefix.
    for v in full + sliding:
        v[9:13].fill_(0)
    copier.scatter(slot, ([9, 10, 11, 12], [0, 0, 11, 12]), (0, 2))
    assert all(torch.equal(v[9:13], v[1:5]) for v in full)
    assert all(torch.equal(v[11:13], v[7:9]) for v in sliding)
    assert all(bool((v[9:11] == 0).all()) for v in sliding)  # never written


def test_groups_must_share_per_token_bytes():
    _, a = _group(1)
    g = torch.Generator().manual_seed(3)
    wide = [torch.randn(16, HEADS * 2, BS, 2 * HEAD, generator=g).to(torch.bfloat16)]
    b = ops.KVTransfer(ops.layout_from_vllm_views(wide, HEAD, "fused"), wide)
    with pytest.raises(KVConnTransferError):
        ChunkCopier([GroupCopy(a, 0, 1), GroupCopy(b, 1, 1)])
