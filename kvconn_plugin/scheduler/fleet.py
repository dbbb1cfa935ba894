"""Several LMCache servers behind one scheduler (``lmcache.mp.server_urls`` with more than
one URL), with the semantics of LMCache's own scheduler adapter.

Workers are split into contiguous rank blocks, one per server (``parallel.kv_ranks``):
each server holds its ranks' share of every chunk, so a chunk is a hit only where every
server has it. ``ServerFleet`` offers the calls the scheduler adapter makes on a single
``LMCacheClient`` and fans each one out:

* LOOKUP goes to every server and the hit is the minimum over them. The read locks a
  server took beyond that minimum are freed on it right away (FREE_LOOKUP_LOCKS over
  ``[min, its hit)``), so the adapter frees ``[0, min)`` everywhere, as with one server.
* A server whose LOOKUP or QUERY failed while others answered counts as 0 hits: the
  others' locks are freed whole, and a server that may still have acted (a timeout, a
  reply lost in flight) gets FREE_LOOKUP_LOCKS over the whole range, best effort (a
  prefetch still running keeps its locks until the server's read TTL). When every server
  failed, the error goes to the tracker, which recovers as with one server.
* FREE_LOOKUP_LOCKS, END_SESSION and CLEAR go to every server; one that cannot be
  reached does not stop the others.
* Every server must report the same chunk size (``KVConnChunkSizeMismatch`` otherwise:
  the adapter serves without the cache).
* Health is per server: the fleet is ``connected`` only while every server is, so a dead
  server turns lookups into misses at once, and ``ping`` names the servers that are down.

Reply callbacks run on each server's I/O thread; the per-request state is guarded by one
lock, and calls made from a callback are queued for the scheduler's next ``flush``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from kvconn_plugin.client.api import LMCacheClient
from kvconn_plugin.client.protocol import CacheKey, Op
from kvconn_plugin.client.reply_future import ReplyFuture
from kvconn_plugin.config import KVConnConfig
from kvconn_plugin.errors import (
    KVConnChunkSizeMismatch,
    KVConnError,
    KVConnInFlightLost,
    KVConnTimeout,
    KVConnUnavailable,
)

logger = logging.getLogger(__name__)


def scheduler_client(config: KVConnConfig) -> LMCacheClient | ServerFleet:
    """The scheduler's client: one ``LMCacheClient``, or a fleet for several servers."""
    kw: dict[str, Any] = {"control_timeout": config.control_timeout,
                          "transfer_timeout": config.transfer_timeout,
                          "heartbeat": config.heartbeat_interval}
    if len(config.server_urls) == 1:
        return LMCacheClient(config.server_urls[0], defer_wake=True, **kw)
    return ServerFleet(config.server_urls, **kw)


@dataclass(eq=False)
class _Lookup:
    """One request's lookup across the servers."""

    key: CacheKey
    tp_size: int
    hits: dict[int, int] = field(default_factory=dict)  # server -> hit chunks, once known
    failed: dict[int, BaseException] = field(default_factory=dict)  # server -> its error
    # Every server failed: the tracker recovers it and frees the whole range everywhere,
    # so the fleet frees nothing itself.
    recovering: bool = False
    result: int | None = None  # the minimum, once every server answered


