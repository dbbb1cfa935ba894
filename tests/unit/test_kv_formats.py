"""Which KV cache formats the connector can move: the verdicts of ``kvconn_plugin.kv_formats``
for every format vLLM 0.32/0.33 allocates, checked against what the copies really do.

Tensors are plain CPU tensors laid out by vLLM's own view code (tests/helpers/kv_views.py).
"Split" is today's K/V-plane copy; "opaque" is the fused single-plane copy, emulated here
with our kernels over a one-plane geometry (``[L, tokens, H * C]`` bytes per chunk).
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

from kvconn_plugin import kv_formats, ops
from kvconn_plugin.errors import KVConnTransferError
from kvconn_plugin.ops.layout import PagedKVLayout
from tests.helpers import kv_views
from tests.helpers.kv_views import EXPECTED, FORMATS

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def vllm_config():
    from tests.helpers.sched_harness import make_vllm_config

    return make_vllm_config(connector=None)


def _with(cfg, **parts):
    """A stand-in VllmConfig with some parts replaced (the checker reads only these)."""
    base = {"parallel_config": cfg.parallel_config, "cache_config": cfg.cache_config,
            "model_config": cfg.model_config, "speculative_config": None}
    return SimpleNamespace(**{**base, **parts})


@pytest.mark.parametrize("name", list(FORMATS))
@pytest.mark.parametrize("opaque", [False, True], ids=["split", "opaque"])
def test_verdicts_from_specs_and_from_tensors_agree(name, opaque, vllm_config):
    specs, head_size, mla = FORMATS[name]()
    want = EXPECTED[name][opaque]
    by_config = kv_formats.check_kv_cache_config(
        _with(vllm_config), kv_views.kv_cache_config(specs), opaque_content=opaque)
    by_tensors = kv_formats.check_kv_caches(
        kv_views.allocate(specs), head_size=head_size, use_mla=mla, opaque_content=opaque)
    assert by_config.ok is want, by_config
    assert by_tensors.ok is want, by_tensors
    for verdict in (by_config, by_tensors):
        assert verdict.ok or verdict.reason  # a refusal always says why


@pytest.mark.parametrize("name", [n for n in FORMATS if EXPECTED[n] != (False, False)])
def test_split_verdict_matches_the_split_layout_code(name):
    """Where the split verdict says no, today's layout code raises; where it says yes, the
    layout builds (so the checker, not the copy, decides and nothing raises later)."""
    specs, head_size, mla = FORMATS[name]()
    views = list(kv_views.allocate(specs).values())
    split = "mla" if mla else "packed"
    if EXPECTED[name][0]:
        ops.layout_from_vllm_views(views, head_size, split)
    else:
        with pytest.raises(KVConnTransferError):
            ops.layout_from_vllm_views(views, head_size, split)


def _fused_layout(views: list[torch.Tensor]) -> PagedKVLayout:
    v = views[0]
    blocks, heads, tokens, content = v.shape
    sb, sh, sn, _ = v.stride()
    es = v.element_size()
    return PagedKVLayout(num_layers=len(views), num_blocks=blocks, block_size=tokens,
                         num_heads=heads, num_planes=1, run_bytes=content * es,
                         block_stride=sb * es, head_stride=sh * es, token_stride=sn * es,
                         plane_stride=0, device="cpu")


@pytest.mark.parametrize("layout", ["LBNHC", "LBHNC"])
@pytest.mark.parametrize("name", [n for n in FORMATS if EXPECTED[n][1]])
def test_opaque_copy_moves_every_format_it_accepts_exactly(name, layout):
    """Gather from one engine's cache, scatter into another's: every byte of every moved
    block arrives (inline scales, NVFP4 head slots and K/V of different sizes included)."""
    specs, _, _ = FORMATS[name]()
    src = list(kv_views.allocate(specs, layout=layout, fill=True).values())
    dst = list(kv_views.allocate(specs, layout=layout).values())
    geometry = _fused_layout(src)
    assert geometry == _fused_layout(dst)
    blocks = [5, 2, 7]
    slot = torch.empty(geometry.slot_bytes(len(blocks)), dtype=torch.uint8)
    ops.KVTransfer(geometry, src).gather(blocks, slot)
    ops.KVTransfer(geometry, dst).scatter(slot, [1, 3, 4])
    for s, d in zip(src, dst, strict=True):
        for b_src, b_dst in zip(blocks, [1, 3, 4], strict=True):
            assert torch.equal(s[b_src].view(torch.uint8), d[b_dst].view(torch.uint8))
        assert not d[0].view(torch.uint8).any()  # blocks not written stay untouched


def test_context_parallelism_is_refused_whatever_the_format(vllm_config):
    for dcp, pcp in ((2, 1), (1, 2)):
        pc = SimpleNamespace(decode_context_parallel_size=dcp, prefill_context_parallel_size=pcp)
        verdict = kv_formats.check_vllm_config(_with(vllm_config, parallel_config=pc),
                                               opaque_content=True)
        assert not verdict.ok and "context parallel" in verdict.reason


@pytest.mark.parametrize("dtype,split_ok", [
    ("auto", True), ("fp8", True), ("fp8_e5m2", True), ("int8_per_token_head", False),
    ("fp8_per_token_head", False), ("int4_per_token_head", False), ("nvfp4", False),
    ("turboquant_k8v4", False),
])
def test_cache_dtype_decides_before_any_model_is_built(dtype, split_ok, vllm_config):
    cache = SimpleNamespace(cache_dtype=dtype)
    split = kv_formats.check_vllm_config(_with(vllm_config, cache_config=cache),
                                         opaque_content=False)
    assert split.ok is split_ok
    assert kv_formats.check_vllm_config(_with(vllm_config, cache_config=cache)).ok  # ours


def test_drafter_with_other_head_counts_is_refused_from_the_config(vllm_config):
    mc = vllm_config.model_config
    draft = SimpleNamespace(get_num_kv_heads=lambda pc: mc.get_num_kv_heads(pc) * 2,
                            get_head_size=mc.get_head_size)
    spec = SimpleNamespace(method="eagle3", draft_model_config=draft, draft_parallel_config=None)
    verdict = kv_formats.check_vllm_config(_with(vllm_config, speculative_config=spec),
                                           opaque_content=True)
    assert not verdict.ok and "eagle3 drafter" in verdict.reason
    same = SimpleNamespace(get_num_kv_heads=mc.get_num_kv_heads, get_head_size=mc.get_head_size)
    spec.draft_model_config = same
    assert kv_formats.check_vllm_config(_with(vllm_config, speculative_config=spec)).ok


def test_groups_of_attention_are_moved_and_state_or_nothing_is_refused(vllm_config):
    from vllm.v1.kv_cache_interface import KVCacheConfig, KVCacheGroupSpec, MambaSpec

    specs, _, _ = FORMATS["bf16"]()
    cfg = kv_views.kv_cache_config(specs)
    two = SimpleNamespace(kv_cache_groups=[cfg.kv_cache_groups[0]] * 2)
    assert kv_formats.check_kv_cache_config(_with(vllm_config), two).ok  # kv_groups moves both
    mamba = MambaSpec(block_size=16, shapes=((4, 8),), dtypes=(torch.float32,))
    hybrid = KVCacheConfig(num_blocks=8, kv_cache_tensors=[], kv_cache_groups=[
        cfg.kv_cache_groups[0], KVCacheGroupSpec(["m0"], mamba)])
    verdict = kv_formats.check_kv_cache_config(_with(vllm_config), hybrid)
    assert not verdict.ok and "MambaSpec" in verdict.reason
    none = SimpleNamespace(kv_cache_groups=[])
    assert "attention-free" in kv_formats.check_kv_cache_config(_with(vllm_config), none).reason


def test_sliding_window_groups_are_moved(vllm_config):
    from vllm.v1.kv_cache_interface import SlidingWindowSpec

    spec = SlidingWindowSpec(block_size=16, num_kv_heads=8, head_size=128,
                             dtype=torch.bfloat16, sliding_window=1024)
    cfg = kv_views.kv_cache_config({"l0": spec, "l1": spec})
    assert kv_formats.check_kv_cache_config(_with(vllm_config), cfg).ok


def test_tensor_geometry_the_formula_cannot_address():
    specs, head, _ = FORMATS["bf16"]()
    views = kv_views.allocate(specs)
    odd = {k: v.transpose(2, 3) for k, v in views.items()}  # content dim no longer stride 1
    verdict = kv_formats.check_kv_caches(odd, head_size=head, use_mla=False, opaque_content=True)
    assert not verdict.ok and "strided content" in verdict.reason
    assert not kv_formats.check_kv_caches({}, head_size=head, use_mla=False).ok
