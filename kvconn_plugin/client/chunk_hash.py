"""The chunk hashes an LMCache 0.5.6 server gives its objects (its default blake3 scheme).

The server names a chunk by a rolling hash over whole chunks of token ids; its KV-event
stream reports evictions by these hashes only. Computing the same hashes for the chunks we
store is how an eviction is mapped back to the vLLM block hashes we announced for them.
Servers started with another ``--hash-algorithm`` produce other hashes: their evictions
then match nothing (we withdraw nothing, never something wrong).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import blake3

# blake3(int64_be(0) || uint32_be(0)): the seed of every chain (shared/docs protocol §4).
NONE_HASH = blake3.blake3((0).to_bytes(8, "big", signed=True) + struct.pack(">I", 0)).digest()


def chunk_hashes(token_ids: Sequence[int], chunk_size: int, known: list[bytes],
                 end: int | None = None) -> list[bytes]:
    """Extend ``known`` (the hashes of the first ``len(known)`` chunks) to every whole chunk
    of ``token_ids[:end]`` and return it. Callers keep ``known`` per request, so each chunk
    is hashed once however often the request stores."""
    n = min(len(token_ids), len(token_ids) if end is None else end) // chunk_size
    prev = known[-1] if known else NONE_HASH
    fmt = f">{chunk_size}I"
    for i in range(len(known), n):
        chunk = token_ids[i * chunk_size:(i + 1) * chunk_size]
        prev = blake3.blake3(prev + struct.pack(fmt, *chunk)).digest()
        known.append(prev)
    return known
