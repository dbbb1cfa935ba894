"""How vLLM ranks map to LMCache KV ranks (must match LMCache's own client exactly,
since the KV rank is part of every stored object's identity)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KVRanks:
    world_size: int        # KV world size sent in keys
    worker_id: int         # this rank's KV worker id
    num_kv_readers: int    # read locks a lookup takes per object
    tp_size: int           # KV TP size (the lookup's ignored tp_size argument)
    is_writer: bool        # MLA replicates KV across TP: only one rank stores
    server_index: int      # which of the configured servers this rank talks to


def kv_ranks(*, mla: bool, world_size: int, rank: int, tp_size: int, n_servers: int = 1) -> KVRanks:
    n_servers = max(1, min(n_servers, world_size))
    per_server = max(1, world_size // n_servers)
    server_index = min(rank // per_server, n_servers - 1)
    if mla:
        kv_world = max(1, world_size // tp_size)
        worker = rank // tp_size
        readers = max(1, -(-(tp_size // n_servers) // 1))
        return KVRanks(kv_world, worker, readers, max(1, tp_size // n_servers),
                       rank % tp_size == 0, server_index)
    return KVRanks(per_server, rank % per_server, 1, max(1, tp_size // n_servers), True,
                   server_index)
