"""Typed calls of the LMCache MP server, one method per operation we use.

Blocking methods wait at most their timeout; ``*_async`` methods return a ``ReplyFuture`` and
never block, for the scheduler step. Control calls default to a short timeout (seconds);
transfers get their own, longer one.
"""

from __future__ import annotations

import time
import uuid

from kvconn_plugin.client.lock_frees import LockFrees
from kvconn_plugin.client.protocol import (
    BlockAllocationRecord,
    CacheKey,
    Op,
    PrepareRetrieveReply,
    PrepareStoreReply,
    RegisterEngineDrivenPayload,
    RegisterEngineDrivenReply,
)
from kvconn_plugin.client.reply_future import ReplyFuture
from kvconn_plugin.client.transport import MQTransport, wait
from kvconn_plugin.errors import KVConnProtocolError, KVConnTimeout

DEFAULT_CONTROL_TIMEOUT = 5.0
DEFAULT_TRANSFER_TIMEOUT = 30.0


def new_instance_id() -> int:
    """A random 63-bit worker instance id, as LMCache expects (never the PID)."""
    return uuid.uuid4().int & (2**63 - 1)


class LMCacheClient:
    """Client of one LMCache MP server.

    Args:
        url: server address, e.g. ``tcp://localhost:5555``.
        control_timeout: deadline for control calls (ping, lookup ack, register...).
        transfer_timeout: deadline for prepare/commit of stores and retrieves.
        transport: injected transport (tests); built from ``url`` otherwise.
    """

    def __init__(
        self,
        url: str,
        *,
        control_timeout: float = DEFAULT_CONTROL_TIMEOUT,
        transfer_timeout: float = DEFAULT_TRANSFER_TIMEOUT,
        transport: MQTransport | None = None,
        defer_wake: bool = False,
        heartbeat: float | None = 10.0,
    ):
        self.transport = transport or MQTransport(url, timeout=control_timeout,
                                                  heartbeat=heartbeat)
        self.url = self.transport.url
        self.control_timeout = control_timeout
        self.transfer_timeout = transfer_timeout
        # Async calls stay queued until flush() (one I/O wake-up per scheduler step).
        self._wake = not defer_wake
        self._frees = LockFrees(
            lambda key, tp: self.transport.submit(Op.FREE_LOOKUP_LOCKS, key, tp,
                                                  timeout=control_timeout, wake=self._wake),
            lambda rid: self.transport.submit(Op.END_SESSION, rid, timeout=control_timeout,
                                              wake=self._wake))

    def close(self) -> None:
        self.transport.close()

    def abort_in_flight(self, reason: str) -> int:
        """Fail the calls waiting on replies now (see ``MQTransport.abort_in_flight``)."""
        return self.transport.abort_in_flight(reason)

    def flush(self) -> None:
        """Send what ``*_async`` calls queued under ``defer_wake``."""
        self.transport.flush()

    @property
    def connected(self) -> bool:
        """Whether a connection to the server is up now."""
        return self.transport.connected

    def __enter__(self) -> LMCacheClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, op: Op, *args: object, timeout: float | None = None) -> object:
        return self.transport.call(op, *args, timeout=timeout or self.control_timeout)

    # ------------------------------------------------------------------ management

    def get_chunk_size(self, timeout: float | None = None) -> int:
        return int(self._call(Op.GET_CHUNK_SIZE, timeout=timeout))  # type: ignore[arg-type]

    def get_experimental(self, timeout: float | None = None) -> list[str]:
        return list(self._call(Op.GET_EXPERIMENTAL, timeout=timeout))  # type: ignore[call-overload]

    def ping(self, instance_id: int | None = None, timeout: float | None = None) -> bool:
        ok = self._call(Op.PING, instance_id, timeout=timeout)
        if ok is not True:
            raise KVConnProtocolError(f"ping returned {ok!r}")
        return True

    def ping_async(
        self, instance_id: int | None = None, timeout: float | None = None
    ) -> ReplyFuture:
        return self.transport.submit(
            Op.PING, instance_id, timeout=timeout or self.control_timeout, wake=self._wake
        )

    def clear(self, force: bool = False) -> None:
        self._call(Op.CLEAR, force)

    def clear_async(self, force: bool = False) -> ReplyFuture:
        return self.transport.submit(Op.CLEAR, force, timeout=self.control_timeout,
                                     wake=self._wake)

    # ------------------------------------------------------------------ scheduler side

    def lookup_async(
        self, key: CacheKey, tp_size: int = 1, timeout: float | None = None,
        wait_for_peer: bool = False,
    ) -> ReplyFuture:
        """Send LOOKUP; the future resolves (to ``None``) when the server acknowledged it.

        By default it fails at once while no connection is up: a request is waiting."""
        return self.transport.submit(
            Op.LOOKUP, key, tp_size, timeout=timeout or self.control_timeout, wake=self._wake,
            wait_for_peer=wait_for_peer,
        )

    def query_prefetch_status_async(
        self, request_id: str, timeout: float | None = None, wait_for_peer: bool = False,
        wake: bool | None = None,
    ) -> ReplyFuture:
        """Future of the hit count in chunks, or ``None`` while the server still prefetches.

        The server reports a result exactly once; a second query answers 0. ``wake=True``
        sends it now even under ``defer_wake`` (from the I/O thread's ack callback).
        """
        return self.transport.submit(
            Op.QUERY_PREFETCH_STATUS, request_id, timeout=timeout or self.control_timeout,
            wake=self._wake if wake is None else wake, wait_for_peer=wait_for_peer,
        )

    def free_lookup_locks_async(self, key: CacheKey, tp_size: int = 1) -> ReplyFuture:
        """Sent again later if it never left (see ``LockFrees``), never if it may have."""
        return self._frees.free(key, tp_size)

    def end_session_async(self, request_id: str) -> ReplyFuture:
        """Held behind an unsent FREE_LOOKUP_LOCKS of the same session."""
        return self._frees.end_session(request_id)

    def resend_unsent_frees(self) -> None:
        """Send the FREE_LOOKUP_LOCKS that found no connection, once there is one."""
        if self._frees.pending() and self.connected:
            self._frees.resend()

    def report_block_allocation_async(
        self, instance_id: int, model_name: str, records: list[BlockAllocationRecord]
    ) -> ReplyFuture:
        return self.transport.submit(
            Op.REPORT_BLOCK_ALLOCATION, instance_id, model_name, records,
            timeout=self.control_timeout,
        )

    def lookup(
        self, key: CacheKey, poll_interval: float = 0.001, timeout: float | None = None
    ) -> int:
        """Blocking LOOKUP + QUERY until a result arrives; returns hit chunks (tools/tests).

        ``timeout`` bounds the whole exchange, and each request gets the time that is left
        (not the shorter control timeout).
        """
        budget = timeout or self.control_timeout
        deadline = time.monotonic() + budget
        wait(self.lookup_async(key, timeout=budget, wait_for_peer=True), Op.LOOKUP, budget)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise KVConnTimeout(f"lookup of {key.request_id} still prefetching after {budget}s")
            hit = wait(self.query_prefetch_status_async(key.request_id, timeout=left,
                                                        wait_for_peer=True),
                       Op.QUERY_PREFETCH_STATUS, left)
            if hit is not None:
                return int(hit)
            time.sleep(poll_interval)

    def free_lookup_locks(self, key: CacheKey, tp_size: int = 1) -> None:
        wait(self.free_lookup_locks_async(key, tp_size), Op.FREE_LOOKUP_LOCKS, self.control_timeout)

    def end_session(self, request_id: str) -> None:
        wait(self.end_session_async(request_id), Op.END_SESSION, self.control_timeout)

    # ------------------------------------------------------------------ worker side

    def register_engine_driven(
        self, payload: RegisterEngineDrivenPayload, timeout: float | None = None
    ) -> RegisterEngineDrivenReply:
        return self._call(Op.REGISTER_ENGINE_DRIVEN, payload, timeout=timeout)  # type: ignore[return-value]

    def unregister_engine_driven(self, instance_id: int, timeout: float | None = None) -> None:
        self._call(Op.UNREGISTER_ENGINE_DRIVEN, instance_id, timeout=timeout)

    # Transfers fail at once while no connection is up (``wait_for_peer=False``): the engine
    # or a waiting request is behind each of them, and a reservation or read lock taken on a
    # server that came back in between would belong to its previous incarnation anyway.

    def _transfer(self, op: Op, *args: object, wait_for_peer: bool = False) -> ReplyFuture:
        return self.transport.submit(op, *args, timeout=self.transfer_timeout,
                                     wait_for_peer=wait_for_peer)

    def prepare_store_async(self, key: CacheKey, instance_id: int) -> ReplyFuture:
        return self._transfer(Op.PREPARE_STORE, key, instance_id)

    def commit_store_async(self, key: CacheKey, instance_id: int, data: bytes = b"") -> ReplyFuture:
        return self._transfer(Op.COMMIT_STORE, key, instance_id, data)

    def prepare_retrieve_async(self, key: CacheKey, instance_id: int) -> ReplyFuture:
        return self._transfer(Op.PREPARE_RETRIEVE, key, instance_id)

    def commit_retrieve_async(self, key: CacheKey, instance_id: int) -> ReplyFuture:
        return self._transfer(Op.COMMIT_RETRIEVE, key, instance_id)

    def _within(self, op: Op, timeout: float, *args: object) -> object:
        """``op`` waited for up to ``timeout`` (fails at once with no connection): the
        heartbeat's settling calls, which must never hold it longer."""
        fut = self.transport.submit(op, *args, timeout=timeout, wait_for_peer=False)
        return wait(fut, op, timeout)

    def prepare_retrieve_within(self, key: CacheKey, instance_id: int,
                                timeout: float) -> PrepareRetrieveReply:
        return self._within(Op.PREPARE_RETRIEVE, timeout, key, instance_id)  # type: ignore[return-value]

    def commit_retrieve_within(self, key: CacheKey, instance_id: int, timeout: float) -> bool:
        return bool(self._within(Op.COMMIT_RETRIEVE, timeout, key, instance_id))

    def commit_store_within(self, key: CacheKey, instance_id: int, timeout: float) -> bool:
        """An SHM COMMIT_STORE; True when the server had the reservation and committed it."""
        return bool(self._within(Op.COMMIT_STORE, timeout, key, instance_id, b""))

    # Blocking forms (tools, tests, benchmarks): like every blocking call, they wait for a
    # connection until their deadline.

    def _blocking(self, op: Op, *args: object) -> object:
        return wait(self._transfer(op, *args, wait_for_peer=True), op, self.transfer_timeout)

    def prepare_store(self, key: CacheKey, instance_id: int) -> PrepareStoreReply:
        return self._blocking(Op.PREPARE_STORE, key, instance_id)  # type: ignore[return-value]

    def commit_store(self, key: CacheKey, instance_id: int, data: bytes = b"") -> bool:
        return bool(self._blocking(Op.COMMIT_STORE, key, instance_id, data))

    def prepare_retrieve(self, key: CacheKey, instance_id: int) -> PrepareRetrieveReply:
        return self._blocking(Op.PREPARE_RETRIEVE, key, instance_id)  # type: ignore[return-value]

    def commit_retrieve(self, key: CacheKey, instance_id: int) -> bool:
        return bool(self._blocking(Op.COMMIT_RETRIEVE, key, instance_id))
