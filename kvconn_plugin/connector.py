"""``KVConnPluginConnector``: vLLM's entry into kvconn_plugin.

A thin facade: it builds one role adapter (scheduler side in EngineCore, worker side in each
worker process) and forwards every hook to it. All logic lives in
``kvconn_plugin.scheduler`` and ``kvconn_plugin.worker``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorTransferResults,
    SupportsHMA,
)

from kvconn_plugin.config import check_topology, parse_config
from kvconn_plugin.disabled import DisabledScheduler, DisabledWorker
from kvconn_plugin.kv_formats import FormatVerdict, check_kv_cache_config
from kvconn_plugin.kv_groups import KVGroups, describe_groups
from kvconn_plugin.logs import attach_to_vllm_logging
from kvconn_plugin.metadata import KVConnMetadata
from kvconn_plugin.parallel import kv_ranks, num_writers
from kvconn_plugin.scheduler.adapter import SchedulerAdapter
from kvconn_plugin.scheduler.events import OffloadEvents
from kvconn_plugin.stats import KVConnStats
from kvconn_plugin.store_acks import StoreAckBatch, StoreAckRecorder
from kvconn_plugin.worker.adapter import WorkerAdapter

if TYPE_CHECKING:
    from collections.abc import Iterable

    import torch
    from vllm.config import VllmConfig
    from vllm.distributed.kv_events import KVCacheEvent
    from vllm.v1.core.sched.output import SchedulerOutput

logger = logging.getLogger(__name__)


class KVConnPluginConnector(KVConnectorBase_V1, SupportsHMA):
    """Offloads KV cache to, and reuses it from, an external LMCache MP server.

    Args:
        vllm_config: the engine config; ``kv_transfer_config.kv_connector_extra_config``
            carries the ``lmcache.mp.*`` and ``kvconn.*`` keys.
        role: SCHEDULER (EngineCore process) or WORKER (each worker process).
        kv_cache_config: vLLM's KV cache config (optional for older positional callers).
    """

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: Any = None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        attach_to_vllm_logging()
        kvt = vllm_config.kv_transfer_config
        config = parse_config(
            kvt.kv_connector_extra_config,
            offloading_size_gb=getattr(vllm_config.cache_config, "kv_offloading_size", None),
        )
        model = vllm_config.model_config
        pc = vllm_config.parallel_config
        n_servers = len(config.server_urls)
        check_topology(config, world_size=pc.world_size,
                       pipeline_parallel_size=pc.pipeline_parallel_size,
                       data_parallel_size=getattr(pc, "data_parallel_size", 1))
        mla = bool(getattr(model, "use_mla", False))
        # SupportsHMA keeps vLLM's hybrid KV cache manager on; kv_groups says whether every
        # group it creates can be moved (and turns the cache off, not vLLM, when not).
        groups = describe_groups(kv_cache_config)
        model_name = groups.model_name(config.model_name or str(model.model))
        block_size = int(vllm_config.cache_config.block_size)
        self._scheduler: SchedulerAdapter | DisabledScheduler | None = None
        self._worker: WorkerAdapter | DisabledWorker | None = None
        self._events: OffloadEvents | None = None
        self._acks: StoreAckRecorder | None = None
        events_on = _kv_events_enabled(vllm_config, groups)
        try:
            fmt = check_kv_cache_config(vllm_config, kv_cache_config)
        except Exception:  # a bug in the check must not cost the engine; workers check again
            logger.exception("kvconn: the KV format check failed; continuing without it")
            fmt = FormatVerdict()
        if not fmt.ok:
            # One warning per engine (the scheduler's); workers say it at INFO.
            level = logging.WARNING if role == KVConnectorRole.SCHEDULER else logging.INFO
            logger.log(level, "kvconn: cannot move this KV cache (%s); serving without the "
                       "KV cache", fmt.reason)
            if role == KVConnectorRole.SCHEDULER:
                self._scheduler = DisabledScheduler(fmt.reason or "")
            else:
                self._worker = DisabledWorker(fmt.reason or "")
        elif role == KVConnectorRole.SCHEDULER:
            if config.load_failure_policy == "recompute":
                # A failed load must mean "recompute", not a failed request. vLLM reads
                # this right after building the scheduler connector.
                kvt.kv_load_failure_policy = "recompute"
            ranks = kv_ranks(mla=mla, world_size=pc.world_size, rank=0,
                             tp_size=pc.tensor_parallel_size, n_servers=n_servers)
            self._scheduler = SchedulerAdapter(config, model_name=model_name, ranks=ranks,
                                               block_size=block_size, groups=groups)
            if events_on:
                self._events = OffloadEvents(
                    block_size=block_size,
                    writers=num_writers(mla=mla, world_size=pc.world_size,
                                        tp_size=pc.tensor_parallel_size, n_servers=n_servers),
                    hash_block_size=getattr(kv_cache_config, "hash_block_size", None),
                    hashes=config.kv_events_hashes,
                )
                self._events.start_streams(
                    config.server_urls, model_name,
                    interval=config.heartbeat_interval, control_timeout=config.control_timeout,
                )
        else:
            ranks = kv_ranks(mla=mla, world_size=pc.world_size, rank=_global_rank(pc),
                             tp_size=pc.tensor_parallel_size, n_servers=n_servers)
            self._worker = WorkerAdapter(
                config, model_name=model_name, ranks=ranks, block_size=block_size,
                head_size=int(model.get_head_size()), kv_split="mla" if mla else "fused",
                groups=groups,
            )
            if events_on:
                self._acks = self._worker.acks = StoreAckRecorder()

    # ------------------------------------------------------------------ role access

    def _sched(self) -> SchedulerAdapter | DisabledScheduler:
        if self._scheduler is None:
            raise RuntimeError("scheduler-side hook called on a worker-side connector")
        return self._scheduler

    def _work(self) -> WorkerAdapter | DisabledWorker:
        if self._worker is None:
            raise RuntimeError("worker-side hook called on a scheduler-side connector")
        return self._worker

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a best-effort cache: preemption never needs our hand-off

    # ------------------------------------------------------------------ worker side

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self._work().register_kv_caches(kv_caches)

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        """Bind the step's metadata and start its transfers (worker process, before the
        forward): the network round trips then overlap the forward."""
        super().bind_connector_metadata(connector_metadata)
        if isinstance(connector_metadata, KVConnMetadata):
            self._work().start_transfers(connector_metadata)

    @classmethod
    def supports_sleep_mode(cls, kv_transfer_config: Any) -> bool:
        # vLLM's sleep keeps the KV tensors' virtual addresses (it unmaps and re-maps the
        # physical pages); workers stop copying while asleep and re-check the views on wake.
        return True

    def unregister_kv_caches(self) -> None:
        if self._worker is not None:
            self._worker.unregister_kv_caches()

    def restore_kv_caches(self) -> None:
        if self._worker is not None:
            self._worker.restore_kv_caches()

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        meta = self._bound_meta()
        if meta is not None:
            self._work().start_load_kv(meta)

    def handle_preemptions(self, kv_connector_metadata: Any) -> None:
        """Nothing to flush (worker process): a store copies its blocks within the
        ``wait_for_save`` of the step that planned it, before any block can be preempted
        and reused; its network legs never read vLLM's memory."""
        return None

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None  # loads complete before vLLM schedules the request (async loads)

    def save_kv_layer(
        self, layer_name: str, kv_layer: Any, attn_metadata: Any, **kwargs: Any
    ) -> None:
        return None  # whole chunks are saved after the forward, in wait_for_save

    def wait_for_save(self) -> None:
        meta = self._bound_meta()
        if meta is not None:
            self._work().wait_for_save(meta)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        return self._work().get_finished(finished_req_ids)

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        """Finished transfers, and (hybrid models) the loads that failed, by request."""
        sending, recving = self.get_finished(finished_req_ids)
        recving = set(recving or ())
        return KVConnectorTransferResults(
            finished_sending=set(sending or ()), finished_recving=recving,
            failed_recving=self._work().take_failed_loads(recving))

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._work().get_block_ids_with_load_errors()

    def get_kv_connector_kv_cache_events(self) -> StoreAckBatch | None:
        """The stores settled since the last step, for the scheduler side to announce (see
        ``store_acks``); None unless vLLM publishes KV events."""
        return self._acks.take() if self._acks is not None else None

    def _bound_meta(self) -> KVConnMetadata | None:
        if not self.has_connector_metadata():
            return None
        meta = self._get_connector_metadata()
        return meta if isinstance(meta, KVConnMetadata) else None

    # ------------------------------------------------------------------ scheduler side

    def get_num_new_matched_tokens(
        self, request: Any, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        return self._sched().get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        self._sched().update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        sched = self._sched()
        meta = sched.build_connector_meta(scheduler_output)
        if self._events is not None and meta.stores:
            self._events.on_stores_planned(meta.stores, sched.chunk_size)
        return meta

    def on_new_request(self, request: Any) -> None:
        if self._events is not None:
            self._events.watch(request)
        self._sched().on_new_request(request)

    def bind_kv_cache_manager(self, kv_cache_manager: Any) -> None:
        self._sched().bind_kv_cache_manager(kv_cache_manager)

    def update_connector_output(self, connector_output: Any) -> None:
        self._sched().update_connector_output(connector_output)
        if self._events is not None:
            self._events.on_worker_events(getattr(connector_output, "kv_cache_events", None))

    def request_finished(
        self, request: Any, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        """Returns whether vLLM must keep the blocks, and the request's output
        ``kv_transfer_params`` (``cached_token_stats`` when the request asked for them)."""
        if self._events is not None:
            self._events.forget(request.request_id)
        return self._sched().request_finished(request, block_ids)

    def request_finished_all_groups(
        self, request: Any, block_ids: tuple[list[int], ...]
    ) -> tuple[bool, dict[str, Any] | None]:
        """vLLM calls this instead of ``request_finished`` (we are ``SupportsHMA``)."""
        return self.request_finished(request, block_ids)

    def take_events(self) -> Iterable[KVCacheEvent]:
        """KV events of the chunks we offloaded or lost since the last step (medium CPU)."""
        if self._events is None:
            return ()
        return self._events.take()

    def reset_cache(self) -> bool | None:
        """vLLM's reset_prefix_cache(reset_connector=True), sleep, weight updates: whatever
        the server holds was computed with the old weights, so clear it (see
        ``SchedulerAdapter.reset_cache``). None on the worker side, where there is nothing
        to reset."""
        if self._scheduler is None:
            return None
        ok = self._scheduler.reset_cache()
        if self._events is not None:
            self._events.on_reset(ok)
        return ok

    # ------------------------------------------------------------------ both / class level

    def get_kv_connector_stats(self) -> KVConnStats | None:
        adapter = self._scheduler or self._worker
        return adapter.get_stats() if adapter is not None else None

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVConnStats | None:
        return KVConnStats(data=dict(data)) if data is not None else KVConnStats()

    @classmethod
    def build_prom_metrics(cls, vllm_config: Any, metric_types: dict, labelnames: list[str],
                           per_engine_labelvalues: dict[int, list[object]]) -> Any:
        from kvconn_plugin.metrics import KVConnPromMetrics

        return KVConnPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    @classmethod
    def get_required_kvcache_layout(cls, vllm_config: Any) -> str | None:
        return None  # the transfer reads strides, so any block-contiguous layout works

    def shutdown(self) -> None:
        if self._events is not None:
            self._events.close()
        for adapter in (self._scheduler, self._worker):
            if adapter is not None:
                adapter.shutdown()


def _kv_events_enabled(vllm_config: Any, groups: KVGroups) -> bool:
    cfg = getattr(vllm_config, "kv_events_config", None)
    if cfg is None or not getattr(cfg, "enable_kv_cache_events", False):
        return False
    if groups.hybrid:
        # Our objects hold every group of a chunk; vLLM's events are per group. Until that
        # mapping is tested, hybrid models publish vLLM's own GPU events only.
        logger.info("kvconn: no KV events for offloaded chunks of a hybrid model")
        return False
    return True


def _global_rank(pc: Any) -> int:
    try:
        from vllm.distributed.parallel_state import get_pp_group, get_tp_group

        return get_pp_group().rank_in_group * pc.tensor_parallel_size + get_tp_group().rank_in_group
    except Exception:  # single-process setups have no groups
        return int(getattr(pc, "rank", 0) or 0)


def __getattr__(name: str) -> Any:
    # ``kv_connector_module_path="kvconn_plugin.connector"`` with the name vLLM's
    # --kv-offloading-backend lmcache picks: resolve like the registry route does.
    if name == "LMCacheMPConnector":
        from kvconn_plugin.resolver import resolve_connector_class

        return resolve_connector_class()[0]
    raise AttributeError(name)
