"""FREE_LOOKUP_LOCKS that never reached the server are sent again; those that may have
reached it are not, and are noted.

LMCache 0.5.6 releases a session's lookup locks on every FREE_LOOKUP_LOCKS it gets, and
read locks are anonymous counts per object: a second FREE after one that was applied would
release another request's locks on the same chunks (whose load could then meet an object
being evicted). So a FREE is sent again only when it surely did not arrive:

* no connection to send it on (the transport failed it before sending): kept, and sent
  once the server answers again, if that is within ``RESEND_WINDOW_S`` of the first try
  (far inside the 300 s read TTL: after the TTL ended the locks, a FREE would release
  someone else's);
* sent, with its reply lost (no reply in time, or the connection dropped with it in
  flight): not sent again. The server may keep those chunks read-locked until its read
  TTL; each such FREE is logged with its token count.

An END_SESSION never overtakes a FREE of its session: LMCache forgets the lookup result
with the session, and a FREE arriving after it releases nothing. So the END waits until
every FREE of the session is settled (answered, lost in flight, or kept and then resent).
Queued side by side while the server is away, a FREE expiring unsent just before the
server comes back would otherwise leave the END to go out first.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable

from kvconn_plugin.client.protocol import CacheKey
from kvconn_plugin.client.reply_future import ReplyFuture
from kvconn_plugin.errors import (
    KVConnClosed,
    KVConnError,
    KVConnInFlightLost,
    KVConnUnavailable,
)

logger = logging.getLogger(__name__)

RESEND_WINDOW_S = 60.0
MAX_KEPT = 1024  # sessions; past this the oldest are left to the read TTL


class LockFrees:
    def __init__(self, submit_free: Callable[[CacheKey, int], ReplyFuture],
                 submit_end: Callable[[str], ReplyFuture]):
        self._submit_free = submit_free
        self._submit_end = submit_end
        self._lock = threading.Lock()
        # session id -> [(key, tp_size, first try)], in sending order
        self._unsent: dict[str, list[tuple[CacheKey, int, float]]] = {}
        self._open: dict[str, int] = {}  # session id -> FREEs submitted, not settled
        self._ends: set[str] = set()  # END_SESSIONs waiting behind a FREE
        self.lost_replies = 0

    def free(self, key: CacheKey, tp_size: int, first_try: float | None = None) -> ReplyFuture:
        first_try = time.monotonic() if first_try is None else first_try
        sid = key.request_id
        with self._lock:
            self._open[sid] = self._open.get(sid, 0) + 1
        try:
            fut = self._submit_free(key, tp_size)
        except KVConnUnavailable as exc:
            # refused before sending: kept unless we are closing
            self._settle(sid, None if isinstance(exc, KVConnClosed) else (key, tp_size, first_try))
            raise
        except BaseException:
            self._settle(sid, None)  # never sent; an END behind it must not wait forever
            raise
        fut.add_done_callback(lambda f: self._settled(f, key, tp_size, first_try))
        return fut

    def end_session(self, session_id: str) -> ReplyFuture:
        with self._lock:
            if session_id in self._unsent or self._open.get(session_id):
                self._ends.add(session_id)
                done = ReplyFuture()
                done.set_result(None)
                return done
        return self._submit_end(session_id)

    def pending(self) -> int:
        with self._lock:
            return len(self._unsent)

    def resend(self) -> None:
        """Send the kept FREEs (and the END_SESSIONs behind them); call while connected."""
        with self._lock:
            kept, self._unsent = self._unsent, {}
            ends = self._ends & kept.keys()
            self._ends -= ends
        now = time.monotonic()
        for sid, entries in kept.items():
            for key, tp_size, first_try in entries:
                if now - first_try > RESEND_WINDOW_S:
                    logger.info("kvconn: FREE_LOOKUP_LOCKS of %s never reached the server; "
                                "its read locks are left to the server's read TTL", sid)
                    continue
                with contextlib.suppress(KVConnError):  # kept again, or we are closing
                    self.free(key, tp_size, first_try)
            if sid in ends:
                with contextlib.suppress(KVConnError):
                    self.end_session(sid)

    def _settle(self, sid: str, keep: tuple[CacheKey, int, float] | None) -> None:
        """One FREE of ``sid`` is settled; ``keep`` it for a resend if it never left."""
        with self._lock:
            left = self._open.get(sid, 1) - 1
            if left > 0:
                self._open[sid] = left
            else:
                self._open.pop(sid, None)
            if keep is not None:
                if sid not in self._unsent and len(self._unsent) >= MAX_KEPT:
                    dropped = next(iter(self._unsent))
                    del self._unsent[dropped]
                    self._ends.discard(dropped)  # its session is left to the server's TTL
                self._unsent.setdefault(sid, []).append(keep)
            release_end = left <= 0 and sid not in self._unsent and sid in self._ends
            if release_end:
                self._ends.discard(sid)
        if release_end:
            with contextlib.suppress(KVConnError):  # the server's session TTL ends it
                self._submit_end(sid)

    def _settled(self, f: ReplyFuture, key: CacheKey, tp_size: int, first_try: float) -> None:
        exc = None if f.cancelled() else f.exception()
        if exc is None or isinstance(exc, KVConnClosed):
            self._settle(key.request_id, None)
            return
        if isinstance(exc, KVConnUnavailable) and not isinstance(exc, KVConnInFlightLost):
            self._settle(key.request_id, (key, tp_size, first_try))
            return
        self._settle(key.request_id, None)
        self.lost_replies += 1
        logger.info("kvconn: FREE_LOOKUP_LOCKS of %s lost its reply (%s); the server may keep "
                    "%d token(s) read-locked until its read TTL", key.request_id, exc,
                    key.end - key.start)
