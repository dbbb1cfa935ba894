"""Store reports from the workers to the scheduler, riding vLLM's KV-event channel.

A chunk may be announced to cache-aware routers only once every writing worker committed
it. Each store a worker begins is reported once, when it settles (``store_pipeline``), as
``(request_id, start, end, committed)``: ``committed`` holds the chunk indices (relative to
``start``) whose COMMIT_STORE the server confirmed; it is empty for a dropped store. Chunks
the server left out of its PREPARE_STORE reply (already cached, or no room) are not in it.
Workers hand the step's reports to vLLM through ``get_kv_connector_kv_cache_events``; vLLM
merges the workers' batches (``KVOutputAggregator``) and passes them to the scheduler-side
connector in ``update_connector_output``, where
:class:`kvconn_plugin.scheduler.events.OffloadEvents` counts them. Nothing here is published
by vLLM itself: the scheduler side turns complete reports into ``BlockStored`` events.
"""

from __future__ import annotations

import threading

from vllm.distributed.kv_events import KVConnectorKVEvents

from kvconn_plugin.metadata import TransferSpec

# (request_id, start, end, committed chunk indices) of one settled TransferSpec
StoreAck = tuple[str, int, int, tuple[int, ...]]


class StoreAckBatch(KVConnectorKVEvents):
    """The confirmations of one step, merged over workers (each worker's acks once)."""

    def __init__(self, acks: list[StoreAck] | None = None) -> None:
        self._acks: list[StoreAck] = list(acks or ())
        self._workers = 1

    def add_events(self, events: list) -> None:
        self._acks.extend(events)

    def aggregate(self) -> StoreAckBatch:
        return self

    def increment_workers(self, count: int = 1) -> None:
        self._workers += count

    def get_all_events(self) -> list:
        return list(self._acks)

    def get_number_of_workers(self) -> int:
        return self._workers

    def clear_events(self) -> None:
        self._acks.clear()
        self._workers = 1

    def __repr__(self) -> str:
        return f"StoreAckBatch(acks={len(self._acks)}, workers={self._workers})"


class StoreAckRecorder:
    """Worker side: stores settled since the last step (thread-safe; stores settle on the
    I/O and "kvconn-store" threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._acks: list[StoreAck] = []

    def record(self, spec: TransferSpec, committed: tuple[int, ...]) -> None:
        with self._lock:
            self._acks.append((spec.request_id, spec.start, spec.end, tuple(committed)))

    def take(self) -> StoreAckBatch | None:
        with self._lock:
            acks, self._acks = self._acks, []
        return StoreAckBatch(acks) if acks else None
