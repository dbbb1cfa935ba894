"""Which of vLLM's KV cache groups the cache moves, and whether it can move them correctly.

A model with one kind of attention has one KV cache group. A hybrid (sliding-window layers
beside full-attention layers, e.g. Gemma 3, gpt-oss) has several, each with its own block
table, when vLLM's hybrid KV cache manager is on. We declare ``SupportsHMA`` so vLLM keeps
that manager on (turning it off costs GPU memory), and move every group the prefix cache
would: full attention (MLA included) and sliding window. One object per chunk then holds
every such layer of every group, layers ordered group by group; a sliding-window group only
loads the blocks inside its window (vLLM gives the rest the null block).

Groups we cannot restore at a token position (Mamba / linear-attention state, chunked local
attention, ...) make the cache unusable for that model: it is turned off with one warning
naming the group, and vLLM serves without it (never a failed start, never wrong tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

NULL_BLOCK_ID = 0  # vLLM's BlockPool hands out block 0 as the shared null block, never as data
FULL, SLIDING = "full", "sliding"
# Cache namespace of hybrid objects: their layout (several groups in one object) is ours
# alone, so LMCache's connector, which refuses several groups, never sees them.
HYBRID_NAMESPACE = "##kvconn-hybrid-v1"


@dataclass(frozen=True)
class GroupInfo:
    index: int                 # vLLM's KV cache group id
    kind: str                  # FULL or SLIDING
    layer_names: tuple[str, ...]
    block_size: int
    sliding_window: int | None = None


@dataclass(frozen=True)
class KVGroups:
    groups: tuple[GroupInfo, ...]
    unsupported: str | None = None  # why the cache must stay off for this model

    @property
    def hybrid(self) -> bool:
        return len(self.groups) > 1

    @property
    def windowed(self) -> bool:
        """A sliding-window group exists: vLLM hands it the null block outside the window."""
        return any(g.kind == SLIDING for g in self.groups)

    def model_name(self, base: str) -> str:
        return base + HYBRID_NAMESPACE if self.hybrid else base

    def describe(self) -> str:
        """E.g. ``full:2,sliding(256):2`` (kind and layer count per group), or ``single``."""
        if not self.groups:
            return "single"
        return ",".join(
            (f"sliding({g.sliding_window})" if g.kind == SLIDING else g.kind)
            + f":{len(g.layer_names)}" for g in self.groups)


SINGLE = KVGroups(groups=())  # no kv_cache_config given: one group, whatever vLLM registers


def describe_groups(kv_cache_config: Any) -> KVGroups:
    """Classify ``kv_cache_config``'s groups (vLLM's ``KVCacheConfig``, or None)."""
    if kv_cache_config is None or not getattr(kv_cache_config, "kv_cache_groups", None):
        return SINGLE
    from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec

    ids = getattr(kv_cache_config, "prefix_cacheable_group_ids", None)
    if ids is None:
        ids = tuple(range(len(kv_cache_config.kv_cache_groups)))
    groups = []
    for gid in ids:
        group = kv_cache_config.kv_cache_groups[gid]
        spec = group.kv_cache_spec
        name = type(spec).__name__
        if isinstance(spec, SlidingWindowSpec) and not _is_mla(spec):
            kind, window = SLIDING, int(spec.sliding_window)
        elif isinstance(spec, FullAttentionSpec) and type(spec).__name__ in (
                "FullAttentionSpec", "MLAAttentionSpec"):
            kind, window = FULL, None
        else:
            return KVGroups(tuple(groups), unsupported=(
                f"KV cache group {gid} ({name}) holds state the cache cannot restore"))
        groups.append(GroupInfo(gid, kind, tuple(group.layer_names), int(spec.block_size),
                                window))
    if not groups:
        return KVGroups((), unsupported="the model has no prefix-cacheable KV cache group")
    if len({g.block_size for g in groups}) > 1:
        return KVGroups(tuple(groups), unsupported=(
            "KV cache groups with different block sizes "
            f"({sorted({g.block_size for g in groups})})"))
    return KVGroups(tuple(groups))


def _is_mla(spec: Any) -> bool:
    return "MLA" in type(spec).__name__


def leading_nulls(block_ids: tuple[int, ...] | list[int]) -> int:
    """How many leading blocks are vLLM's null block (a sliding window's skipped prefix)."""
    n = 0
    for b in block_ids:
        if b != NULL_BLOCK_ID:
            break
        n += 1
    return n
