"""FREE_LOOKUP_LOCKS that never reached the server are sent again; those that may have
reached it are not, and are noted.

LMCache 0.5.6 releases a session's lookup locks on every FREE_LOOKUP_LOCKS it gets, and
read locks are anonymous counts per object: a second FREE after one that was applied would
release another request's locks on the same chunks (whose load could then meet an object
being evicted). So a FREE is sent again only when it surely did not arrive:

* no connection to send it on (the transport failed it before sending): kept, and sent
  once the server answers again, if that is within ``RESEND_WINDOW_S`` of the first try
  (far inside the 300 s read TTL: after the TTL ended the locks, a FREE would release
  someone else's). An END_SESSION of that session waits behind it, because an ended
  session has no lookup result left to release from;
* sent, with its reply lost (no reply in time, or the connection dropped with it in
  flight): not sent again. The server may keep those chunks read-locked until its read
  TTL; each such FREE is logged with its token count.
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
        self._ends: set[str] = set()  # END_SESSIONs waiting behind an unsent FREE
        self.lost_replies = 0

    def free(self, key: CacheKey, tp_size: int, first_try: float | None = None) -> ReplyFuture:
        first_try = time.monotonic() if first_try is None else first_try
        try:
            fut = self._submit_free(key, tp_size)
        except KVConnUnavailable as exc:
            if not isinstance(exc, KVConnClosed):
                self._keep(key, tp_size, first_try)  # refused before sending
            raise
        fut.add_done_callback(lambda f: self._settled(f, key, tp_size, first_try))
        return fut

    def end_session(self, session_id: str) -> ReplyFuture:
        with self._lock:
            if session_id in self._unsent:
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
            ends, self._ends = self._ends, set()
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

    def _keep(self, key: CacheKey, tp_size: int, first_try: float) -> None:
        with self._lock:
            if key.request_id not in self._unsent and len(self._unsent) >= MAX_KEPT:
                self._unsent.pop(next(iter(self._unsent)))
            self._unsent.setdefault(key.request_id, []).append((key, tp_size, first_try))

    def _settled(self, f: ReplyFuture, key: CacheKey, tp_size: int, first_try: float) -> None:
        exc = None if f.cancelled() else f.exception()
        if exc is None or isinstance(exc, KVConnClosed):
            return
        if isinstance(exc, KVConnUnavailable) and not isinstance(exc, KVConnInFlightLost):
            self._keep(key, tp_size, first_try)
            return
        self.lost_replies += 1
        logger.info("kvconn: FREE_LOOKUP_LOCKS of %s lost its reply (%s); the server may keep "
                    "%d token(s) read-locked until its read TTL", key.request_id, exc,
                    key.end - key.start)