class ServerFleet:
    """Clients of several LMCache servers, used like one ``LMCacheClient`` by the
    scheduler adapter.

    Args:
        urls: the servers, in rank-block order.
        control_timeout / transfer_timeout / heartbeat: as for ``LMCacheClient``.
        clients: injected clients (tests); built from ``urls`` otherwise.
    """

    def __init__(
        self,
        urls: Sequence[str],
        *,
        control_timeout: float = 5.0,
        transfer_timeout: float = 30.0,
        heartbeat: float | None = 10.0,
        clients: Sequence[LMCacheClient] | None = None,
    ):
        self.clients = list(clients) if clients is not None else [
            LMCacheClient(u, control_timeout=control_timeout, transfer_timeout=transfer_timeout,
                          defer_wake=True, heartbeat=heartbeat)
            for u in urls
        ]
        self.urls = tuple(c.url for c in self.clients)
        self.url = ", ".join(self.urls)  # for log lines
        self.control_timeout = control_timeout
        self.chunk_size: int | None = None
        self._lookups: dict[str, _Lookup] = {}
        self._lock = threading.Lock()
        self._down: set[int] = set()

    # ------------------------------------------------------------------ connection

    @property
    def connected(self) -> bool:
        return all(c.connected for c in self.clients)

    @property
    def down(self) -> frozenset[str]:
        """URLs of the servers the last ``ping`` found down."""
        return frozenset(self.urls[i] for i in self._down)

    def flush(self) -> None:
        for c in self.clients:
            c.flush()

    def close(self) -> None:
        for c in self.clients:
            c.close()
        with self._lock:
            self._lookups.clear()

    # ------------------------------------------------------------------ management

    def ping(self, instance_id: int | None = None, timeout: float | None = None) -> bool:
        """Ping every server at once; raises ``KVConnUnavailable`` naming those down."""
        t = timeout or self.control_timeout
        replies = self._call_all(Op.PING, instance_id, timeout=t)
        down = {i for i, r in enumerate(replies) if r is not True}
        self._note_down(down)
        if down:
            raise KVConnUnavailable("; ".join(f"{self.urls[i]}: {_why(replies[i])}"
                                              for i in sorted(down)))
        return True

    def get_chunk_size(self, timeout: float | None = None) -> int:
        """The servers' common chunk size; ``KVConnChunkSizeMismatch`` if they differ."""
        t = timeout or self.control_timeout
        replies = self._call_all(Op.GET_CHUNK_SIZE, timeout=t)
        failed = [i for i, r in enumerate(replies) if isinstance(r, BaseException)]
        if failed:
            raise KVConnUnavailable("; ".join(f"{self.urls[i]}: {_why(replies[i])}"
                                              for i in failed))
        sizes = {self.urls[i]: int(r) for i, r in enumerate(replies)}  # type: ignore[call-overload]
        if len(set(sizes.values())) != 1:
            raise KVConnChunkSizeMismatch(
                f"the LMCache servers report different chunk sizes {sizes}; every server "
                "of one engine needs the same --chunk-size")
        self.chunk_size = next(iter(sizes.values()))
        return self.chunk_size

    def clear(self, force: bool = False) -> None:
        """CLEAR every server, waiting at most the control timeout; raises the first
        failure after every server was asked."""
        replies = self._call_all(Op.CLEAR, force, timeout=self.control_timeout)
        errors = [r for r in replies if isinstance(r, BaseException)]
        if errors:
            raise errors[0] if isinstance(errors[0], KVConnError) else KVConnError(errors[0])

    def clear_async(self, force: bool = False) -> ReplyFuture:
        return self._gather(self._each(lambda c: c.clear_async(force)))

    def _call_all(self, op: Op, *args: object, timeout: float) -> list[object]:
        """One call per server at once; each reply, or the error it ended with."""
        futs = []
        for c in self.clients:
            try:
                futs.append(c.transport.submit(op, *args, timeout=timeout))
            except KVConnError as exc:
                futs.append(_failed(exc))
        deadline = time.monotonic() + timeout + 1.0
        out: list[object] = []
        for f in futs:
            try:
                out.append(f.result(timeout=max(0.0, deadline - time.monotonic())))
            except TimeoutError as exc:
                out.append(exc if isinstance(exc, KVConnError) else KVConnTimeout(str(exc)))
            except Exception as exc:
                out.append(exc)
        return out

    def _note_down(self, down: set[int]) -> None:
        for i in sorted(down - self._down):
            logger.warning("kvconn: LMCache server %s (%d of %d) is down; lookups are misses "
                           "until it is back", self.urls[i], i + 1, len(self.urls))
        for i in sorted(self._down - down):
            logger.info("kvconn: LMCache server %s (%d of %d) is back", self.urls[i], i + 1,
                        len(self.urls))
        self._down = down

    # ------------------------------------------------------------------ lookups

    def lookup_async(
        self, key: CacheKey, tp_size: int = 1, timeout: float | None = None,
        wait_for_peer: bool = False,
    ) -> ReplyFuture:
        """LOOKUP on every server; resolves (to None) once each server acked or failed.
        Fails at once, like one client, when no server could be asked."""
        st = _Lookup(key, tp_size)
        with self._lock:
            self._lookups[key.request_id] = st
        futs = self._each(lambda c: c.lookup_async(key, tp_size, timeout=timeout,
                                                   wait_for_peer=wait_for_peer))
        if all(f.done() and f.exception() is not None for f in futs):
            with self._lock:
                self._lookups.pop(key.request_id, None)
            futs[0].result()  # raises: nothing reached any server
        return _all_settled(futs, lambda fs: self._acked(st, fs))

    def _acked(self, st: _Lookup, futs: list[ReplyFuture]) -> None:
        errors = {i: e for i, f in enumerate(futs) if (e := f.exception()) is not None}
        with self._lock:
            st.failed.update(errors)
            if len(errors) == len(futs):
                st.recovering = True
        if len(errors) == len(futs):
            raise _pick(errors.values())

    def query_prefetch_status_async(
        self, request_id: str, timeout: float | None = None, wait_for_peer: bool = False,
        wake: bool | None = None,
    ) -> ReplyFuture:
        """QUERY the servers whose result is not in yet; resolves to None while any
        still prefetches, else to the minimum hit (see the module docstring)."""
        n = len(self.clients)
        with self._lock:
            st = self._lookups.get(request_id)
            if st is None:
                ask = list(range(n))
            else:
                if st.recovering:  # the tracker's recovery query: ask those that may have acted
                    for i in [i for i, e in st.failed.items() if _maybe_acted(e)]:
                        del st.failed[i]
                ask = [i for i in range(n) if i not in st.hits and i not in st.failed]
        futs = []
        for i in ask:
            try:
                futs.append(self.clients[i].query_prefetch_status_async(
                    request_id, timeout=timeout, wait_for_peer=wait_for_peer, wake=wake))
            except KVConnError as exc:
                futs.append(_failed(exc))
        if st is None:
            return _all_settled(futs, _plain_min)
        return _all_settled(futs, lambda fs: self._queried(st, ask, fs))

    def _queried(self, st: _Lookup, ask: list[int], futs: list[ReplyFuture]) -> int | None:
        n = len(self.clients)
        with self._lock:
            for i, f in zip(ask, futs, strict=True):
                exc = f.exception()
                if exc is not None:
                    st.failed[i] = exc
                elif (hit := f.result()) is not None:
                    st.hits[i] = int(hit)
            if len(st.hits) + len(st.failed) < n:
                return None  # someone still prefetching: the tracker asks again
            if not st.hits:
                st.recovering = True  # the tracker recovers and frees the whole range
                raise _pick(st.failed.values())
            if st.recovering:
                return min(st.hits.values())  # the tracker drops it and frees everything
            if st.result is not None:
                return st.result
            st.result = 0 if st.failed else min(st.hits.values())
            frees = self._surplus(st, st.result)
        if frees:
            logger.debug("kvconn: lookup %s: hits %s, failed %s; freeing the surplus on %s",
                         st.key.request_id, st.hits, list(st.failed), [i for i, _ in frees])
        for i, key in frees:
            with contextlib.suppress(KVConnError):  # that server is gone, its locks with it
                self.clients[i].free_lookup_locks_async(key, st.tp_size)
        return st.result

    def _surplus(self, st: _Lookup, low: int) -> list[tuple[int, CacheKey]]:
        """FREE_LOOKUP_LOCKS keys for the locks the servers took beyond ``low`` chunks."""
        chunk, end = self.chunk_size, st.key.end
        out = []
        for i, hit in st.hits.items():
            if hit > low and chunk:
                start, stop = low * chunk, min(hit * chunk, end)
                if start < stop:
                    out.append((i, msgspec.structs.replace(st.key, start=start, end=stop)))
        for i, exc in st.failed.items():
            if _maybe_acted(exc) and end > 0:
                out.append((i, msgspec.structs.replace(st.key, start=0, end=end)))
        return out

    def free_lookup_locks_async(self, key: CacheKey, tp_size: int = 1) -> ReplyFuture:
        return self._gather(self._each(lambda c: c.free_lookup_locks_async(key, tp_size)),
                            raise_first=True)

    def resend_unsent_frees(self) -> None:
        for c in self.clients:
            c.resend_unsent_frees()

    def end_session_async(self, request_id: str) -> ReplyFuture:
        with self._lock:
            self._lookups.pop(request_id, None)
        return self._gather(self._each(lambda c: c.end_session_async(request_id)),
                            raise_first=True)

    # ------------------------------------------------------------------ helpers

    def _each(self, call: Callable[[LMCacheClient], ReplyFuture]) -> list[ReplyFuture]:
        """``call`` on every client; a client that refuses at once yields a failed future."""
        futs = []
        for c in self.clients:
            try:
                futs.append(call(c))
            except KVConnError as exc:
                futs.append(_failed(exc))
        return futs

    @staticmethod
    def _gather(futs: list[ReplyFuture], raise_first: bool = False) -> ReplyFuture:
        """One future for the calls; with ``raise_first``, the first call refused at once
        is raised here, after every server was asked (the adapter reports it)."""
        if raise_first:
            for f in futs:
                if f.done() and (exc := f.exception()) is not None:
                    raise exc
        return _all_settled(futs, _first_error)


