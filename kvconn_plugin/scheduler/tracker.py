"""Per-request state on the scheduler side: the asynchronous lookup and what it locked.

A lookup is LOOKUP (the server acks, taking read locks on the hit chunks) followed by
QUERY_PREFETCH_STATUS polls until the server reports the hit in chunks. The result is
handed out exactly once by the server, so the tracker keeps it. Nothing here blocks: the
futures are only inspected.

A call that timed out (or whose connection dropped after sending) may still have been
carried out: an overloaded server answers a LOOKUP late and locks chunks nobody frees for
the read TTL (300 s), pinning its memory. Such a lookup counts as a miss but is *recovered*:
one more QUERY tells when the server's prefetch is over, after which FREE_LOOKUP_LOCKS
over the whole range releases exactly what that request's prefetch locked (the server
keeps the result in the request's session).
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from kvconn_plugin.client.reply_future import ReplyFuture
from kvconn_plugin.errors import (
    KVConnClosed,
    KVConnInFlightLost,
    KVConnTimeout,
    KVConnUnavailable,
)

# Recovery QUERYs for one lookup whose outcome is unknown, and how long they may go on
# (from the LOOKUP). Past either, the locks are freed whole at once, or left to the read TTL.
MAX_RECOVERY_QUERIES = 3
RECOVERY_WINDOW_S = 30.0


class LookupState(enum.Enum):
    IDLE = "idle"            # no lookup sent (cache unavailable or nothing to look up)
    WAIT_ACK = "wait_ack"    # LOOKUP sent, waiting for the ack
    QUERYING = "querying"    # QUERY_PREFETCH_STATUS in flight
    DONE = "done"            # hit known
    FAILED = "failed"        # error or timeout: counts as a miss


@dataclass(eq=False, slots=True)
class RequestTracker:
    request_id: str
    request: Any  # vllm Request; kept for token ids and progress
    cache_salt: str
    # Lookups of this request before this one (one per preemption): see ``session_id``.
    generation: int = 0
    state: LookupState = LookupState.IDLE
    lookup_end: int = 0            # tokens covered by the LOOKUP key
    lookup_future: ReplyFuture | None = None
    query_future: ReplyFuture | None = None
    started_at: float = field(default_factory=time.monotonic)
    hit_chunks: int = 0
    locks_settled: bool = False
    # None until vLLM allocated (or finished) the request; then the first token we load
    # from, or -1 when nothing is loaded. Decides which locks to free.
    load_from: int | None = None
    loading: bool = False          # a load was handed to the workers and not yet reported
    load_blocks: frozenset[int] = frozenset()  # blocks that load writes (to spot its errors)
    # The load failed: this request is never offered a hit again (it would fail the same way).
    load_failed: bool = False
    stored_end: int = 0            # tokens already stored (or known cached), chunk aligned
    # Scheduled tokens until the next store check; 0 means check exactly at the next step.
    store_countdown: int = 0
    # The server may have locked chunks we never heard about (see the module docstring).
    outcome_unknown: bool = False
    recovery_queries: int = 0

    @property
    def session_id(self) -> str:
        """The server-side id of this lookup. The server keeps one prefetch job per id,
        so a lookup after a preemption, sent while the previous one's result is unread,
        would orphan that one's read locks (and could take its result) under the same id."""
        return self.request_id if not self.generation else f"{self.request_id}~{self.generation}"

    def resumed(self) -> RequestTracker:
        """The tracker of this request after a preemption: a fresh lookup under its own
        session id, keeping what is known to be stored and whether a load failed."""
        fresh = RequestTracker(self.request_id, self.request, self.cache_salt,
                               generation=self.generation + 1)
        fresh.stored_end = self.stored_end
        fresh.load_failed = self.load_failed
        return fresh

    def on_ack(self, fut: ReplyFuture, submit_query) -> None:
        """LOOKUP acknowledged (runs on the client's I/O thread): ask for the result right
        away instead of a scheduler step later. The only place the first QUERY is sent,
        so it can never be sent twice (a second QUERY would consume the result)."""
        if fut.cancelled():
            self.state = LookupState.FAILED
            return
        exc = fut.exception()
        if exc is not None and not self._start_recovery(exc):
            self.state = LookupState.FAILED
            return
        try:
            self.query_future = submit_query(self.session_id)
        except Exception:  # closed client: count as a miss
            self.state = LookupState.FAILED
            return
        self.state = LookupState.QUERYING  # after query_future is set: readers check state

    def _start_recovery(self, exc: BaseException) -> bool:
        """After a failed call: whether to send a recovery QUERY (the server may have acted)."""
        if isinstance(exc, (KVConnTimeout, KVConnInFlightLost)):
            self.outcome_unknown = True
            self.recovery_queries += 1
            return (self.recovery_queries <= MAX_RECOVERY_QUERIES
                    or self._within_recovery_window())
        if (self.outcome_unknown and isinstance(exc, KVConnUnavailable)
                and not isinstance(exc, KVConnClosed)):
            # A recovery QUERY found no connection (a stopped or restarting server): the
            # LOOKUP may still be carried out when it resumes, and a FREE sent before its
            # prefetch is over releases nothing. Keep asking until the window closes.
            return self._within_recovery_window()
        return False  # never reached the server, or we are closing

    def _within_recovery_window(self) -> bool:
        return time.monotonic() - self.started_at < RECOVERY_WINDOW_S

    def advance(self, submit_query) -> None:
        """Move the lookup along without waiting; ``submit_query(rid)`` returns a ReplyFuture."""
        if self.state is LookupState.QUERYING and self.query_future is not None:
            if not self.query_future.done():
                return
            exc = self.query_future.exception()
            if exc is not None:
                if self._start_recovery(exc):
                    self.query_future = submit_query(self.session_id)
                else:
                    self.state = LookupState.FAILED
                return
            result = self.query_future.result()
            if result is None:  # server still prefetching: ask again next time
                self.query_future = submit_query(self.session_id)
                return
            if self.outcome_unknown:
                # Prefetch over; its count may have gone to a reply we dropped (a second
                # QUERY answers 0), so it is no basis for a load. The locks are freed whole.
                self.state = LookupState.FAILED
                return
            self.hit_chunks = int(result)
            self.state = LookupState.DONE

    def hit_end(self, chunk: int) -> int:
        """End of the hit, in tokens: the lookup's read locks cover [0, hit_end) until they
        are loaded, freed, or the server's TTL ends them."""
        return min(self.hit_chunks * chunk, self.lookup_end)

    def timed_out(self, now: float, timeout: float) -> bool:
        """A lookup this old is treated as a miss for scheduling. It keeps advancing so
        that the locks it may still take are freed once its result is known."""
        return self.in_flight and now - self.started_at > timeout

    @property
    def in_flight(self) -> bool:
        return self.state in (LookupState.WAIT_ACK, LookupState.QUERYING)
