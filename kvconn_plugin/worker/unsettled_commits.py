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

from kvconn_plugin.client.protocol import CacheKey
from kvconn_plugin.worker.settle_queue import MAX_ATTEMPTS, SettleQueue, ident

__all__ = ["MAX_ATTEMPTS", "UnsettledCommits"]


class UnsettledCommits(SettleQueue):
    what = "write reservation"

    def __init__(self) -> None:
        super().__init__()
        self.recovered = 0  # reservations a retry committed (the first COMMIT was lost)

    def add(self, key: CacheKey, exc: BaseException) -> None:
        """A COMMIT_STORE of ``key`` ended with ``exc`` and an unknown outcome (or unsent)."""
        self._push(key, exc)

    def forget(self, key: CacheKey) -> None:
        """A PREPARE_STORE of ``key`` is about to go out: never retry the old commit."""
        i = ident(key)
        with self._lock:
            if self._keys and any(ident(k) == i for k, _ in self._keys):
                kept = [(k, a) for k, a in self._keys if ident(k) != i]
                self._keys.clear()
                self._keys.extend(kept)

    def _settle_one(self, client, key: CacheKey, instance_id: int, timeout: float) -> None:
        if client.commit_store_within(key, instance_id, timeout):
            self.recovered += 1

