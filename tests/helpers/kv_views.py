"""KV cache tensors shaped exactly as vLLM 0.32/0.33 allocates them, on CPU, for each format.

``FORMATS`` builds the per-layer KV specs the way vLLM's attention backends publish them
(FlashInfer for NVFP4, Triton for the per-token-head modes, the MLA layer and the DeepSeek
V3.2 indexer, an EAGLE3 drafter); :func:`allocate` lays them out with vLLM's own
``compute_layout_strides`` and ``create_kv_cache_views`` over one flat int8 buffer, as the
GPU worker does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
from vllm.v1.kv_cache_interface import (
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
    KVCacheTensor,
    KVQuantMode,
    MLAAttentionSpec,
    SparseCacheRole,
    UniformTypeKVCacheSpecs,
    compute_layout_strides,
    create_kv_cache_views,
)
from vllm.v1.kv_cache_layout import KVCacheLayout

BLOCK = 16
HEADS, HEAD = 8, 128  # a Llama-3-8B-like layer at TP 1
LAYERS = 4


def _std(**kw) -> FullAttentionSpec:
    args = {"block_size": BLOCK, "num_kv_heads": HEADS, "head_size": HEAD,
            "dtype": torch.bfloat16, **kw}
    return FullAttentionSpec(**args)


def _per_token_head(mode: KVQuantMode, dtype: torch.dtype, nibbles: bool) -> FullAttentionSpec:
    # TritonAttentionBackend.customize_spec: data of K and V plus one fp32 scale each.
    hs = HEAD // 2 if nibbles else HEAD
    return _std(dtype=dtype, kv_quant_mode=mode, state_content_bytes=2 * hs + 2 * 4)


def _nvfp4() -> FullAttentionSpec:
    # FlashInferBackend.customize_spec: K and V in separate head slots, each packed fp4
    # data plus fp8 block scales (nvfp4_kv_cache_full_dim).
    return _std(dtype=torch.uint8, kv_quant_mode=KVQuantMode.NVFP4,
                num_head_slots=2 * HEADS, state_content_bytes=HEAD // 2 + HEAD // 16)


def _mla(**kw) -> MLAAttentionSpec:
    args = {"block_size": BLOCK, "num_kv_heads": 1, "head_size": 576,
            "dtype": torch.bfloat16, **kw}
    return MLAAttentionSpec(**args)


def _draft(spec: FullAttentionSpec) -> FullAttentionSpec:
    # vLLM 0.33 marks drafter layers (is_draft); 0.32 has no such field.
    fields = getattr(type(spec), "__dataclass_fields__", {})
    return replace(spec, is_draft=True) if "is_draft" in fields else spec


def _uniform(layers: dict[str, object]) -> UniformTypeKVCacheSpecs:
    return UniformTypeKVCacheSpecs(block_size=BLOCK, kv_cache_specs=layers)


def _layers(spec: object, prefix: str = "model.layers", n: int = LAYERS) -> dict[str, object]:
    return {f"{prefix}.{i}.attn": spec for i in range(n)}


# name -> (per-layer specs, model head_size the connector is given, use_mla)
FORMATS: dict[str, Callable[[], tuple[dict[str, object], int, bool]]] = {
    "bf16": lambda: (_layers(_std()), HEAD, False),
    "fp8 per tensor": lambda: (
        _layers(_std(dtype=torch.uint8, kv_quant_mode=KVQuantMode.FP8_PER_TENSOR)), HEAD, False),
    "int8 per token-head": lambda: (
        _layers(_per_token_head(KVQuantMode.INT8_PER_TOKEN_HEAD, torch.int8, False)),
        HEAD, False),
    "fp8 per token-head": lambda: (
        _layers(_per_token_head(KVQuantMode.FP8_PER_TOKEN_HEAD, torch.uint8, False)),
        HEAD, False),
    "int4 per token-head": lambda: (
        _layers(_per_token_head(KVQuantMode.INT4_PER_TOKEN_HEAD, torch.uint8, True)),
        HEAD, False),
    "nvfp4": lambda: (_layers(_nvfp4()), HEAD, False),
    "K and V head sizes differ": lambda: (
        _layers(_std(head_size=192, head_size_v=HEAD)), 192, False),
    "MLA": lambda: (_layers(_mla()), 576, True),
    "MLA fp8_ds_mla": lambda: (
        _layers(_mla(dtype=torch.uint8, cache_dtype_str="fp8_ds_mla",
                     kv_quant_mode=KVQuantMode.FP8_PER_TENSOR, state_content_bytes=656)),
        576, True),
    # DeepSeek V3.2: every MLA layer has an indexer cache beside it (128 fp8 + 4 scale bytes).
    "MLA + indexer": lambda: (
        {**_layers(_mla()),
         **_layers(_mla(head_size=132, dtype=torch.uint8, cache_role=SparseCacheRole.INDEXER),
                   prefix="model.layers.indexer")},
        576, True),
    # An EAGLE3 head with fewer KV heads than its target, in the same (only) group.
    "EAGLE3 draft": lambda: (
        {**_layers(_std()),
         **_layers(_draft(_std(num_kv_heads=4)), prefix="draft", n=1)},
        HEAD, False),
}

# What each copy can move: (split K/V planes, opaque cells).
EXPECTED = {
    "bf16": (True, True),
    "fp8 per tensor": (True, True),
    "int8 per token-head": (False, True),
    "fp8 per token-head": (False, True),
    "int4 per token-head": (False, True),
    "nvfp4": (False, True),
    "K and V head sizes differ": (False, True),
    "MLA": (True, True),
    "MLA fp8_ds_mla": (True, True),
    "MLA + indexer": (False, False),
    "EAGLE3 draft": (False, False),
}


def kv_cache_config(layer_specs: dict[str, object], num_blocks: int = 64) -> KVCacheConfig:
    """One group, as vLLM builds it: a plain spec when all layers agree, else the
    per-layer ``UniformTypeKVCacheSpecs``."""
    specs = list(layer_specs.values())
    group_spec = specs[0] if all(s == specs[0] for s in specs) else _uniform(layer_specs)
    return KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[],
                         kv_cache_groups=[KVCacheGroupSpec(list(layer_specs), group_spec)])


def allocate(layer_specs: dict[str, object], num_blocks: int = 8,
             layout: str = "LBNHC", fill: bool = False) -> dict[str, torch.Tensor]:
    """One flat int8 buffer with a ``[B, H, N, C]`` view per layer (layer-outer layouts)."""
    kv_layout = KVCacheLayout[layout]
    by_spec: dict[object, list[str]] = {}
    for name, spec in layer_specs.items():
        by_spec.setdefault(spec, []).append(name)
    total = sum(len(names) * num_blocks * spec.page_size_bytes for spec, names in by_spec.items())
    raw = (torch.randint(-128, 128, (total,), dtype=torch.int8) if fill
           else torch.zeros(total, dtype=torch.int8))
    views: dict[str, torch.Tensor] = {}
    offset = 0
    for spec, names in by_spec.items():
        layer_stride, block_stride, *_ = compute_layout_strides(spec, num_blocks, len(names),
                                                                kv_layout)
        tensor = KVCacheTensor(size=total, layers=names, layer_stride=layer_stride,
                               block_stride=block_stride, offset=offset)
        views.update(zip(names, create_kv_cache_views(raw, spec, num_blocks, kv_layout, tensor),
                         strict=True))
        offset += len(names) * layer_stride
    return {name: views[name] for name in layer_specs}
