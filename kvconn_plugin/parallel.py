"""How vLLM ranks map to LMCache KV ranks (must match LMCache's own client exactly,
since the KV rank is part of every stored object's identity).

With several servers (``lmcache.mp.server_urls``), ranks are split into contiguous blocks
of ``world_size // n_servers``, one block per server, as LMCache's ``ParallelStrategy``
does: each server sees a world of that size (non-MLA) and a TP size of ``tp // n_servers``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KVRanks:
    world_size: int        # KV world size sent in keys
    worker_id: int         # this rank's KV worker id
    num_kv_readers: int    # read locks a lookup takes per object
    tp_size: int           # KV TP size (the lookup's ignored tp_size argument)
    is_writer: bool        # MLA replicates KV across TP: only one rank per server stores
    server_index: int      # which of the configured servers this rank talks to


def kv_ranks(*, mla: bool, world_size: int, rank: int, tp_size: int, n_servers: int = 1) -> KVRanks:
    """This rank's KV identity. ``world_size % n_servers == 0`` is checked with the config
    (``config.check_topology``); here ``n_servers`` is only clamped to ``[1, world_size]``."""
    n_servers = max(1, min(n_servers, world_size))
    per_server = max(1, world_size // n_servers)
    server_index = min(rank // per_server, n_servers - 1)
    kv_tp = max(1, tp_size // n_servers)
    if mla:
        # The latent cache is replicated across TP: one object per pipeline stage, read
        # by the TP ranks of that stage on one server, written by the first of them.
        return KVRanks(max(1, world_size // tp_size), rank // tp_size, kv_tp, kv_tp,
                       rank % kv_tp == 0, server_index)
    return KVRanks(per_server, rank % per_server, 1, kv_tp, True, server_index)


def num_writers(*, mla: bool, world_size: int, tp_size: int, n_servers: int = 1) -> int:
    """How many ranks store each chunk (each confirms its own commit)."""
    if not mla:
        return max(1, world_size)
    n_servers = max(1, min(n_servers, world_size))
    return max(1, world_size // max(1, tp_size // n_servers))