def _all_settled(futs: list[ReplyFuture],
                 combine: Callable[[list[ReplyFuture]], Any]) -> ReplyFuture:
    """A future settled with ``combine(futs)`` (or its error) once all ``futs`` are."""
    out = ReplyFuture()
    left = [len(futs)]
    lock = threading.Lock()

    def settle() -> None:
        try:
            out.set_result(combine(futs))
        except Exception as exc:
            out.set_exception(exc)

    def one(_f: ReplyFuture) -> None:
        with lock:
            left[0] -= 1
            if left[0]:
                return
        settle()

    if not futs:
        settle()
    for f in futs:
        f.add_done_callback(one)
    return out


def _plain_min(futs: list[ReplyFuture]) -> int | None:
    hits = [f.result() for f in futs]  # raises the first error
    if any(h is None for h in hits):
        return None
    return min((int(h) for h in hits), default=0)


def _first_error(futs: list[ReplyFuture]) -> None:
    for f in futs:
        f.result()


def _failed(exc: BaseException) -> ReplyFuture:
    fut = ReplyFuture()
    fut.set_exception(exc)
    return fut


def _maybe_acted(exc: BaseException) -> bool:
    """The call may have reached the server (its outcome is unknown)."""
    return isinstance(exc, (KVConnTimeout, KVConnInFlightLost))


def _pick(errors: Iterable[BaseException]) -> BaseException:
    """The error to hand the tracker: one whose outcome is unknown first (it recovers
    those), else the first."""
    errors = list(errors)
    return next((e for e in errors if _maybe_acted(e)), errors[0])


def _why(reply: object) -> str:
    if isinstance(reply, BaseException):
        return str(reply) or type(reply).__name__
    return repr(reply)
