"""Which of vLLM's KV cache formats the connector can move, decided before anything is
registered, so a format we cannot move costs the cache, never the engine.

vLLM 0.32/0.33 hands every layer a ``[B, H, N, C]`` view of one flat buffer; C holds a
(head slot, token) cell's whole content: K and V side by side, plus any inline scales.
What a copy can move depends on how it reads C:

* the *opaque* copy (LMCache's fused single-plane object ``[L, tokens, H * C]``) moves each
  cell's bytes as they are, so formats whose extras live inside C move too: per-token-head
  int8/fp8/int4 scales, NVFP4's K and V head slots with their block scales, K and V of
  different head sizes;
* the *split* copy (``[2, L, tokens, H * D]``, K and V as separate planes) needs
  ``C == 2 * head_size`` plain elements (or one MLA latent).

Neither can move: layers of different shapes (MLA indexer caches, EAGLE3 draft layers with
other head counts), KV cache groups other than full attention and sliding window (which
``kv_groups`` moves, several at once for a hybrid model), compressed states, views the
strided formula cannot address, and context parallelism (each rank holds an interleaved
share of every block's tokens, and an object would mean something else under another rank
split). The connector writes the opaque (fused) layout; the split one remains for tests.

``check_vllm_config`` answers from the engine config alone (what ``kvconn doctor`` can see);
``check_kv_cache_config`` adds vLLM's KV specs (both connector roles get a kv_cache_config);
``check_kv_caches`` inspects the registered tensors (the worker's last word).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# The worker writes the fused single-plane (opaque content) layout.
OPAQUE_CONTENT = True

# kv_cache_dtype families whose cells hold more than K|V elements (scales, packed nibbles).
_PACKED_DTYPE_PREFIXES = ("nvfp4", "turboquant_", "octave_", "ultraquant_")
_MOVABLE_KINDS = ("FullAttentionSpec", "MLAAttentionSpec", "SlidingWindowSpec")


@dataclass(frozen=True)
class FormatVerdict:
    """``reason`` is None when the format can be moved; ``name`` names the format."""

    name: str = "standard"
    reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.reason is None


def _unsupported(name: str, reason: str) -> FormatVerdict:
    return FormatVerdict(name=name, reason=f"{name}: {reason}")


def cache_dtype_family(cache_dtype: str) -> str:
    """``plain``, ``fp8-per-tensor``, ``per-token-head`` or ``packed`` for a kv_cache_dtype."""
    dt = str(cache_dtype)
    if dt.endswith("_per_token_head"):
        return "per-token-head"
    if dt.startswith(_PACKED_DTYPE_PREFIXES) or dt.endswith("_ds_mla"):
        return "packed"
    if dt.startswith("fp8"):
        return "fp8-per-tensor"
    return "plain"


# ---------------------------------------------------------------------------- engine config


def check_vllm_config(vllm_config: Any, *, opaque_content: bool = OPAQUE_CONTENT) -> FormatVerdict:
    """What the engine config alone says (no model instantiated)."""
    pc = vllm_config.parallel_config
    dcp = int(getattr(pc, "decode_context_parallel_size", 1) or 1)
    pcp = int(getattr(pc, "prefill_context_parallel_size", 1) or 1)
    if dcp > 1 or pcp > 1:
        return _unsupported(
            "context parallelism",
            f"decode/prefill context parallel size {dcp}/{pcp} spreads each block's tokens "
            "over several ranks; an object's content would depend on that split")
    dtype = str(getattr(vllm_config.cache_config, "cache_dtype", "auto"))
    family = cache_dtype_family(dtype)
    model = vllm_config.model_config
    # An MLA cell is one latent run, copied whole by either copy.
    opaque = opaque_content or bool(getattr(model, "use_mla", False))
    if not opaque and family in ("per-token-head", "packed"):
        return _unsupported(
            f"kv_cache_dtype={dtype}",
            "its cells hold scales or packed values next to K and V, which the K/V-split "
            "copy cannot separate")
    hf = getattr(model, "hf_text_config", None)
    if getattr(hf, "index_topk", None) and getattr(model, "use_mla", False):
        return _unsupported(
            "MLA indexer cache",
            "the sparse-attention indexer adds a second, differently shaped cache per layer")
    draft = _draft_shape_mismatch(vllm_config)
    if draft is not None:
        return _unsupported("draft model layers", draft)
    return FormatVerdict(name=_format_name(dtype, model))


def _format_name(dtype: str, model: Any) -> str:
    base = "MLA" if getattr(model, "use_mla", False) else "attention"
    return base if dtype == "auto" else f"{base}, kv_cache_dtype={dtype}"


def _draft_shape_mismatch(vllm_config: Any) -> str | None:
    """EAGLE-style drafters put their own attention layers into the target's KV cache."""
    spec = getattr(vllm_config, "speculative_config", None)
    draft = getattr(spec, "draft_model_config", None)
    target = vllm_config.model_config
    if spec is None or draft is None or draft is target:
        return None
    try:
        pc = getattr(spec, "draft_parallel_config", None) or vllm_config.parallel_config
        d_heads, d_size = draft.get_num_kv_heads(pc), draft.get_head_size()
        t_heads = target.get_num_kv_heads(vllm_config.parallel_config)
        t_size = target.get_head_size()
    except Exception:  # a draft config without attention shape: nothing to compare
        return None
    if (d_heads, d_size) == (t_heads, t_size):
        return None
    return (f"{getattr(spec, 'method', 'draft')} drafter has {d_heads} KV heads of size "
            f"{d_size}, the target {t_heads} of size {t_size}: two layer shapes in one cache")


