"""Store confirmations from the workers to the scheduler, riding vLLM's KV-event channel.

A chunk may be announced to cache-aware routers only once every writing worker committed
it. Workers record each committed store as ``(request_id, start, end)`` and hand the batch
to vLLM through ``get_kv_connector_kv_cache_events``; vLLM merges the workers' batches
(``KVOutputAggregator``) and passes them to the scheduler-side connector in
``update_connector_output``, where :class:`kvconn_plugin.scheduler.events.OffloadEvents`
counts them. Nothing here is published by vLLM itself: the scheduler side turns complete
confirmations into ``BlockStored`` events.
"""

from __future__ import annotations

import threading

from vllm.distributed.kv_events import KVConnectorKVEvents

from kvconn_plugin.metadata import TransferSpec

StoreAck = tuple[str, int, int]  # (request_id, start, end) of one committed TransferSpec


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
    """Worker side: stores committed since the last step (thread-safe; stores may finish on
    a background thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._acks: list[StoreAck] = []

    def record(self, spec: TransferSpec) -> None:
        with self._lock:
            self._acks.append((spec.request_id, spec.start, spec.end))

    def take(self) -> StoreAckBatch | None:
        with self._lock:
            acks, self._acks = self._acks, []
        return StoreAckBatch(acks) if acks else None
