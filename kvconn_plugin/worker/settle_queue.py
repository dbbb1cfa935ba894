"""A bounded queue of keys whose effect on the server must be settled once it answers again
(the worker's heartbeat drains it): what ``UnsettledLoads`` and ``UnsettledCommits`` share."""

from __future__ import annotations

import logging
import threading
from collections import deque

from kvconn_plugin.client.protocol import CacheKey
from kvconn_plugin.errors import KVConnClosed, KVConnError

logger = logging.getLogger(__name__)

# Past this many pending keys the oldest are left to the server's TTL.
MAX_PENDING = 256
# Attempts per key (each bounded by the caller's timeout) before the TTL is left to it.
MAX_ATTEMPTS = 3
# Keys settled per call, so one heartbeat never runs long.
PER_CALL = 8


def ident(key: CacheKey) -> tuple:
    return (key.request_id, key.worker_id, key.start, key.end)


def server_identity(token_ids, start: int, end: int, cache_salt: str) -> tuple:
    """What LMCache compares one worker's transfer keys by: the request id is left out
    (``IPCCacheServerKey.request_id`` does not take part in equality), so two loads of the
    same tokens and range share the server's parked read locks."""
    return (tuple(token_ids), start, end, cache_salt)


def key_identity(key: CacheKey) -> tuple:
    return server_identity(key.token_ids, key.start, key.end, key.cache_salt)


class SettleQueue:
    """Each key at most once; ``settle`` runs ``_settle_one`` on up to ``PER_CALL`` of them."""

    what = "locks"  # for the give-up log line

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._keys: deque[tuple[CacheKey, int]] = deque(maxlen=MAX_PENDING)

    def _push(self, key: CacheKey, exc: BaseException | None) -> None:
        if isinstance(exc, KVConnClosed) or key.end <= key.start:
            return  # shutting down, or nothing that covered a chunk
        i = ident(key)
        with self._lock:
            if all(ident(k) != i for k, _ in self._keys):
                self._keys.append((key, 0))

    def __len__(self) -> int:
        with self._lock:
            return len(self._keys)

    def keys(self) -> list[CacheKey]:
        with self._lock:
            return [k for k, _ in self._keys]

    def owes(self, identity: tuple) -> bool:
        """Whether a key with this server identity is waiting to be settled."""
        with self._lock:
            return any(key_identity(k) == identity for k, _ in self._keys)

    def settle_matching(self, identity: tuple, client, instance_id: int,
                        timeout: float) -> None:
        """Settle now, in order, every key with this server identity (a load of the same
        chunks is about to PREPARE them). Raises the first ``KVConnError``; that key and
        the ones after it stay queued."""
        with self._lock:
            mine = [e for e in self._keys if key_identity(e[0]) == identity]
            for e in mine:
                self._keys.remove(e)
        for i, (key, attempts) in enumerate(mine):
            try:
                self._settle_one(client, key, instance_id, timeout)
            except KVConnError as exc:
                rest = [(key, attempts + 1)] if attempts + 1 < MAX_ATTEMPTS else []
                if not rest:
                    self._give_up(key, exc)
                with self._lock:
                    self._keys.extend(rest + mine[i + 1:])
                raise exc

    def settle(self, client, instance_id: int, timeout: float, blocked=None) -> int:
        """Settle up to ``PER_CALL`` keys (blocking, each within ``timeout``); returns how
        many got an answer. Call only while the server answers. A key whose server identity
        ``blocked`` says must wait (an earlier release of it is owed) stays queued."""
        done = 0
        for _ in range(PER_CALL):
            with self._lock:
                if not self._keys:
                    break
                key, attempts = self._keys.popleft()
            if blocked is not None and blocked(key_identity(key)):
                with self._lock:
                    self._keys.append((key, attempts))
                continue
            try:
                self._settle_one(client, key, instance_id, timeout)
                done += 1
            except KVConnError as exc:
                if attempts + 1 < MAX_ATTEMPTS and not isinstance(exc, KVConnClosed):
                    with self._lock:
                        self._keys.append((key, attempts + 1))
                else:
                    self._give_up(key, exc)
                break  # the server stopped answering: the next heartbeat tries again
        return done

    def _give_up(self, key: CacheKey, exc: KVConnError) -> None:
        logger.debug("kvconn: leaving the %s of %s to the server's TTL (%s)",
                     self.what, key.request_id, exc)

    def _settle_one(self, client, key: CacheKey, instance_id: int, timeout: float) -> None:
        raise NotImplementedError
