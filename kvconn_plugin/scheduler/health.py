"""The scheduler's view of the LMCache server's liveness (pings on a background thread)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from kvconn_plugin.errors import KVConnChunkSizeMismatch, KVConnError
from kvconn_plugin.utils import PeriodicTask, RateLimitedLog

if TYPE_CHECKING:
    from kvconn_plugin.scheduler.adapter import SchedulerAdapter

# Same logger name as the adapter's: operators filter on it.
logger = logging.getLogger("kvconn_plugin.scheduler.adapter")
_warn = RateLimitedLog(logger, interval=30.0)


class ServerHealth:
    """Background liveness of the server as seen by the scheduler.

    Pings every ``interval`` with a deadline of ``interval``, so an outage is noticed within
    two intervals; while it lasts, lookups are skipped (0 external tokens). On recovery the
    chunk size is read again: a server restarted with another chunk size keeps the cache
    off rather than mixing layouts.
    """

    def __init__(self, owner: SchedulerAdapter, interval: float):
        self._owner = owner
        self._interval = interval
        self._task = PeriodicTask("kvconn-sched-health", interval, self._tick)
        self.healthy = False
        self.disabled_reason: str | None = None

    def start(self) -> None:
        self._task.start()

    def stop(self) -> None:
        self._task.stop()

    def report_failure(self, exc: Exception) -> None:
        if self.healthy:
            _warn.warning("server-down", "kvconn: LMCache server call failed (%s); checking it",
                          exc)
        self._task.poke()

    def check_now(self, wait: float) -> None:
        owner = self._owner
        try:
            owner.client.ping(None, timeout=wait)
            chunk = owner.client.get_chunk_size(timeout=wait)
        except KVConnChunkSizeMismatch as exc:
            self._disable(str(exc))
            return
        except KVConnError as exc:
            if self.healthy:
                _warn.warning("server-down", "kvconn: LMCache server at %s unreachable (%s); "
                              "serving without the cache", owner.client.url, exc)
            self.healthy = False
            owner.stats.set_degraded(True)
            return
        if owner.block_size and chunk % owner.block_size:
            self._disable(f"server chunk size {chunk} is not a multiple of block size "
                          f"{owner.block_size}")
            return
        if owner.chunk_size is not None and chunk != owner.chunk_size:
            self._disable(f"server chunk size changed from {owner.chunk_size} to {chunk}")
            return
        if not self.healthy and owner.chunk_size is not None:
            logger.info("kvconn: LMCache server at %s is back", owner.client.url)
        owner.chunk_size = chunk
        self.healthy = self.disabled_reason is None
        owner.stats.set_degraded(not self.healthy)

    def _disable(self, reason: str) -> None:
        if self.disabled_reason is None:
            logger.error("kvconn: disabling the KV cache: %s. Restart vLLM to pick up the new "
                         "server settings.", reason)
        self.disabled_reason = reason
        self.healthy = False
        self._owner.stats.set_degraded(True)

    def _tick(self) -> None:
        if self.disabled_reason is None:
            self.check_now(wait=self._interval)
        self._owner.drain_closing_in_background()