# ---------------------------------------------------------------------------- KV cache specs


def check_kv_cache_config(
    vllm_config: Any, kv_cache_config: Any, *, opaque_content: bool = OPAQUE_CONTENT
) -> FormatVerdict:
    """The engine config plus vLLM's KV specs. Workers get every layer's spec; the scheduler
    gets one representative layer per group, so for it the engine-config checks (indexer,
    drafter shape) carry the verdict."""
    verdict = check_vllm_config(vllm_config, opaque_content=opaque_content)
    if not verdict.ok or kv_cache_config is None:
        return verdict
    from kvconn_plugin.kv_groups import describe_groups

    groups = list(getattr(kv_cache_config, "kv_cache_groups", None) or ())
    if not groups:
        return _unsupported("attention-free model", "there is no KV cache to move")
    moved = describe_groups(kv_cache_config)
    if moved.unsupported:
        return _unsupported("KV cache group", moved.unsupported)
    layer_specs = {}
    for g in moved.groups:
        layer_specs.update(_layer_specs(groups[g.index]))
    for name, spec in layer_specs.items():
        bad = _spec_problem(spec, opaque_content)
        if bad is not None:
            return _unsupported(bad[0], f"layer {name}: {bad[1]}")
    shapes: dict[tuple, list[str]] = {}
    for name, spec in layer_specs.items():
        shapes.setdefault(_page_shape(spec), []).append(name)
    if len(shapes) > 1:
        return _mixed_shapes(layer_specs, shapes)
    return verdict


def _layer_specs(group: Any) -> dict[str, Any]:
    spec = group.kv_cache_spec
    per_layer = getattr(spec, "kv_cache_specs", None)  # UniformTypeKVCacheSpecs
    if isinstance(per_layer, Mapping):
        return dict(per_layer)
    return dict.fromkeys(group.layer_names, spec)


