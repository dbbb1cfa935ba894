"""Worker-side half of the connector (runs in every vLLM worker process, one per TP x PP rank).

Stores run in ``wait_for_save``, after the step's forward, synchronously: the blocks are
copied into the server's SHM slots before vLLM can free or reuse them. Loads run on one
background thread per worker so the engine keeps stepping; vLLM holds the request in
WAITING_FOR_REMOTE_KVS until ``get_finished`` reports it. Every failure becomes either a
dropped store or a load error (vLLM recomputes); nothing raises into the engine.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from kvconn_plugin.client.api import LMCacheClient
from kvconn_plugin.config import KVConnConfig
from kvconn_plugin.errors import KVConnError, KVConnTransferError
from kvconn_plugin.kv_formats import check_kv_caches
from kvconn_plugin.metadata import KVConnMetadata, TransferSpec
from kvconn_plugin.parallel import KVRanks
from kvconn_plugin.stats import KVConnStats
from kvconn_plugin.utils import RateLimitedLog
from kvconn_plugin.worker.session import ServerSession

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)
_warn = RateLimitedLog(logger, interval=30.0)


class WorkerAdapter:
    """Args:
        config: validated connector config.
        model_name: cache namespace.
        ranks: this rank's KV identity.
        block_size: vLLM manager block size in tokens.
        use_mla: the model stores one latent plane per token.
        head_size: per-head size in elements (the K/V split point).
        kv_split: how K and V sit in vLLM's packed content dim: "packed" (GPU backends),
            "planes" (vLLM's CPU attention backend) or "mla".
        client_factory: injected for tests.
    """

    def __init__(
        self,
        config: KVConnConfig,
        *,
        model_name: str,
        ranks: KVRanks,
        block_size: int,
        use_mla: bool,
        head_size: int,
        kv_split: str,
        client_factory: Any = None,
    ):
        self.config = config
        self.model_name = model_name
        self.ranks = ranks
        self.block_size = block_size
        self.use_mla = use_mla
        self.head_size = head_size
        self.kv_split = kv_split
        self._client_factory = client_factory or (
            lambda url: LMCacheClient(
                url, control_timeout=config.control_timeout,
                transfer_timeout=config.transfer_timeout,
            )
        )
        self.session: ServerSession | None = None
        self.stats = KVConnStats()
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvconn-load")
        self._loads: dict[str, Future] = {}
        self._load_errors: set[int] = set()
        self._done_recving: set[str] = set()
        self._lock = threading.Lock()
        self._autostarted: Any = None
        self._views: list[torch.Tensor] = []
        self._asleep: Any = None  # the stand-in copy engine while vLLM sleeps

    # ------------------------------------------------------------------ start-up

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Describe vLLM's paged KV, connect and register with the server (worker process)."""
        from kvconn_plugin import ops
        from kvconn_plugin.server.autostart import maybe_autostart

        views = list(kv_caches.values())
        try:
            fmt = check_kv_caches(kv_caches, head_size=self.head_size, use_mla=self.use_mla)
            if not fmt.ok:
                raise KVConnTransferError(fmt.reason or "")
            layout, transfer = self._bind(views)
        except Exception as exc:  # KVConnTransferError, or a bug in the checks themselves
            # A cache we cannot move costs the cache, not the engine: loads then fail
            # (vLLM recomputes) and stores are skipped.
            logger.warning("kvconn: worker %d cannot move this KV cache (%s); serving without "
                           "the KV cache", self.ranks.worker_id, exc)
            return
        self._views = views
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
            layout=layout,
            transfer=transfer,
            manager_block_size=self.block_size,
            use_mla=self.use_mla,
            dtype_name=str(views[0].dtype).removeprefix("torch."),
            stats=self.stats,
        )
        self.session.connect()
        s = self.session
        path = ("engine-driven SHM pool" if s.pool is not None else
                "engine-driven pickled chunks" if s.healthy else "none yet (server unavailable)")
        logger.info(
            "kvconn: worker %d ready: impl=builtin server=%s chunk=%s transfer=%s "
            "kernels=%s layout=%s layers=%d",
            self.ranks.worker_id, url, s.chunk_size, path, ops.BACKEND, self.kv_split,
            layout.num_layers,
        )

    def _bind(self, views: list[torch.Tensor]) -> tuple[Any, Any]:
        """Geometry and copy engine for vLLM's views (registration and wake-up)."""
        from kvconn_plugin import ops

        layout = ops.layout_from_vllm_views(views, self.head_size, self.kv_split)
        return layout, ops.KVTransfer(layout, views)

    def unregister_kv_caches(self) -> None:
        """vLLM sleep: stop touching the KV memory before it is unmapped (idempotent)."""
        from kvconn_plugin.worker import sleep

        if self.session is not None and self._asleep is None:
            self._asleep = sleep.suspend(self.session, self._views)

    def restore_kv_caches(self) -> None:
        """vLLM wake-up: bind the KV views again, every pointer re-checked (idempotent)."""
        from kvconn_plugin.worker import sleep

        stub, self._asleep = self._asleep, None
        if self.session is not None and stub is not None and not sleep.resume(
                self.session, stub, self._views, self._bind):
            self._asleep = stub  # stays refusing: the cache is off on this worker

    # ------------------------------------------------------------------ per step

    def start_load_kv(self, meta: KVConnMetadata) -> None:
        """Queue this step's loads on the load thread (worker process)."""
        for spec in meta.loads:
            fut = self._loader.submit(self._load_one, spec)
            with self._lock:
                self._loads[spec.request_id] = fut

    def _load_one(self, spec: TransferSpec) -> bool:
        session = self.session
        ok = False
        if session is not None and self.config.load:
            try:
                ok = session.retrieve(spec)
            except KVConnError as exc:
                _warn.warning("load", "kvconn: load of %s failed (%s); vLLM recomputes it",
                              spec.request_id, exc)
            except Exception:  # a bug here must not kill the engine
                logger.exception("kvconn: unexpected error loading %s", spec.request_id)
        if not ok:
            self.stats.record("load_failures")
            with self._lock:
                self._load_errors.update(spec.block_ids[spec.skip_blocks:])
        return ok

    def wait_for_save(self, meta: KVConnMetadata) -> None:
        """Copy this step's finished chunks into the server (worker process)."""
        session = self.session
        if session is None or not meta.stores or not self.ranks.is_writer:
            return
        for spec in meta.stores:
            try:
                session.store(spec)
            except KVConnError as exc:
                self.stats.record("store_failures")
                _warn.warning("store", "kvconn: store of %s dropped (%s)", spec.request_id, exc)
            except Exception:
                self.stats.record("store_failures")
                logger.exception("kvconn: unexpected error storing %s", spec.request_id)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """Report finished loads (failed ones too: their blocks are in the load errors).

        A request aborted mid-load is still reported here; that is what lets vLLM free the
        blocks it kept for us. Stores are synchronous, so nothing is ever "sending".
        """
        recving: set[str] = set()
        with self._lock:
            for req_id, fut in list(self._loads.items()):
                if fut.done():
                    del self._loads[req_id]
                    recving.add(req_id)
        return None, recving or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        with self._lock:
            errors, self._load_errors = self._load_errors, set()
        return errors

    def get_stats(self) -> KVConnStats | None:
        return self.stats.take()

    def shutdown(self) -> None:
        self._loader.shutdown(wait=True, cancel_futures=True)
        if self.session is not None:
            self.session.close()
            self.session = None
        if self._autostarted is not None:
            self._autostarted.stop()
            self._autostarted = None

