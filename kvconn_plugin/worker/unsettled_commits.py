"""Store reservations whose COMMIT_STORE may never have reached the server, committed again
once it answers.

A PREPARE_STORE write-reserves the chunks' objects until COMMIT_STORE or the server's write
TTL (600 s), and LMCache 0.5.6 has no way to cancel a reservation. When a COMMIT_STORE
times out, or the connection drops (or the heartbeat aborts it) with it in flight, we cannot
tell whether the server applied it; when there was no connection to send it on, it surely
did not. Sending it again is safe either way, because the server
keeps the reservation under (instance, key) and a COMMIT_STORE pops it:

* the first one was lost: the slots still hold the bytes we copied (only we write them),
  so the retry publishes exactly those objects and frees the write locks;
* it was applied, or the server restarted: nothing is pending under that key, and the
  retry is answered False with no effect.

The one unsafe case is a newer PREPARE_STORE of the same key: its fresh reservation (not yet
written) would be what the retry commits. ``forget`` is called before every PREPARE_STORE,
so a key being stored again is never retried. Only SHM commits (empty payload) are retried;
a pickled commit carries the bytes and is not kept.
"""

from __future__ import annotations

import logging
import threading
from collections import deque

from kvconn_plugin.client.protocol import CacheKey
from kvconn_plugin.errors import KVConnClosed, KVConnError

logger = logging.getLogger(__name__)

# Past this many pending keys the oldest are left to the server's write TTL.
MAX_PENDING = 256
# Attempts per key (each bounded by the caller's timeout) before the TTL is left to it.
MAX_ATTEMPTS = 3
# Keys committed per call, so one heartbeat never runs long.
PER_CALL = 8


def _ident(key: CacheKey) -> tuple:
    return (key.request_id, key.worker_id, key.start, key.end)


class UnsettledCommits:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._keys: deque[tuple[CacheKey, int]] = deque(maxlen=MAX_PENDING)
        self.recovered = 0  # reservations a retry committed (the first COMMIT was lost)

    def add(self, key: CacheKey, exc: BaseException) -> None:
        """A COMMIT_STORE of ``key`` ended with ``exc`` and an unknown outcome."""
        if isinstance(exc, KVConnClosed) or key.end <= key.start:
            return
        ident = _ident(key)
        with self._lock:
            if all(_ident(k) != ident for k, _ in self._keys):
                self._keys.append((key, 0))

    def forget(self, key: CacheKey) -> None:
        """A PREPARE_STORE of ``key`` is about to go out: never retry the old commit."""
        ident = _ident(key)
        with self._lock:
            if self._keys and any(_ident(k) == ident for k, _ in self._keys):
                self._keys = deque(((k, a) for k, a in self._keys if _ident(k) != ident),
                                   maxlen=MAX_PENDING)

    def __len__(self) -> int:
        with self._lock:
            return len(self._keys)

    def settle(self, client, instance_id: int, timeout: float) -> int:
        """Commit up to ``PER_CALL`` keys again (blocking, each within ``timeout``); returns
        how many got an answer. Call only while the server answers."""
        done = 0
        for _ in range(PER_CALL):
            with self._lock:
                if not self._keys:
                    break
                key, attempts = self._keys.popleft()
            try:
                if client.commit_store_within(key, instance_id, timeout):
                    self.recovered += 1
                done += 1
            except KVConnError as exc:
                if attempts + 1 < MAX_ATTEMPTS and not isinstance(exc, KVConnClosed):
                    with self._lock:
                        self._keys.append((key, attempts + 1))
                else:
                    logger.debug("kvconn: leaving the write reservation of %s to the "
                                 "server's TTL (%s)", key.request_id, exc)
                break  # the server stopped answering: the next heartbeat tries again
        return done