def _spec_problem(spec: Any, opaque_content: bool) -> tuple[str, str] | None:
    kinds = {cls.__name__ for cls in type(spec).__mro__}
    if not kinds.intersection(_MOVABLE_KINDS):
        return (type(spec).__name__,
                "only attention caches hold per-token KV (state caches do not)")
    if "SlidingWindowMLASpec" in kinds:
        return ("SlidingWindowMLASpec", "sliding windows recycle blocks outside the window")
    if getattr(spec, "cache_role", None) is not None and _enum_value(spec.cache_role) == "indexer":
        return ("MLA indexer cache", "the sparse-attention indexer's own cache")
    if getattr(spec, "tokens_per_state", 1) != 1:
        return ("compressed states",
                f"one stored state covers {spec.tokens_per_state} tokens, not one")
    if not opaque_content and "MLAAttentionSpec" not in kinds:
        packed = (getattr(spec, "num_head_slots", None) is not None
                  or getattr(spec, "state_content_bytes", None) is not None)
        if packed or _enum_value(getattr(spec, "kv_quant_mode", 0)) not in (0, 1):
            return ("packed or quantised cells",
                    "cells hold more than K|V elements; the K/V-split copy cannot move them")
        if spec.head_size != spec.head_size_v:
            return ("K and V of different head sizes",
                    f"head_size {spec.head_size} vs head_size_v {spec.head_size_v}")
    return None


def _enum_value(value: Any) -> Any:
    return getattr(value, "value", value)


def _page_shape(spec: Any) -> tuple:
    # Not the spec's kind: a hybrid's sliding-window and full-attention layers share one
    # object as long as their cells match.
    return (spec.block_size, spec.num_heads, spec.state_content_size_bytes, str(spec.dtype))


def _mixed_shapes(layer_specs: dict[str, Any], shapes: dict[tuple, list[str]]) -> FormatVerdict:
    kinds = [f"{len(names)} x (H={shape[1]}, C={shape[2]} B, {shape[3]}) e.g. {names[0]}"
             for shape, names in shapes.items()]
    detail = "layers of different shapes in one cache: " + "; ".join(kinds)
    if any(getattr(s, "is_draft", False) for s in layer_specs.values()):
        return _unsupported("draft model layers", detail)
    return _unsupported("mixed layer shapes", detail)


# ---------------------------------------------------------------------------- tensors


def check_kv_caches(
    kv_caches: Mapping[str, Any],
    *,
    head_size: int,
    use_mla: bool,
    opaque_content: bool = OPAQUE_CONTENT,
) -> FormatVerdict:
    """The tensors ``register_kv_caches`` received: one strided geometry for all layers."""
    if not kv_caches:
        return _unsupported("no KV cache", "register_kv_caches received no tensors")
    names = list(kv_caches)
    first = kv_caches[names[0]]
    kinds: dict[tuple, list[str]] = {}
    for name, t in kv_caches.items():
        if t.dim() != 4:
            return _unsupported("unexpected view", f"layer {name} is {t.dim()}-D, not [B, H, N, C]")
        # Strides may differ between a hybrid's groups (one layout per group, checked there).
        key = (tuple(t.shape), str(t.dtype), str(t.device))
        kinds.setdefault(key, []).append(name)
    if len(kinds) > 1:
        detail = "; ".join(f"{len(v)} x {list(k[0])} {k[1]} e.g. {v[0]}" for k, v in kinds.items())
        return _unsupported("mixed layer shapes", f"layers of different shapes: {detail}")
    if first.device.type not in ("cpu", "cuda"):
        return _unsupported(f"{first.device.type} KV cache", "only CPU and CUDA memory is copied")
    strides = first.stride()
    if strides[3] != 1 or min(strides) < 0:
        return _unsupported("strided content", f"strides {tuple(strides)}: each cell's content "
                            "must be contiguous and every stride non-negative")
    _, heads, _, content = (int(x) for x in first.shape)
    if not opaque_content:
        if use_mla and heads != 1:
            return _unsupported("MLA with head slots", f"{heads} head slots, expected 1")
        if not use_mla and content != 2 * head_size:
            return _unsupported(
                "packed or quantised cells",
                f"C={content} {first.dtype} elements, not 2 x head_size ({2 * head_size}); "
                "the K/V-split copy cannot separate K and V")
    return FormatVerdict(name=f"{len(names)} x {list(first.shape)} {first.dtype}")
