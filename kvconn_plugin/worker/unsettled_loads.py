"""Read locks of loads that failed before their COMMIT_RETRIEVE, released once the server
answers again.

A load's chunks stay read-locked on the server from the scheduler's LOOKUP until the
worker's COMMIT_RETRIEVE. When the PREPARE_RETRIEVE fails on our side (no reply in time,
connection lost, aborted by the heartbeat while the server was frozen, or never sent), no
COMMIT follows and the locks would pin those chunks for the server's read TTL (300 s).
Whatever happened to that PREPARE_RETRIEVE, a fresh PREPARE_RETRIEVE + COMMIT_RETRIEVE of
the same key releases exactly the lookup's locks once:

* the first one was never carried out: the lookup's locks are still there, the new
  PREPARE sees them and the COMMIT releases them;
* it was carried out (late): the server parked the locked keys under this key and
  instance; the new PREPARE takes no lock and parks the same keys again, the COMMIT
  releases them once;
* the server restarted: nothing is locked, the new PREPARE fails and nothing is sent.

A request whose load failed is never offered a hit again (the scheduler marks it), so no
later load of the same key can be confused with the recovery.
"""

from __future__ import annotations

import logging
import threading
from collections import deque

from kvconn_plugin.client.protocol import CacheKey
from kvconn_plugin.errors import KVConnClosed, KVConnError

logger = logging.getLogger(__name__)

# Past this many pending keys the oldest are left to the server's read TTL.
MAX_PENDING = 256
# Attempts per key (each bounded by the caller's timeout) before the TTL is left to it.
MAX_ATTEMPTS = 3
# Keys settled per call, so one heartbeat never runs long.
PER_CALL = 8


class UnsettledLoads:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._keys: deque[tuple[CacheKey, int]] = deque(maxlen=MAX_PENDING)

    def add(self, key: CacheKey, exc: BaseException | None = None) -> None:
        """A load's PREPARE_RETRIEVE failed with ``exc`` (or was never sent: None)."""
        if isinstance(exc, KVConnClosed) or key.end <= key.start:
            return  # shutting down, or a load that never covered any chunk
        ident = _ident(key)
        with self._lock:
            # Once per load: a second recovery would release another reader's lock.
            if all(_ident(k) != ident for k, _ in self._keys):
                self._keys.append((key, 0))

    def __len__(self) -> int:
        with self._lock:
            return len(self._keys)

    def settle(self, client, instance_id: int, timeout: float) -> int:
        """Release the locks of up to ``PER_CALL`` keys (blocking, each within ``timeout``);
        returns how many were settled. Call only while the server answers."""
        done = 0
        for _ in range(PER_CALL):
            with self._lock:
                if not self._keys:
                    break
                key, attempts = self._keys.popleft()
            try:
                reply = client.prepare_retrieve_within(key, instance_id, timeout)
                if reply.success:
                    client.commit_retrieve_async(key, instance_id)
                done += 1
            except KVConnError as exc:
                if attempts + 1 < MAX_ATTEMPTS and not isinstance(exc, KVConnClosed):
                    with self._lock:
                        self._keys.append((key, attempts + 1))
                else:
                    logger.debug("kvconn: leaving the read locks of %s to the server's TTL "
                                 "(%s)", key.request_id, exc)
                break  # the server stopped answering: the next heartbeat tries again
        return done


def _ident(key: CacheKey) -> tuple:
    return (key.request_id, key.worker_id, key.start, key.end)
