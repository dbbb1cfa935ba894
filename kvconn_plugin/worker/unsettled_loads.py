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

A COMMIT_RETRIEVE that is itself lost (no reply in time, or the connection dropped with it
in flight, or no connection to send it on) leaves the same locks; sending the COMMIT again
is enough and safe either way: the server pops the parked keys under (instance, key), so a
second COMMIT after one that was applied releases nothing (``UnsettledRetrieveCommits``).
"""

from __future__ import annotations

from kvconn_plugin.client.protocol import CacheKey
from kvconn_plugin.worker.settle_queue import MAX_ATTEMPTS, SettleQueue

__all__ = ["MAX_ATTEMPTS", "UnsettledLoads", "UnsettledRetrieveCommits"]


class UnsettledLoads(SettleQueue):
    what = "read locks"

    def add(self, key: CacheKey, exc: BaseException | None = None) -> None:
        """A load's PREPARE_RETRIEVE failed with ``exc`` (or was never sent: None). Once per
        load: a second recovery would release another reader's lock."""
        self._push(key, exc)

    def _settle_one(self, client, key: CacheKey, instance_id: int, timeout: float) -> None:
        reply = client.prepare_retrieve_within(key, instance_id, timeout)
        if reply.success:
            # Waited for: if this COMMIT is lost too, the whole settle runs again (the
            # PREPARE parks the same keys once more, or finds them released).
            client.commit_retrieve_within(key, instance_id, timeout)


class UnsettledRetrieveCommits(SettleQueue):
    what = "read locks"

    def add(self, key: CacheKey, exc: BaseException | None = None) -> None:
        """A COMMIT_RETRIEVE of ``key`` ended with ``exc``: outcome unknown, or never sent."""
        self._push(key, exc)

    def _settle_one(self, client, key: CacheKey, instance_id: int, timeout: float) -> None:
        client.commit_retrieve_within(key, instance_id, timeout)
