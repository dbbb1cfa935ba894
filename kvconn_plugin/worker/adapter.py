"""Worker-side half of the connector (runs in every vLLM worker process, one per TP x PP rank).

Each step's transfers start when vLLM binds the step's metadata, before the forward:
PREPARE_STORE for the stores, and the loads (PREPARE_RETRIEVE, then the copy on a background
thread, so a hit's KV can land while this step's forward runs). Stores copy vLLM's blocks in
``wait_for_save`` and finish in the background (``store_pipeline``); loads are reported
through ``get_finished`` and vLLM keeps the request in WAITING_FOR_REMOTE_KVS until then.
No hook waits on the network. Every failure becomes a dropped store or a failed load that
vLLM recomputes; nothing raises into the engine.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from kvconn_plugin.client.api import LMCacheClient
from kvconn_plugin.client.reply_future import ReplyFuture
from kvconn_plugin.config import KVConnConfig
from kvconn_plugin.errors import KVConnError, KVConnProtocolError, KVConnTransferError
from kvconn_plugin.kv_formats import check_kv_caches
from kvconn_plugin.kv_groups import SINGLE, KVGroups
from kvconn_plugin.metadata import KVConnMetadata, TransferSpec
from kvconn_plugin.parallel import KVRanks
from kvconn_plugin.stats import KVConnStats
from kvconn_plugin.store_acks import StoreAckRecorder
from kvconn_plugin.utils import RateLimitedLog
from kvconn_plugin.worker.chunk_copy import ChunkCopier, GroupCopy
from kvconn_plugin.worker.session import ChunkPlan, ServerSession
from kvconn_plugin.worker.settle_queue import key_identity, server_identity
from kvconn_plugin.worker.store_pipeline import PendingStore, StorePipeline

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)
_warn = RateLimitedLog(logger, interval=30.0)

_DONE: Future = Future()
_DONE.set_result(None)


class WorkerAdapter:
    """Args:
        config: validated connector config.
        model_name: cache namespace.
        ranks: this rank's KV identity.
        block_size: vLLM manager block size in tokens.
        head_size: per-head size in elements (the K/V split point of the split layouts).
        kv_split: how chunks are laid out: "fused" (each head's whole content per token as
            opaque bytes, LMCache's own object layout; the default), "mla" (the same with
            one latent head), or the K/V-splitting "packed" / "planes" layouts.
        groups: the KV cache groups the cache moves (several for a hybrid model).
        client_factory: injected for tests.
    """

    def __init__(
        self,
        config: KVConnConfig,
        *,
        model_name: str,
        ranks: KVRanks,
        block_size: int,
        head_size: int,
        kv_split: str = "fused",
        groups: KVGroups = SINGLE,
        client_factory: Any = None,
    ):
        self.config = config
        self.model_name = model_name
        self.ranks = ranks
        self.block_size = block_size
        self.head_size = head_size
        self.kv_split = kv_split
        self.groups = groups
        self._client_factory = client_factory or (
            lambda url: LMCacheClient(
                url, control_timeout=config.control_timeout,
                transfer_timeout=config.transfer_timeout, heartbeat=config.heartbeat_interval,
            )
        )
        self.session: ServerSession | None = None
        self.stores: StorePipeline | None = None
        self.stats = KVConnStats()
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvconn-load")
        self._loads: dict[str, Future] = {}
        # Loads and read-lock settles in flight by server key identity (see _begin_loads).
        self._held: dict[tuple, Future] = {}
        self._settling: dict[int, Future] = {}  # per settle queue, the one queued
        self._load_errors: set[int] = set()
        self._failed_loads: set[str] = set()
        self._lock = threading.Lock()
        self._autostarted: Any = None
        # Metadata whose transfers were started, and the stores it began.
        self._started: KVConnMetadata | None = None
        self._begun: list[PendingStore] = []
        self._kv_caches: dict[str, torch.Tensor] = {}
        self._asleep: Any = None  # the stand-in copier while vLLM sleeps
        # Set by the connector when vLLM publishes KV events: each settled store is
        # reported to the scheduler with the chunks it committed (``store_acks``).
        self.acks: StoreAckRecorder | None = None

    # ------------------------------------------------------------------ start-up

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Describe vLLM's paged KV, connect and register with the server (worker process)."""
        from kvconn_plugin import ops
        from kvconn_plugin.server.autostart import maybe_autostart

        try:
            if self.groups.unsupported:
                raise KVConnTransferError(self.groups.unsupported)
            fmt = check_kv_caches(kv_caches, head_size=self.head_size,
                                  use_mla=self.kv_split == "mla")
            if not fmt.ok:
                raise KVConnTransferError(fmt.reason or "")
            copier = self._bind(kv_caches)
        except Exception as exc:  # KVConnTransferError, or a bug in the checks themselves
            # A cache we cannot move costs the cache, not the engine: loads then fail
            # (vLLM recomputes) and stores are skipped.
            logger.warning("kvconn: worker %d cannot move this KV cache (%s); serving without "
                           "the KV cache", self.ranks.worker_id, exc)
            return
        self._kv_caches = dict(kv_caches)
        url = self.config.server_urls[self.ranks.server_index]
        try:
            self._autostarted = maybe_autostart(self.config, url, rank=self.ranks.worker_id)
        except KVConnError as exc:
            if self.config.require_server:
                raise
            logger.warning("kvconn: %s; serving without the cache", exc)
        self.session = ServerSession(
            client=self._client_factory(url),
            config=self.config,
            model_name=self.model_name,
            ranks=self.ranks,
            copier=copier,
            windowed=self.groups.windowed,
            manager_block_size=self.block_size,
            dtype_name=str(next(iter(kv_caches.values())).dtype).removeprefix("torch."),
            stats=self.stats,
        )
        self.session.run_read_settle = self._run_read_settle
        self.stores = StorePipeline(self.session, self.config.store_staging_mb * 2**20,
                                    acks=self.acks)
        self.session.connect()
        s = self.session
        path = ("engine-driven SHM pool" if s.pool is not None else
                "engine-driven pickled chunks" if s.healthy else "none yet (server unavailable)")
        logger.info(
            "kvconn: worker %d ready: impl=builtin server=%s chunk=%s transfer=%s "
            "kernels=%s layout=%s layers=%d groups=%s",
            self.ranks.worker_id, url, s.chunk_size, path, ops.BACKEND, self.kv_split,
            copier.num_layers, self.groups.describe(),
        )

    def _bind(self, kv_caches: dict[str, torch.Tensor]) -> ChunkCopier:
        """One transfer per KV cache group over its layers, in object order (registration
        and wake-up: every layer's geometry and pointers are checked here)."""
        from kvconn_plugin import ops

        if not self.groups.groups:
            names = [list(kv_caches)]
        else:
            names = [list(g.layer_names) for g in self.groups.groups]
            missing = [n for g in names for n in g if n not in kv_caches]
            if missing:
                raise KVConnTransferError(f"vLLM registered no KV cache for layers {missing[:4]}")
        parts, first = [], 0
        for group in names:
            views = [kv_caches[n] for n in group]
            layout = ops.layout_from_vllm_views(views, self.head_size, self.kv_split)
            parts.append(GroupCopy(ops.KVTransfer(layout, views), first, len(views)))
            first += len(views)
        return ChunkCopier(parts)

    def unregister_kv_caches(self) -> None:
        """vLLM sleep: stop touching the KV memory before it is unmapped (idempotent)."""
        from kvconn_plugin.worker import sleep

        if self.session is not None and self._asleep is None:
            self._asleep = sleep.suspend(self.session, self._kv_caches)

    def restore_kv_caches(self) -> None:
        """vLLM wake-up: bind the KV views again, every pointer re-checked (idempotent)."""
        from kvconn_plugin.worker import sleep

        stub, self._asleep = self._asleep, None
        if self.session is not None and stub is not None and not sleep.resume(
                self.session, stub, self._kv_caches, self._bind):
            self._asleep = stub  # stays refusing: the cache is off on this worker

    # ------------------------------------------------------------------ per step

    def start_transfers(self, meta: KVConnMetadata) -> None:
        """Start this step's loads and stores when vLLM binds the metadata (worker process,
        before the forward). Never blocks; idempotent per metadata object."""
        if meta is self._started:
            return
        self._started = meta
        self._begin_loads(meta.loads)
        stores = self.stores
        if stores is not None and meta.stores and self.ranks.is_writer and self.config.store:
            self._begun.extend(stores.begin(meta.stores))

    def _begin_loads(self, specs: list[TransferSpec]) -> None:
        for spec in specs:
            plan: ChunkPlan | None = None
            prepared: ReplyFuture | None = None
            error: KVConnError | None = None
            session = self.session
            # LMCache parks a retrieve's read locks under (instance, key) and leaves the
            # request id out of the key's identity: a PREPARE of the same tokens and range
            # before the earlier COMMIT is applied takes over its entry, and the earlier
            # lookup's locks are never released. Such a load sends its PREPARE from the
            # loader (which runs loads and settles in order), once every earlier release of
            # that identity has been answered (ServerSession.settle_owed).
            ident = server_identity(spec.token_ids, spec.start, spec.end, spec.cache_salt)
            with self._lock:  # the heartbeat holds keys too (_run_read_settle)
                held = self._held.get(ident)
            deferred = ((held is not None and not held.done())
                        or (session is not None and session.owes(ident)))
            if session is None or not self.config.load:
                error = KVConnError("loading is off or the cache is unavailable")
            else:
                try:
                    plan = session.plan(spec)
                    if not deferred:
                        prepared = session.client.prepare_retrieve_async(plan.key,
                                                                         session.instance_id)
                except KVConnError as exc:
                    error = exc
                    if not isinstance(exc, KVConnProtocolError):
                        # The lookup's read locks on this range stay until a COMMIT_RETRIEVE.
                        session.unsettled.add(plan.key if plan else session.key(spec), exc)
            fut = self._loader.submit(self._load_one, spec, plan, prepared, error)
            with self._lock:
                self._hold([ident], fut)
                self._loads[spec.request_id] = fut

    def _hold(self, idents: list[tuple], fut: Future) -> None:
        """Under ``_lock``: these server keys are busy until ``fut`` is done."""
        self._held = {k: f for k, f in self._held.items() if not f.done()}
        for ident in idents:
            self._held[ident] = fut

    def _run_read_settle(self, queue, settle) -> None:
        """From the heartbeat: a settle re-sends PREPARE/COMMIT_RETRIEVE of its keys, which
        would meet a load of the same key in flight the same way two loads did (see
        _begin_loads). It runs on the loader, in order with the loads, and a load of one of
        its keys waits for it. The heartbeat does not wait for it (a load may hold the
        loader up to the transfer timeout); one settle per queue is queued at a time."""
        keys = queue.keys()
        with self._lock:
            if not self._settling.get(id(queue), _DONE).done():
                return
            try:
                fut = self._loader.submit(settle)
            except RuntimeError:  # shutting down
                return
            self._settling[id(queue)] = fut
            self._hold([key_identity(k) for k in keys], fut)

    def _load_one(self, spec: TransferSpec, plan: ChunkPlan | None, prepared: ReplyFuture | None,
                  error: KVConnError | None) -> bool:
        session = self.session
        ok = False
        try:
            if error is None and prepared is None and plan is not None and session is not None:
                try:  # deferred behind an earlier load or release of the same key
                    session.settle_owed(key_identity(plan.key),
                                        2 * self.config.heartbeat_interval)
                    prepared = session.client.prepare_retrieve_async(plan.key,
                                                                     session.instance_id)
                except KVConnError as exc:
                    if not isinstance(exc, KVConnProtocolError):
                        session.unsettled.add(plan.key, exc)
                    raise
            if error is not None:
                raise error
            if session is None or plan is None or prepared is None:
                raise KVConnError("the cache is unavailable")
            session.retrieve(spec, plan, prepared)
            ok = True
        except KVConnError as exc:
            _warn.warning("load", "kvconn: load of %s failed (%s); vLLM recomputes it",
                          spec.request_id, exc)
        except Exception:  # a bug here must not kill the engine
            logger.exception("kvconn: unexpected error loading %s", spec.request_id)
        if not ok:
            self.stats.record("load_failures")
            with self._lock:
                # vLLM maps block ids back to requests only with one KV cache group; a
                # hybrid's failures are reported by request (failed_recving).
                if self.groups.hybrid:
                    self._failed_loads.add(spec.request_id)
                else:
                    self._load_errors.update(spec.block_ids[spec.skip_blocks:])
        return ok

    def start_load_kv(self, meta: KVConnMetadata) -> None:
        """vLLM's hook; the loads started at bind time already (see start_transfers)."""
        self.start_transfers(meta)

    def wait_for_save(self, meta: KVConnMetadata) -> None:
        """Copy this step's stored chunks out of vLLM's blocks (worker process); the network
        legs of each store finish in the background."""
        self.start_transfers(meta)
        begun, self._begun = self._begun, []
        if begun and self.stores is not None:
            self.stores.copy(begun)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """Report finished loads (failed ones too: their blocks are in the load errors).

        A request aborted mid-load is still reported here; that is what lets vLLM free the
        blocks it kept for us. Stores never keep blocks, so nothing is ever "sending".
        """
        recving: set[str] = set()
        with self._lock:
            for req_id, fut in list(self._loads.items()):
                if fut.done():
                    del self._loads[req_id]
                    recving.add(req_id)
        return None, recving or None

    def take_failed_loads(self, finished: set[str]) -> set[str]:
        """Ids among ``finished`` (just reported) whose load failed (hybrid models)."""
        with self._lock:
            failed = self._failed_loads & finished
            self._failed_loads -= failed
        return failed

    def get_block_ids_with_load_errors(self) -> set[int]:
        with self._lock:
            errors, self._load_errors = self._load_errors, set()
        return errors

    def wait_stores_idle(self, timeout: float = 30.0) -> bool:
        """Until every store begun so far has settled (tests, benchmarks)."""
        return self.stores is None or self.stores.wait_idle(timeout)

    def get_stats(self) -> KVConnStats | None:
        return self.stats.take()

    def shutdown(self) -> None:
        self._loader.shutdown(wait=True, cancel_futures=True)
        if self.stores is not None:
            self.stores.wait_idle(timeout=min(5.0, self.config.transfer_timeout))
            self.stores.close()
        if self.session is not None:
            self.session.close()
            self.session = None
        if self._autostarted is not None:
            self._autostarted.stop()
            self._autostarted = None
