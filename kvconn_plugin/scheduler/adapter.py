"""Scheduler-side half of the connector (runs in vLLM's EngineCore process).

Decides, per request, how many prompt tokens come from LMCache and which whole chunks to
store after each step. The scheduler step never waits on the network: lookups are sent
asynchronously and ``get_num_new_matched_tokens`` answers ``None`` ("ask again") until the
server's reply is in; a dead or slow server turns into a miss.

Loads are asynchronous for vLLM (the request waits in WAITING_FOR_REMOTE_KVS while a worker
thread copies), so a full-prompt hit never reaches the synchronous-load assert.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from kvconn_plugin.client.api import LMCacheClient
from kvconn_plugin.client.protocol import CacheKey
from kvconn_plugin.config import KVConnConfig
from kvconn_plugin.errors import KVConnError
from kvconn_plugin.kv_groups import NULL_BLOCK_ID, SINGLE, KVGroups
from kvconn_plugin.metadata import KVConnMetadata, TransferSpec
from kvconn_plugin.parallel import KVRanks
from kvconn_plugin.request_params import RequestControls
from kvconn_plugin.scheduler.fleet import ServerFleet, scheduler_client
from kvconn_plugin.scheduler.health import ServerHealth
from kvconn_plugin.scheduler.tracker import LookupState, RequestTracker
from kvconn_plugin.stats import KVConnStats
from kvconn_plugin.utils import RateLimitedLog

if TYPE_CHECKING:
    from vllm.v1.core.sched.output import SchedulerOutput

logger = logging.getLogger(__name__)
_warn = RateLimitedLog(logger, interval=30.0)

# A finished request whose lookup result is still unknown is drained for at most this long.
DRAIN_TIMEOUT = 30.0
# Shutdown waits this long, at most, for the frees of waiting requests' locks.
SHUTDOWN_FREE_TIMEOUT = 1.0


def _prefix(token_ids: Any, n: int) -> list[int]:
    # vLLM's ConstantList slices to a fresh list already; copy only other sequences.
    out = token_ids[:n]
    return out if type(out) is list else list(out)


class SchedulerAdapter:
    """Args:
        config: validated connector config.
        model_name: cache namespace (part of every key).
        ranks: KV world size and readers, as the workers register them.
        block_size: vLLM (manager) block size in tokens.
        groups: the KV cache groups the cache moves (several for a hybrid model).
        client: injected client (tests); otherwise one is built for the configured server,
            or a ``ServerFleet`` (same calls, fanned out) for several.
    """

    def __init__(
        self,
        config: KVConnConfig,
        *,
        model_name: str,
        ranks: KVRanks,
        block_size: int,
        groups: KVGroups = SINGLE,
        client: LMCacheClient | ServerFleet | None = None,
    ):
        self.config = config
        self.model_name = model_name
        self.ranks = ranks
        self.block_size = block_size
        self.groups = groups
        self.client = client or scheduler_client(config)
        self.chunk_size: int | None = None
        self._trackers: dict[str, RequestTracker] = {}
        self._closing: dict[str, tuple[RequestTracker, float]] = {}
        self._closing_lock = threading.Lock()
        self._pending_loads: list[TransferSpec] = []
        self._kv_cache_manager: Any = None
        self.stats = KVConnStats()
        self.controls = RequestControls()  # per-request kv_transfer_params
        # Requests whose lookups or loads held chunks locked through a reset: once they all
        # let go, one more CLEAR drops what those locks kept.
        self._reclear: set[str] = set()
        self._health = ServerHealth(self, config.heartbeat_interval)
        self._health.check_now(wait=config.connect_timeout)
        if self.chunk_size is None and self._health.disabled_reason is None:
            if config.require_server:
                self.client.close()
                raise KVConnError(
                    f"no LMCache server answered at {self.client.url} within "
                    f"{config.connect_timeout:.0f}s (kvconn.require_server is set). "
                    "Start one with: "
                    "lmcache server --l1-size-gb 20 --eviction-policy LRU "
                    "--supported-transfer-mode auto --shm-name kvconn"
                )
            logger.warning(
                "kvconn: no LMCache server at %s; serving without the KV cache and retrying in "
                "the background. Start one with: lmcache server --l1-size-gb 20 "
                "--eviction-policy LRU --supported-transfer-mode auto --shm-name kvconn",
                self.client.url,
            )
        self._health.start()

    # ------------------------------------------------------------------ state

    @property
    def healthy(self) -> bool:
        return (
            self._health.healthy
            and self.chunk_size is not None
            and self.client.connected
        )

    def bind_kv_cache_manager(self, manager: Any) -> None:
        self._kv_cache_manager = manager

    def _tracker(self, request: Any) -> RequestTracker:
        tr = self._trackers.get(request.request_id)
        if tr is None:
            tr = RequestTracker(request.request_id, request,
                                getattr(request, "cache_salt", None) or "")
            self._trackers[request.request_id] = tr
        return tr

    def _key(self, tr: RequestTracker, start: int, end: int, worker_id: int | None) -> CacheKey:
        return CacheKey(
            model_name=self.model_name,
            world_size=self.ranks.world_size,
            worker_id=worker_id,
            token_ids=_prefix(tr.request.all_token_ids, max(end, tr.lookup_end)),
            start=start,
            end=end,
            request_id=tr.session_id,
            cache_salt=tr.cache_salt,
            num_kv_readers=self.ranks.num_kv_readers,
        )

    # ------------------------------------------------------------------ lookup

    def on_new_request(self, request: Any) -> None:
        """Start the lookup as soon as the request arrives (EngineCore process)."""
        self._start_lookup(self._tracker(request))

    def _start_lookup(self, tr: RequestTracker) -> None:
        chunk = self.chunk_size
        if (not self.config.load or not self.healthy or chunk is None or tr.load_failed
                or self.groups.unsupported):
            return
        # Leave at least one token for vLLM to compute: the last one never comes from us.
        end = (tr.request.num_tokens - 1) // chunk * chunk
        cap = self.controls.load_cap(tr.request, chunk)  # the request's own load limit
        if cap is not None:
            end = min(end, cap)
        if end <= 0:
            return
        tr.lookup_end = end
        tr.state = LookupState.WAIT_ACK
        tr.started_at = time.monotonic()
        tr.hit_chunks = 0
        try:
            fut = self.client.lookup_async(self._key(tr, 0, end, None), self.ranks.tp_size)
        except KVConnError as exc:
            tr.state = LookupState.FAILED
            self._health.report_failure(exc)
            return
        tr.lookup_future = fut
        fut.add_done_callback(lambda f, tr=tr: tr.on_ack(f, self._query_now))

    def _query_now(self, request_id: str):
        # From the I/O thread's ack callback: wake it for this one (it is awake anyway).
        return self.client.query_prefetch_status_async(request_id, wait_for_peer=True, wake=True)

    def get_num_new_matched_tokens(
        self, request: Any, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        """Tokens beyond ``num_computed_tokens`` the cache can provide (EngineCore process).

        Returns ``(None, False)`` while the lookup is in flight. The answer depends only on
        the request and the lookup result, so repeated calls agree.
        """
        num, is_async = self._matched_tokens(request, num_computed_tokens)
        if num is not None:  # the final answer: what cached_token_stats reports
            bs = self.block_size
            self.controls.note_hits(request, num_computed_tokens // bs * bs,
                                    self.lookup_hit_tokens(request.request_id))
        return num, is_async

    def _matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        tr = self._tracker(request)
        if tr.load_from is not None and not tr.loading:
            # Asked again after this request's load ended: a load that worked leaves
            # computed tokens, so vLLM would not ask; it failed (vLLM recomputes), or the
            # request was preempted before we reset it. The hit was used up either way, and
            # offering it again would fail the same way (or wait on a load never planned).
            return 0, False
        if tr.state is LookupState.IDLE and tr.load_from is None and not tr.loading:
            self._start_lookup(tr)  # e.g. a resumed request after preemption
        was_in_flight = tr.in_flight
        tr.advance(self.client.query_prefetch_status_async)
        if was_in_flight and not tr.in_flight:
            self._record_lookup(tr)
        if tr.in_flight:
            if num_computed_tokens >= tr.lookup_end:
                # vLLM's own cache already holds every chunk this lookup can report, so its
                # answer cannot change ours: answer now instead of holding the request for
                # a step. The lookup goes on; _plan_store and _settle use its answer.
                return 0, False
            if tr.timed_out(time.monotonic(), self.config.lookup_timeout):
                self.stats.record("lookup_timeouts")
                return 0, False
            return None, False
        if tr.state is not LookupState.DONE or not self.healthy:
            return 0, False
        chunk = self.chunk_size or 1
        hit = tr.hit_end(chunk)
        if hit <= num_computed_tokens:
            return 0, False
        return hit - num_computed_tokens, True

    def _record_lookup(self, tr: RequestTracker) -> None:
        self.stats.record("lookups")
        if tr.state is LookupState.DONE:
            self.stats.sample("lookup_latency_s", time.monotonic() - tr.started_at)
            if tr.hit_chunks:
                self.stats.record("lookup_hits")
        else:
            self.stats.record("server_errors")

    # ------------------------------------------------------------------ allocation

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        """Plan the load of the external tokens vLLM just allocated blocks for."""
        tr = self._trackers.get(request.request_id)
        if tr is None or tr.load_from is not None:
            return  # second call after an async load completes, or unknown request
        if num_external_tokens <= 0 or tr.state is not LookupState.DONE:
            # vLLM's own cache covered the hit, but the server holds those chunks (maybe
            # only in L2): storing them again would only copy them back up.
            self._count_held_as_stored(tr)
            tr.load_from = -1
            self._release_locks(tr)
            return
        chunk = self.chunk_size or 1
        # vLLM has not advanced num_computed_tokens yet: our answer was hit - local_hit.
        end = tr.hit_end(chunk)
        computed = end - num_external_tokens
        start = computed // chunk * chunk
        groups = self._groups_of(blocks.get_block_ids())
        block_ids = groups[0]
        first, last = start // self.block_size, end // self.block_size
        if computed < 0 or computed % self.block_size or end % chunk or last > len(block_ids):
            logger.error("kvconn: load plan [%d, %d) does not fit %d blocks; recomputing instead",
                         start, end, len(block_ids))
            # vLLM already waits for this load: hand the workers a load that fails, so
            # they report it (finished + load errors) and vLLM recomputes.
            self._pending_loads.append(TransferSpec(
                request_id=tr.request_id, token_ids=(), start=0, end=0,
                block_ids=tuple(block_ids), cache_salt=tr.cache_salt,
                skip_blocks=max(0, computed) // self.block_size))
            tr.loading = True
            tr.load_from = -1
            tr.load_failed = True
            self._release_locks(tr)
            return
        tr.load_from = start
        tr.loading = True
        tr.load_blocks = frozenset(block_ids[first + (computed - start) // self.block_size:last])
        tr.stored_end = max(tr.stored_end, end)  # these chunks are on the server already
        tr.store_countdown = 0  # the load moves computed tokens: check exactly next time
        self._pending_loads.append(TransferSpec(
            request_id=tr.request_id,
            token_ids=tuple(request.all_token_ids[:end]),
            start=start,
            end=end,
            block_ids=tuple(block_ids[first:last]),
            cache_salt=tr.cache_salt,
            skip_blocks=(computed - start) // self.block_size,
            other_groups=tuple(tuple(g[first:last]) for g in groups[1:]),
            session_id=tr.session_id if tr.generation else "",
        ))
        self.stats.record("hit_tokens", num_external_tokens)
        self._release_locks(tr)

    def _lookup_settles_store(self, tr: RequestTracker, end: int) -> bool:
        """A request answered without waiting for its lookup (vLLM's own cache held the
        prefix) stores nothing the lookup may report as held until it lands: storing it
        again would only copy it once more. True while it is worth waiting for."""
        tr.advance(self.client.query_prefetch_status_async)
        if tr.in_flight:
            # Only chunks inside the lookup's range wait (a chunk past it is stored now, as
            # the request may finish this step), and never past the lookup timeout.
            return end <= tr.lookup_end and not tr.timed_out(
                time.monotonic(), self.config.lookup_timeout)
        self._count_held_as_stored(tr)
        self._release_locks(tr)
        return False

    def _count_held_as_stored(self, tr: RequestTracker) -> None:
        """What a finished lookup found on the server needs no store from this request."""
        if tr.state is LookupState.DONE and tr.hit_chunks and not tr.load_failed:
            tr.stored_end = max(tr.stored_end, tr.hit_end(self.chunk_size or 1))

    def _release_locks(self, tr: RequestTracker) -> None:
        """Free the read locks this request's lookup took and will not consume, exactly once."""
        if tr.locks_settled or tr.load_from is None:
            return
        if tr.state is not LookupState.DONE:
            if tr.in_flight:
                return
            tr.locks_settled = True
            if tr.outcome_unknown and tr.lookup_end > 0:
                # The server releases exactly what this request's prefetch locked, if anything.
                self._free_locks(tr, tr.lookup_end)
            return  # otherwise the lookup never reached the server: nothing is locked
        locked_end = tr.hit_end(self.chunk_size or 1)
        free_end = locked_end if tr.load_from < 0 else tr.load_from
        tr.locks_settled = True
        if free_end > 0:
            self._free_locks(tr, free_end)

    def _free_locks(self, tr: RequestTracker, end: int) -> None:
        try:
            self.client.free_lookup_locks_async(self._key(tr, 0, end, None), self.ranks.tp_size)
        except KVConnError as exc:
            self._health.report_failure(exc)

    # ------------------------------------------------------------------ per step

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnMetadata:
        """Collect this step's loads and stores for the workers (EngineCore process)."""
        meta = KVConnMetadata(loads=self._pending_loads)
        self._pending_loads = []
        for tr in (self._trackers.get(r) for r in scheduler_output.preempted_req_ids or ()):
            if tr is not None:
                self._reset_for_resume(tr)
        if (self.config.store and self.healthy and self._kv_cache_manager is not None
                and not self.groups.unsupported):
            # Runs for every scheduled request each step: most are decoding and nowhere
            # near their next chunk boundary, so the common case is one comparison.
            get = self._trackers.get
            for req_id, n in scheduler_output.num_scheduled_tokens.items():
                tr = get(req_id)
                if tr is None:
                    continue
                # Tokens scheduled since the last exact check. Computed tokens grow by at
                # most n (rejected speculative tokens make it less), so this reaches 0 at or
                # before the next chunk boundary, never after it.
                left = tr.store_countdown - n
                if left > 0:
                    tr.store_countdown = left
                    continue
                spec = self._plan_store(tr, n)
                if spec is not None:
                    meta.stores.append(spec)
        self._drain_closing()
        if self._reclear:
            self._maybe_reclear()
        self.client.flush()  # one I/O wake-up per step for all lookups/queries/frees queued
        return meta

    def _plan_store(self, tr: RequestTracker, num_scheduled: int) -> TransferSpec | None:
        chunk = self.chunk_size or 1
        req = tr.request
        computed_after = min(req.num_computed_tokens + num_scheduled, req.num_tokens)
        end = computed_after // chunk * chunk
        if tr.in_flight and self._lookup_settles_store(tr, end):
            tr.store_countdown = 0  # plan again next step, with the lookup's answer
            return None
        cap = self.controls.store_cap(req, chunk)
        if cap is not None and end >= cap:
            end = cap
            tr.store_countdown = 1 << 62  # the request's store limit is reached for good
        else:
            tr.store_countdown = max(end, tr.stored_end) + chunk - computed_after
        if end <= tr.stored_end:
            return None
        start = tr.stored_end
        first, last = start // self.block_size, end // self.block_size
        groups = self._block_ids(tr.request_id, first, last)
        if groups is None:
            tr.store_countdown = 0
            return None
        if self.groups.windowed and any(NULL_BLOCK_ID in g for g in groups):
            # A sliding window already left these chunks behind (a chunk larger than the
            # window, or a store delayed by an outage): their objects cannot be whole, and
            # lookups stop at the first missing chunk, so this request stores no more.
            tr.stored_end = req.num_tokens + chunk
            tr.store_countdown = tr.stored_end
            return None
        tr.stored_end = end
        return TransferSpec(
            request_id=tr.request_id,
            token_ids=tuple(req.all_token_ids[:end]),
            start=start,
            end=end,
            block_ids=groups[0],
            cache_salt=tr.cache_salt,
            other_groups=groups[1:],
        )

    def _groups_of(self, per_group: Any) -> list[Any]:
        """The block-id lists of the groups we move, from vLLM's one-per-group sequence."""
        if not self.groups.groups:
            return [per_group[0]]
        return [per_group[g.index] for g in self.groups.groups]

    def _block_ids(self, req_id: str, first: int, last: int) -> tuple[tuple[int, ...], ...] | None:
        """Ids of the request's blocks ``[first, last)`` per moved group, or None if it has
        fewer.

        Reads only that slice: ``get_block_ids`` would list every block of the request on
        each store (a long prompt has hundreds at block size 16).
        """
        manager = self._kv_cache_manager
        get_blocks = getattr(manager, "get_blocks", None)
        if get_blocks is not None:
            groups = self._groups_of(get_blocks(req_id).blocks)
            if any(last > len(g) for g in groups):
                return None
            return tuple(tuple(b.block_id for b in g[first:last]) for g in groups)
        groups = self._groups_of(manager.get_block_ids(req_id))
        if any(last > len(g) for g in groups):
            return None
        return tuple(tuple(g[first:last]) for g in groups)

    def _reset_for_resume(self, tr: RequestTracker) -> None:
        """A preempted request lost its blocks; it is looked up afresh when it resumes."""
        if tr.loading:
            return  # cannot happen for WAITING_FOR_REMOTE_KVS requests; keep the load state
        if not tr.locks_settled:
            if tr.load_from is None:
                tr.load_from = -1
            self._release_locks(tr)
            if not tr.locks_settled:
                self._closing[f"{tr.request_id}#pre{id(tr)}"] = (
                    tr, time.monotonic() + DRAIN_TIMEOUT)
        self._trackers[tr.request_id] = tr.resumed()

    def update_connector_output(self, output: Any) -> None:
        invalid = output.invalid_block_ids or ()
        failed = output.failed_recving or ()
        for req_id in output.finished_recving or ():
            tr = self._trackers.get(req_id)
            if tr is not None:
                tr.loading = False
                if req_id in failed or not tr.load_blocks.isdisjoint(invalid):
                    tr.load_failed = True

    # ------------------------------------------------------------------ finish

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict | None]:
        """Release locks and end the server session (EngineCore process).

        Returns True (keep the blocks) only while a load into them is still running; the
        worker's finished_recving for it then lets vLLM free them. The second value is the
        request's output ``kv_transfer_params`` (``cached_token_stats`` when it asked).
        """
        params = self.controls.finish(request)
        tr = self._trackers.pop(request.request_id, None)
        if tr is None:
            return False, params
        hold = tr.loading
        if tr.load_from is None:
            tr.load_from = -1
        if not self._settle(tr, final=True):
            self._closing[tr.request_id] = (tr, time.monotonic() + DRAIN_TIMEOUT)
        return hold, params

    def _settle(self, tr: RequestTracker, final: bool) -> bool:
        """Free what a finished (``final``) or superseded lookup still holds; True when done.

        Not done while the lookup result is still unknown: the server may yet lock chunks
        for it, so it is retried each step until its deadline.
        """
        tr.advance(self.client.query_prefetch_status_async)
        self._release_locks(tr)
        if not tr.locks_settled:
            return False
        if final or tr.generation:
            self._end_session(tr, final)
        return True

    def _end_session(self, tr: RequestTracker, final: bool = True) -> None:
        ids = [] if tr.state is LookupState.IDLE else [tr.session_id]  # IDLE: never looked up
        if final and tr.generation:
            ids.append(tr.request_id)  # the first lookup's session, ended with the request
        for sid in ids:
            with contextlib.suppress(KVConnError):
                self.client.end_session_async(sid)

    def _drain_closing(self) -> None:
        """Retry finished requests whose lookup result was still unknown (once per step)."""
        if not self._closing:
            return
        with self._closing_lock:  # the health thread drains too (an idle engine has no steps)
            self._drain_closing_locked()

    def drain_closing_in_background(self) -> None:
        """From the health thread: an idle engine runs no steps, and the locks of its last
        finished requests would wait for the next request (or the server's 300 s TTL).
        Also sends the lock frees that found no connection, once there is one."""
        self.client.resend_unsent_frees()
        if self._closing:
            self._drain_closing()
        self.client.flush()

    def _closing_ids(self) -> set[str]:
        with self._closing_lock:  # the health thread may be deleting entries
            return {tr.request_id for tr, _ in self._closing.values()}

    def _drain_closing_locked(self) -> None:
        now = time.monotonic()
        for key, (tr, deadline) in list(self._closing.items()):
            final = "#pre" not in key  # a preempted request's old lookup: the session lives on
            if self._settle(tr, final):
                del self._closing[key]
            elif now >= deadline:
                del self._closing[key]  # given up: the server's lock TTL frees the rest
                if final or tr.generation:
                    self._end_session(tr, final)

    def lookup_hit_tokens(self, request_id: str) -> int:
        """Tokens the server had for this request's prefix (0 until the lookup is done)."""
        tr = self._trackers.get(request_id)
        if tr is None or tr.state is not LookupState.DONE:
            return 0
        return tr.hit_end(self.chunk_size or 1)

    # ------------------------------------------------------------------ reset

    def reset_cache(self) -> bool:
        """CLEAR the server and drop what our trackers learnt from it (EngineCore process,
        between steps, e.g. vLLM's ``/reset_prefix_cache?reset_external=true``).

        The CLEAR is not forced: objects read-locked by lookups or loads in flight stay, so
        those loads still complete and are reported. Every other request gives up its
        lookup result (its locks are freed as on preemption) and is not looked up again
        unless it is preempted: the server was just emptied. ``stored_end`` is kept, so a
        running request does not store again the KV its blocks held before the reset.
        Waits at most the control timeout; False when the server is down or did not
        confirm (trackers are left alone when it is known to be down).
        """
        if not self.healthy:
            return False
        # Requests holding read locks now (the frees below race with the CLEAR on the
        # server): once they hold none, one more CLEAR follows (_maybe_reclear).
        busy = {rid for rid, tr in self._trackers.items()
                if tr.loading or tr.in_flight or not tr.locks_settled}
        busy.update(self._closing_ids())
        for tr in list(self._trackers.values()):
            if tr.loading:
                continue  # its chunks are locked, so kept; the workers report the load
            looked_up = tr.state is not LookupState.IDLE
            self._reset_for_resume(tr)
            if looked_up:
                # A miss from now on; FAILED (not IDLE) still ends its server session.
                self._trackers[tr.request_id].state = LookupState.FAILED
        # The lock frees go out first, so the CLEAR (same connection, after them) can drop
        # the chunks those lookups had locked.
        self.client.flush()
        try:
            self.client.clear(force=False)
        except KVConnError as exc:
            _warn.warning("reset", "kvconn: CLEAR of the LMCache server failed (%s)", exc)
            self._health.report_failure(exc)
            return False
        self._reclear = busy
        logger.info("kvconn: LMCache server at %s cleared", self.client.url)
        return True

    def _maybe_reclear(self) -> None:
        """After a reset: CLEAR again (without waiting) once the lookups and loads that
        kept chunks locked through it are over, so none of those chunks outlives it."""
        closing = self._closing_ids()
        get = self._trackers.get
        self._reclear = {rid for rid in self._reclear if rid in closing
                         or ((tr := get(rid)) is not None and (tr.loading or tr.in_flight))}
        if not self._reclear and self.healthy:
            with contextlib.suppress(KVConnError):
                self.client.clear_async(False)

    def get_stats(self) -> KVConnStats | None:
        return self.stats.take()

    def shutdown(self) -> None:
        self._health.stop()
        self._release_waiting_locks(SHUTDOWN_FREE_TIMEOUT)
        self.client.close()

    def _release_waiting_locks(self, budget: float) -> None:
        """Free the read locks of hits vLLM drops at shutdown before planning their load
        (requests still waiting): left alone they pin their chunks until the server's TTL,
        which a rolling restart hits every time. A load already planned may still consume
        its locks on a worker, so those are left to the TTL. Waits at most ``budget`` s."""
        if not self.healthy:
            return
        futures = []
        for tr in list(self._trackers.values()):
            if tr.load_from is not None or tr.locks_settled or tr.state is not LookupState.DONE:
                continue
            end = tr.hit_end(self.chunk_size or 0)
            tr.locks_settled = True
            if end <= 0:
                continue
            try:
                futures.append(self.client.free_lookup_locks_async(
                    self._key(tr, 0, end, None), self.ranks.tp_size))
            except KVConnError:
                return  # the server went away: nothing more to free on it
        deadline = time.monotonic() + budget
        for fut in futures:
            with contextlib.suppress(Exception):
                fut.result(timeout=max(0.0, deadline - time.monotonic()))
