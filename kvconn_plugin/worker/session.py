"""One worker's registration with the LMCache server: handshake, SHM pool, heartbeat, and
the engine-driven store/retrieve sequences.

Engine-driven transfers: the server lends slots of its SHM pool; we gather paged blocks
into them (store) or scatter them back (retrieve) with our own kernels, then commit. The
heartbeat pings every ``heartbeat_interval`` so the server keeps the registration; after
an outage it re-registers (a restarted server has a new pool) and re-checks the chunk size
so layouts never mix.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kvconn_plugin.client.api import LMCacheClient, new_instance_id
from kvconn_plugin.client.protocol import CacheKey, Op, RegisterEngineDrivenPayload
from kvconn_plugin.client.reply_future import ReplyFuture
from kvconn_plugin.client.shm_pool import ShmPool
from kvconn_plugin.client.transport import wait
from kvconn_plugin.config import KVConnConfig
from kvconn_plugin.errors import KVConnError, KVConnProtocolError, KVConnTimeout, KVConnUnavailable
from kvconn_plugin.kv_groups import NULL_BLOCK_ID, leading_nulls
from kvconn_plugin.metadata import TransferSpec
from kvconn_plugin.parallel import KVRanks
from kvconn_plugin.stats import KVConnStats
from kvconn_plugin.utils import PeriodicTask, RateLimitedLog
from kvconn_plugin.worker.chunk_copy import ChunkCopier
from kvconn_plugin.worker.settle_queue import SettleQueue, key_identity
from kvconn_plugin.worker.unsettled_commits import UnsettledCommits
from kvconn_plugin.worker.unsettled_loads import UnsettledLoads, UnsettledRetrieveCommits

logger = logging.getLogger(__name__)
_warn = RateLimitedLog(logger, interval=30.0)


@dataclass(frozen=True, eq=False)
class ChunkPlan:
    """One transfer of whole chunks, checked against the registration."""

    key: CacheKey
    nchunks: int
    blocks_per_chunk: int   # kernel blocks per chunk
    shape: tuple[int, ...]  # slot shape in elements
    blocks: tuple[list[int], ...]  # per KV cache group: kernel block ids of the range, in order
    skips: tuple[int, ...]  # per group: leading kernel blocks a load must leave alone
    pool: ShmPool | None    # the pool the server's slots refer to (None: pickled chunks)

    def chunk_blocks(self, ci: int) -> tuple[list[int], ...]:
        bpc = self.blocks_per_chunk
        return tuple(b[ci * bpc:(ci + 1) * bpc] for b in self.blocks)

    def chunk_skips(self, ci: int) -> tuple[int, ...]:
        bpc = self.blocks_per_chunk
        return tuple(min(bpc, max(0, s - ci * bpc)) for s in self.skips)


class ServerSession:
    def __init__(
        self,
        *,
        client: LMCacheClient,
        config: KVConnConfig,
        model_name: str,
        ranks: KVRanks,
        copier: ChunkCopier,
        windowed: bool = False,
        manager_block_size: int,
        dtype_name: str,
        stats: KVConnStats,
    ):
        self.client = client
        self.config = config
        self.model_name = model_name
        self.ranks = ranks
        self.copier = copier
        self.layout = copier.layout
        self.windowed = windowed
        self.dtype_name = dtype_name
        self.stats = stats
        self.instance_id = new_instance_id()
        self.manager_block_size = manager_block_size
        # vLLM may split a manager block into several kernel blocks (dim 0 of the views).
        self.block_ratio = max(1, manager_block_size // self.layout.block_size)
        self.chunk_size: int | None = None
        self.pool: ShmPool | None = None
        self.healthy = False
        self.disabled_reason: str | None = None
        self._reg_lock = threading.Lock()
        # Store (engine thread) and load (load thread) may overlap; their copies share the
        # transfer object and its stream, so only the copy sections are serialized.
        self.xfer_lock = threading.Lock()
        # Loads that failed before their COMMIT_RETRIEVE: their read locks are released
        # by the heartbeat once the server answers again.
        self.unsettled = UnsettledLoads()
        # Loads whose COMMIT_RETRIEVE may not have arrived: sent again by the heartbeat.
        self.unsettled_retrieve_commits = UnsettledRetrieveCommits()
        # Stores whose COMMIT_STORE may not have arrived: committed again by the heartbeat.
        self.unsettled_commits = UnsettledCommits()
        # COMMIT_RETRIEVEs sent and not answered yet, by server key identity (see owes).
        self._commits_in_flight: dict[tuple, ReplyFuture] = {}
        self._commits_lock = threading.Condition()
        # Runs a read-lock settle (the loader replaces it so that a settle never overlaps
        # a load of the same key; see WorkerAdapter._run_read_settle).
        self.run_read_settle: Callable[[SettleQueue, Callable[[], Any]], None] = (
            lambda queue, settle: settle())
        self._heartbeat_task = PeriodicTask("kvconn-worker-health", config.heartbeat_interval,
                                            self._heartbeat)

    # ------------------------------------------------------------------ registration

    def connect(self) -> None:
        """Register now if a server answers; otherwise degrade and keep retrying."""
        try:
            self._register(timeout=self.config.connect_timeout)
        except KVConnError as exc:
            if self.config.require_server:
                self.client.close()
                raise KVConnUnavailable(
                    f"no usable LMCache server at {self.client.url}: {exc} "
                    "(kvconn.require_server is set)"
                ) from exc
            # A server that is simply not there is the scheduler's one warning (with the
            # command that starts one); each worker repeating it would only add noise. A
            # server that answers but cannot be used is this worker's own news.
            quiet = isinstance(exc, (KVConnUnavailable, KVConnTimeout))
            logger.log(logging.INFO if quiet else logging.WARNING,
                       "kvconn: no usable LMCache server at %s (%s); serving without the "
                       "cache and retrying in the background", self.client.url, exc)
        self._heartbeat_task.start()

    def _register(self, timeout: float) -> None:
        with self._reg_lock:
            chunk = self.client.get_chunk_size(timeout=timeout)
            if chunk % self.manager_block_size:
                self._disable(f"server chunk size {chunk} is not a multiple of vLLM's block "
                              f"size {self.manager_block_size}")
                raise KVConnProtocolError(self.disabled_reason or "")
            if self.chunk_size is not None and chunk != self.chunk_size:
                self._disable(f"server chunk size changed from {self.chunk_size} to {chunk}")
                raise KVConnProtocolError(self.disabled_reason or "")
            lay = self.layout
            payload = RegisterEngineDrivenPayload(
                instance_id=self.instance_id,
                model_name=self.model_name,
                world_size=self.ranks.world_size,
                block_size=lay.block_size,
                num_layers=self.copier.num_layers,
                hidden_dim_size=lay.num_heads * lay.run_bytes // self._itemsize(),
                dtype_str=self.dtype_name,
                # The wire field only sets the object's plane count: one plane holds MLA's
                # latent and the fused K|V content alike (what LMCache's connector sends).
                use_mla=lay.num_planes == 1,
                num_physical_slots=chunk,
            )
            reply = self.client.register_engine_driven(payload, timeout=timeout)
            self._swap_pool(reply.shm_name, reply.pool_size)
            self.chunk_size = chunk
            self.healthy = True
            self.stats.set_degraded(False)

    def _swap_pool(self, shm_name: str, pool_size: int) -> None:
        old, self.pool = self.pool, None
        if old is not None:
            self._unpin(old)
            old.close()
        if not shm_name:
            return  # the server has no SHM pool: chunks travel pickled inside the messages
        pool = ShmPool(shm_name, pool_size)
        from kvconn_plugin import ops

        if self.layout.device != "cpu" and not ops.pin_host_memory(pool.address, pool.size):
            logger.warning("kvconn: could not pin the SHM pool; GPU copies will be slower")
        self.pool = pool

    def _unpin(self, pool: ShmPool) -> None:
        if self.layout.device != "cpu":
            from kvconn_plugin import ops

            ops.unpin_host_memory(pool.address)

    def _disable(self, reason: str) -> None:
        if self.disabled_reason is None:
            logger.error("kvconn: disabling the KV cache on this worker: %s", reason)
        self.disabled_reason = reason
        self.healthy = False
        self.stats.set_degraded(True)

    def _itemsize(self) -> int:
        from kvconn_plugin.client.shm_pool import DTYPE_SIZES

        size = DTYPE_SIZES.get(self.dtype_name)
        if size is None:
            raise KVConnProtocolError(f"unsupported KV dtype {self.dtype_name}")
        return size

    def swap_copier(self, copier: Any) -> Any:
        """Replace the copier between two copies (vLLM sleep mode); returns the old one.
        Every copy runs under ``xfer_lock`` and waits for its own completion there."""
        with self.xfer_lock:
            old, self.copier = self.copier, copier
        return old

    # ------------------------------------------------------------------ heartbeat

    def _heartbeat(self) -> None:
        """Ping while registered; re-register after an outage (a restarted server has a new
        pool). A disabled session stays off."""
        if self.disabled_reason is not None:
            return
        interval = self.config.heartbeat_interval
        try:
            if self.healthy:
                self.client.ping(self.instance_id, timeout=interval)
            else:
                self._register(timeout=interval)
                logger.info("kvconn: re-registered with LMCache server at %s", self.client.url)
            # Lost COMMITs first: a failed load's recovery PREPARE of the same identity
            # would take over the parked entry such a COMMIT has yet to release (see owes).
            if len(self.unsettled_retrieve_commits):
                self.run_read_settle(self.unsettled_retrieve_commits, lambda: (
                    self.unsettled_retrieve_commits.settle(self.client, self.instance_id,
                                                           interval)))
            if len(self.unsettled):
                self.run_read_settle(self.unsettled, lambda: self.unsettled.settle(
                    self.client, self.instance_id, interval, blocked=self._commit_owed))
            if len(self.unsettled_commits):
                self.unsettled_commits.settle(self.client, self.instance_id, interval)
        except KVConnError as exc:
            if self.healthy:
                _warn.warning("down", "kvconn: LMCache server at %s stopped answering (%s); "
                              "serving without the cache", self.client.url, exc)
            self.healthy = False
            self.stats.set_degraded(True)
            # A frozen server keeps the connection up, so nothing else fails the store or
            # retrieve waiting on it: end them now (dropped store, load error) instead of
            # after transfer_timeout. Bounds every transfer wait by ~2 heartbeat intervals.
            self.client.abort_in_flight(f"LMCache server at {self.client.url} stopped answering")

    # ------------------------------------------------------------------ transfers

    def plan(self, spec: TransferSpec, store: bool = False) -> ChunkPlan:
        """Check a spec against the registration and the layout; what a transfer needs.

        Raises ``KVConnUnavailable`` while the server is not usable (nothing is sent to a
        server known to be down) and ``KVConnProtocolError`` for a malformed spec.
        """
        chunk = self.chunk_size
        if chunk is None or not self.healthy:
            raise KVConnUnavailable(f"LMCache server at {self.client.url} is not usable now")
        span = spec.end - spec.start
        if span <= 0 or spec.start % chunk or span % chunk:
            raise KVConnProtocolError(f"range [{spec.start}, {spec.end}) is not whole chunks")
        if len(spec.block_ids) * self.manager_block_size != span:
            raise KVConnProtocolError(f"{len(spec.block_ids)} blocks for {span} tokens")
        if len(spec.token_ids) < spec.end:
            raise KVConnProtocolError("token ids shorter than the range")
        groups = spec.group_block_ids()
        if len(groups) != len(self.copier.parts) or any(
                len(g) != len(spec.block_ids) for g in groups):
            raise KVConnProtocolError(
                f"{len(groups)} block lists for {len(self.copier.parts)} KV cache groups")
        r = self.block_ratio
        # Only sliding windows hand out vLLM's null block (elsewhere block 0 is a block).
        windowed = self.windowed
        if windowed and store and any(NULL_BLOCK_ID in g for g in groups):
            raise KVConnProtocolError("a store over vLLM's null block (outside a window)")
        # Leading null blocks are a sliding window's skipped prefix: never copied.
        skips = tuple(r * max(spec.skip_blocks, leading_nulls(g) if windowed else 0)
                      for g in groups)
        blocks = tuple(list(g) if r == 1 else [b * r + i for b in g for i in range(r)]
                       for g in groups)
        return ChunkPlan(
            key=self.key(spec),
            nchunks=span // chunk,
            blocks_per_chunk=chunk // self.layout.block_size,
            shape=self.slot_shape(chunk),
            blocks=blocks,
            skips=skips,
            pool=self.pool,  # a re-registration may swap it; slots belong to this one
        )

    def key(self, spec: TransferSpec) -> CacheKey:
        """The server key of this worker's share of ``spec`` (no checks)."""
        return CacheKey(
            model_name=self.model_name,
            world_size=self.ranks.world_size,
            worker_id=self.ranks.worker_id,
            token_ids=list(spec.token_ids),
            start=spec.start,
            end=spec.end,
            request_id=spec.server_request_id,
            cache_salt=spec.cache_salt,
            num_kv_readers=self.ranks.num_kv_readers,
        )

    def slot_shape(self, chunk: int) -> tuple[int, ...]:
        lay, layers = self.layout, self.copier.num_layers
        hidden = lay.num_heads * lay.run_bytes // self._itemsize()
        if lay.num_planes == 1:
            return (layers, chunk, hidden)
        return (2, layers, chunk, hidden)

    @property
    def chunk_bytes(self) -> int:
        return math.prod(self.slot_shape(self.chunk_size or 0)) * self._itemsize()

    def failed(self, exc: Exception) -> None:
        """A transfer call failed: let the heartbeat check the server right away."""
        self.stats.record("server_errors")
        if isinstance(exc, KVConnUnavailable) or "no reply" in str(exc):
            self.healthy = False
            self.stats.set_degraded(True)
        self._heartbeat_task.poke()

    def _commit_retrieve(self, key: CacheKey) -> None:
        """Release a load's read locks without waiting for the reply; a COMMIT_RETRIEVE
        that is lost, or finds no connection, is sent again by the heartbeat. Until its
        reply the key's identity counts as owed (``owes``)."""
        identity = key_identity(key)
        try:
            fut = self.client.commit_retrieve_async(key, self.instance_id)
        except KVConnError as exc:
            self.unsettled_retrieve_commits.add(key, exc)
            return

        def done(f: ReplyFuture) -> None:
            exc = None if f.cancelled() else f.exception()
            if f.cancelled() or exc is not None:
                self.unsettled_retrieve_commits.add(key, exc)  # before it stops being in flight
            with self._commits_lock:
                if self._commits_in_flight.get(identity) is f:
                    del self._commits_in_flight[identity]
                self._commits_lock.notify_all()

        with self._commits_lock:
            self._commits_in_flight[identity] = fut
        fut.add_done_callback(done)

    def _commit_owed(self, identity: tuple) -> bool:
        with self._commits_lock:
            if identity in self._commits_in_flight:
                return True
        return self.unsettled_retrieve_commits.owes(identity)

    def owes(self, identity: tuple) -> bool:
        """Whether a release of this server key identity is in flight or still to be settled.

        LMCache parks a retrieve's read locks under (instance, key), and the key's identity
        leaves the request id out: a PREPARE_RETRIEVE of the same tokens and range before the
        earlier COMMIT_RETRIEVE is applied replaces the parked entry, and the earlier lookup's
        locks are never released."""
        return self._commit_owed(identity) or self.unsettled.owes(identity)

    def settle_owed(self, identity: tuple, timeout: float) -> None:
        """Before a PREPARE_RETRIEVE of this identity (on the loader thread, which also runs
        the heartbeat's settles): wait for its COMMIT in flight, then settle its lost COMMITs
        and then its failed loads' locks, in that order. Raises ``KVConnError`` when that does
        not happen within ``timeout`` each: the PREPARE must not go out then."""
        with self._commits_lock:
            # Until its callback has run: a failed COMMIT is queued for a retry there.
            if not self._commits_lock.wait_for(
                    lambda: identity not in self._commits_in_flight, timeout):
                raise KVConnTimeout("an earlier COMMIT_RETRIEVE of these chunks is unanswered")
        for queue in (self.unsettled_retrieve_commits, self.unsettled):
            queue.settle_matching(identity, self.client, self.instance_id, timeout)

    def retrieve(self, spec: TransferSpec, plan: ChunkPlan, prepared: ReplyFuture) -> None:
        """Scatter the chunks PREPARE_RETRIEVE lent into vLLM's blocks, then release them.

        ``prepared`` is the PREPARE_RETRIEVE sent when the step's metadata was bound. Raises
        a ``KVConnError`` (vLLM recomputes) when it failed, the server no longer has every
        chunk (all-or-nothing), or a slot does not match our layout: bytes another layout
        wrote are never read as ours. COMMIT_RETRIEVE only releases the server's read locks,
        so it is sent without waiting for its reply.
        """
        t0 = time.perf_counter()
        try:
            try:
                reply = wait(prepared, Op.PREPARE_RETRIEVE, self.config.transfer_timeout)
            except KVConnError as exc:
                self.unsettled.add(plan.key, exc)  # no COMMIT follows: release the locks later
                raise
            if not reply.success:
                raise KVConnProtocolError("the server no longer has every chunk")
            try:
                self._scatter_reply(plan, reply)
            finally:
                self._commit_retrieve(plan.key)  # even after a failed scatter
        except KVConnError as exc:
            if not isinstance(exc, KVConnProtocolError):
                self.failed(exc)
            raise
        nbytes = plan.nchunks * math.prod(plan.shape) * self._itemsize()
        self.stats.record("loaded_chunks", plan.nchunks)
        self.stats.record("loaded_bytes", nbytes)
        self.stats.record("load_seconds", time.perf_counter() - t0)

    def _scatter_reply(self, plan: ChunkPlan, reply: Any) -> None:
        pool, nchunks, shape = plan.pool, plan.nchunks, plan.shape
        if pool is None:
            from kvconn_plugin.client import pickle_codec

            sources = pickle_codec.decode_chunks(reply.data, nchunks, shape, self.dtype_name)
        else:
            if pool is not self.pool:
                raise KVConnUnavailable("the server's SHM pool changed (server restarted)")
            slots = reply.context.slots
            if len(slots) != nchunks:
                raise KVConnProtocolError(
                    f"prepare_retrieve: {len(slots)} slots for {nchunks} chunks")
            sources = [pool.slot_view(s, shape, self.dtype_name) for s in slots]
        with self.xfer_lock:
            for ci, src in enumerate(sources):
                self.copier.scatter(src, plan.chunk_blocks(ci), plan.chunk_skips(ci))
            self.copier.synchronize()

    # ------------------------------------------------------------------ shutdown

    def close(self) -> None:
        self._heartbeat_task.stop()
        with self._reg_lock:
            if self.healthy:
                with contextlib.suppress(KVConnError):
                    self.client.unregister_engine_driven(self.instance_id, timeout=1.0)
            if self.pool is not None:
                self._unpin(self.pool)
                self.pool.close()
                self.pool = None
        self.client.close()
