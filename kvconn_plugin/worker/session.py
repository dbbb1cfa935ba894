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
from typing import Any

from kvconn_plugin.client.api import LMCacheClient, new_instance_id
from kvconn_plugin.client.protocol import CacheKey, RegisterEngineDrivenPayload
from kvconn_plugin.client.shm_pool import ShmPool
from kvconn_plugin.config import KVConnConfig
from kvconn_plugin.errors import KVConnError, KVConnProtocolError, KVConnTimeout, KVConnUnavailable
from kvconn_plugin.metadata import TransferSpec
from kvconn_plugin.parallel import KVRanks
from kvconn_plugin.stats import KVConnStats
from kvconn_plugin.utils import PeriodicTask, RateLimitedLog

logger = logging.getLogger(__name__)
_warn = RateLimitedLog(logger, interval=30.0)


class ServerSession:
    def __init__(
        self,
        *,
        client: LMCacheClient,
        config: KVConnConfig,
        model_name: str,
        ranks: KVRanks,
        layout: Any,
        transfer: Any,
        manager_block_size: int,
        use_mla: bool,
        dtype_name: str,
        stats: KVConnStats,
    ):
        self.client = client
        self.config = config
        self.model_name = model_name
        self.ranks = ranks
        self.layout = layout
        self.transfer = transfer
        self.use_mla = use_mla
        self.dtype_name = dtype_name
        self.stats = stats
        self.instance_id = new_instance_id()
        self.manager_block_size = manager_block_size
        # vLLM may split a manager block into several kernel blocks (dim 0 of the views).
        self.block_ratio = max(1, manager_block_size // layout.block_size)
        self.chunk_size: int | None = None
        self.pool: ShmPool | None = None
        self.healthy = False
        self.disabled_reason: str | None = None
        self._reg_lock = threading.Lock()
        # Store (engine thread) and load (load thread) may overlap; their copies share the
        # transfer object and its stream, so only the copy sections are serialized.
        self._xfer_lock = threading.Lock()
        self._heartbeat_task = PeriodicTask("kvconn-worker-health", config.heartbeat_interval,
                                            self._heartbeat)

    # ------------------------------------------------------------------ registration

    def connect(self) -> None:
        """Register now if a server answers; otherwise degrade and keep retrying."""
        try:
            self._register(wait=self.config.connect_timeout)
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

    def _register(self, wait: float) -> None:
        with self._reg_lock:
            chunk = self.client.get_chunk_size(timeout=wait)
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
                num_layers=lay.num_layers,
                hidden_dim_size=lay.num_heads * lay.run_bytes // self._itemsize(),
                dtype_str=self.dtype_name,
                use_mla=self.use_mla,
                num_physical_slots=chunk,
            )
            reply = self.client.register_engine_driven(payload, timeout=wait)
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

    def swap_transfer(self, transfer: Any) -> Any:
        """Replace the copy engine between two copies (vLLM sleep mode); returns the old one.
        Every copy runs under ``_xfer_lock`` and waits for its own completion there."""
        with self._xfer_lock:
            old, self.transfer = self.transfer, transfer
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
                self._register(wait=interval)
                logger.info("kvconn: re-registered with LMCache server at %s", self.client.url)
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

    def _failed(self, exc: Exception) -> None:
        """A transfer call failed: let the heartbeat check the server right away."""
        self.stats.record("server_errors")
        if isinstance(exc, KVConnUnavailable) or "no reply" in str(exc):
            self.healthy = False
            self.stats.set_degraded(True)
        self._heartbeat_task.poke()

    # ------------------------------------------------------------------ transfers

    def _key(self, spec: TransferSpec) -> CacheKey:
        return CacheKey(
            model_name=self.model_name,
            world_size=self.ranks.world_size,
            worker_id=self.ranks.worker_id,
            token_ids=list(spec.token_ids),
            start=spec.start,
            end=spec.end,
            request_id=spec.request_id,
            cache_salt=spec.cache_salt,
            num_kv_readers=self.ranks.num_kv_readers,
        )

    def _chunk_geometry(self, spec: TransferSpec) -> tuple[int, int, tuple[int, ...]]:
        """(chunks, kernel blocks per chunk, slot shape), after checking the spec."""
        chunk = self.chunk_size
        if chunk is None or not self.healthy:
            raise KVConnUnavailable(f"LMCache server at {self.client.url} is not usable now")
        span = spec.end - spec.start
        if span <= 0 or spec.start % chunk or span % chunk:
            raise KVConnProtocolError(f"range [{spec.start}, {spec.end}) is not whole chunks")
        nchunks = span // chunk
        if len(spec.block_ids) * self.manager_block_size != span:
            raise KVConnProtocolError(f"{len(spec.block_ids)} blocks for {span} tokens")
        if len(spec.token_ids) < spec.end:
            raise KVConnProtocolError("token ids shorter than the range")
        lay = self.layout
        hidden = lay.num_heads * lay.run_bytes // self._itemsize()
        shape = ((lay.num_layers, chunk, hidden) if self.use_mla
                 else (2, lay.num_layers, chunk, hidden))
        return nchunks, chunk // lay.block_size, shape

    def _kernel_blocks(self, block_ids: tuple[int, ...]) -> list[int]:
        r = self.block_ratio
        if r == 1:
            return list(block_ids)
        return [b * r + i for b in block_ids for i in range(r)]

    def store(self, spec: TransferSpec) -> None:
        """PREPARE_STORE, gather into the lent slots, COMMIT_STORE."""
        nchunks, bpc, shape = self._chunk_geometry(spec)
        pool = self.pool  # a re-registration may swap it; keep the one the slots belong to
        key = self._key(spec)
        blocks = self._kernel_blocks(spec.block_ids)
        t0 = time.perf_counter()
        try:
            reply = self.client.prepare_store(key, self.instance_id)
            ctx = reply.context
            if pool is None:
                return self._store_pickled(key, blocks, nchunks, bpc, shape, t0)
            if len(ctx.slots) != len(ctx.chunk_indices):
                raise KVConnProtocolError("prepare_store: slots and chunk indices differ")
            if not ctx.slots:
                return  # everything already cached (or no room): no commit expected
            views = []
            for slot, ci in zip(ctx.slots, ctx.chunk_indices, strict=True):
                if ci >= nchunks:
                    raise KVConnProtocolError(f"prepare_store: chunk index {ci} >= {nchunks}")
                views.append((ci, pool.slot_view(slot, shape, self.dtype_name)))
            with self._xfer_lock:
                for ci, view in views:
                    self.transfer.gather(blocks[ci * bpc:(ci + 1) * bpc], view)
                self.transfer.synchronize()
            ok = self.client.commit_store(key, self.instance_id, b"")
        except KVConnError as exc:
            self._failed(exc)
            raise
        if not ok:
            raise KVConnProtocolError("commit_store refused (reservation expired?)")
        self.stats.record("stored_chunks", len(ctx.slots))
        self.stats.record("stored_bytes", len(ctx.slots) * math.prod(shape) * self._itemsize())
        self.stats.record("store_seconds", time.perf_counter() - t0)

    def _store_pickled(self, key: CacheKey, blocks: list[int], nchunks: int, bpc: int,
                       shape: tuple[int, ...], t0: float) -> None:
        import torch

        from kvconn_plugin.client import pickle_codec

        chunks = []
        with self._xfer_lock:
            for ci in range(nchunks):
                buf = torch.empty(math.prod(shape) * self._itemsize(), dtype=torch.uint8)
                self.transfer.gather(blocks[ci * bpc:(ci + 1) * bpc], buf)
                chunks.append(buf)
            self.transfer.synchronize()
        data = pickle_codec.encode_chunks(chunks, shape, self.dtype_name)
        if not self.client.commit_store(key, self.instance_id, data):
            raise KVConnProtocolError("commit_store (pickled) refused")
        self.stats.record("stored_chunks", nchunks)
        self.stats.record("stored_bytes", len(data))
        self.stats.record("store_seconds", time.perf_counter() - t0)

    def retrieve(self, spec: TransferSpec) -> bool:
        """PREPARE_RETRIEVE, scatter the slots into vLLM's blocks, COMMIT_RETRIEVE.

        Returns False when the server no longer has the chunks (all-or-nothing).
        """
        nchunks, bpc, shape = self._chunk_geometry(spec)
        pool = self.pool
        key = self._key(spec)
        blocks = self._kernel_blocks(spec.block_ids)
        skip = spec.skip_blocks * self.block_ratio
        t0 = time.perf_counter()
        try:
            reply = self.client.prepare_retrieve(key, self.instance_id)
            if not reply.success:
                return False
            try:
                self._scatter_reply(pool, reply, blocks, nchunks, bpc, skip, shape)
            finally:
                # Commit even after a failed scatter: it releases the read locks.
                self.client.commit_retrieve(key, self.instance_id)
        except KVConnError as exc:
            self._failed(exc)
            raise
        self.stats.record("loaded_chunks", nchunks)
        self.stats.record("loaded_bytes", nchunks * math.prod(shape) * self._itemsize())
        self.stats.record("load_seconds", time.perf_counter() - t0)
        return True

    def _scatter_reply(self, pool: ShmPool | None, reply: Any, blocks: list[int], nchunks: int,
                       bpc: int, skip: int, shape: tuple[int, ...]) -> None:
        if pool is None:
            from kvconn_plugin.client import pickle_codec

            sources = pickle_codec.decode_chunks(reply.data, nchunks, shape, self.dtype_name)
        else:
            slots = reply.context.slots
            if len(slots) != nchunks:
                raise KVConnProtocolError(
                    f"prepare_retrieve: {len(slots)} slots for {nchunks} chunks")
            sources = [pool.slot_view(s, shape, self.dtype_name) for s in slots]
        with self._xfer_lock:
            for ci, src in enumerate(sources):
                first = ci * bpc
                local_skip = min(bpc, max(0, skip - first))
                if local_skip == bpc:
                    continue
                self.transfer.scatter(src, blocks[first:first + bpc], skip_blocks=local_skip)
            self.transfer.synchronize()

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
