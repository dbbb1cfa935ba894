"""What the scheduler tells the workers each step (pickled by vLLM across processes)."""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata


@dataclass(frozen=True, slots=True)
class TransferSpec:
    """One store or retrieve of whole LMCache chunks ``[start, end)`` of a request.

    ``token_ids`` holds the request's tokens up to ``end`` (the server hashes the full
    prefix). ``block_ids`` are the vLLM blocks covering ``[start, end)`` in order.
    ``skip_blocks`` (retrieves only) leading blocks are vLLM's own prefix-cache hit and
    must not be written: other requests may be reading them.
    """

    request_id: str
    token_ids: tuple[int, ...]
    start: int
    end: int
    block_ids: tuple[int, ...]
    cache_salt: str = ""
    skip_blocks: int = 0
    # Block ids of the other KV cache groups of a hybrid model, as long as ``block_ids``
    # (a sliding-window group's skipped prefix is vLLM's null block, 0).
    other_groups: tuple[tuple[int, ...], ...] = ()
    # The server session of the lookup that locked a retrieve's chunks, when it is not
    # the request id (a lookup after a preemption; a multi-L1 server reads the locks'
    # owners from that session).
    session_id: str = ""

    @property
    def server_request_id(self) -> str:
        return self.session_id or self.request_id

    def group_block_ids(self) -> tuple[tuple[int, ...], ...]:
        return (self.block_ids, *self.other_groups)


@dataclass
class KVConnMetadata(KVConnectorMetadata):
    loads: list[TransferSpec] = field(default_factory=list)
    stores: list[TransferSpec] = field(default_factory=list)
