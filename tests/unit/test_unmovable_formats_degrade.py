"""A KV cache format the connector cannot move costs the cache, never the engine.

Both roles receive the same vllm_config and kv_cache_config: the scheduler side then looks
nothing up (it does not even contact the server), the worker side registers nothing, one
warning names the format, and vLLM's real Scheduler serves requests as without a connector.
A format only the registered tensors reveal degrades the same way on the worker.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import pytest

from kvconn_plugin.config import parse_config
from kvconn_plugin.connector import KVConnPluginConnector
from kvconn_plugin.disabled import DisabledScheduler, DisabledWorker
from kvconn_plugin.metadata import KVConnMetadata, TransferSpec
from kvconn_plugin.parallel import kv_ranks
from kvconn_plugin.worker.adapter import WorkerAdapter
from tests.conftest import free_port
from tests.helpers import kv_views
from tests.helpers.connector_config import CONNECTOR, MODULE_PATH, server_extra_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")

UNMOVABLE = "EAGLE3 draft"  # layers of two shapes: refused by every copy


@pytest.fixture
def records() -> Iterator[list[logging.LogRecord]]:
    """Our log records (vLLM's handlers may stop propagation to the root logger)."""
    got: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = got.append  # type: ignore[method-assign]
    pkg = logging.getLogger("kvconn_plugin")
    old = pkg.level
    pkg.addHandler(handler)
    pkg.setLevel(logging.INFO)
    yield got
    pkg.removeHandler(handler)
    pkg.setLevel(old)


def _config(eagle3_dir=None):
    """Our connector aimed at a port nobody listens on; with ``eagle3_dir``, a real EAGLE3
    speculative config whose tiny drafter has twice the target's KV heads."""
    import json

    from vllm.config import SpeculativeConfig, VllmConfig

    from kvconn_plugin.tools.tiny_model import PRESETS, write_tiny_llama
    from tests.helpers.sched_harness import make_vllm_config

    url = f"tcp://127.0.0.1:{free_port()}"  # nothing may try to reach it
    cfg = make_vllm_config(connector=CONNECTOR, module_path=MODULE_PATH,
                           extra_config=server_extra_config(url, **{
                               "kvconn.connect_timeout": 60}))
    if eagle3_dir is None:
        return cfg
    small = PRESETS["small"]
    draft = write_tiny_llama(eagle3_dir, **{**small, "num_layers": 1,
                                            "num_kv_heads": 2 * small["num_kv_heads"]})
    conf = json.loads((draft / "config.json").read_text())
    conf["architectures"] = ["LlamaForCausalLMEagle3"]
    (draft / "config.json").write_text(json.dumps(conf))
    spec = SpeculativeConfig(method="eagle3", model=str(draft), num_speculative_tokens=2,
                             target_model_config=cfg.model_config,
                             target_parallel_config=cfg.parallel_config)
    return VllmConfig(model_config=cfg.model_config, scheduler_config=cfg.scheduler_config,
                      cache_config=cfg.cache_config, kv_transfer_config=cfg.kv_transfer_config,
                      device_config=cfg.device_config, speculative_config=spec)


def test_scheduler_serves_without_the_cache_on_the_real_scheduler(records, tmp_path):
    from vllm.v1.core.kv_cache_utils import generate_scheduler_kv_cache_config
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.structured_output import StructuredOutputManager

    from kvconn_plugin import kv_formats
    from tests.helpers.sched_harness import make_request, run_until_idle, step

    cfg = _config(eagle3_dir=tmp_path / "eagle3-draft")
    specs, _, _ = kv_views.FORMATS[UNMOVABLE]()
    # vLLM hands the scheduler one representative layer spec, not the per-layer specs the
    # workers get: only the engine config (the drafter's shape) tells the scheduler side.
    kv_cfg = generate_scheduler_kv_cache_config([kv_views.kv_cache_config(specs, 200)])
    assert kv_formats.check_kv_cache_config(_config(), kv_cfg).ok
    cfg.cache_config.num_gpu_blocks = 200
    sched = Scheduler(vllm_config=cfg, kv_cache_config=kv_cfg,
                      structured_output_manager=StructuredOutputManager(cfg),
                      block_size=kv_views.BLOCK, hash_block_size=kv_views.BLOCK, log_stats=True)
    conn = sched.get_kv_connector()
    assert isinstance(conn, KVConnPluginConnector)
    assert isinstance(conn._scheduler, DisabledScheduler)
    warnings = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "serving without the KV cache" in warnings[0], warnings
    assert "eagle3 drafter has 4 KV heads" in warnings[0]

    sched.add_request(make_request("r1", list(range(10, 300)), block_size=kv_views.BLOCK))
    so, _ = step(sched)
    assert so.num_scheduled_tokens.get("r1"), "scheduled at once: no lookup to wait for"
    assert so.kv_connector_metadata.loads == [] and so.kv_connector_metadata.stores == []
    run_until_idle(sched)
    assert conn.reset_cache() is True
    conn.shutdown()


def test_worker_registers_nothing_and_fails_any_load(records):
    cfg = _config()
    specs, _, _ = kv_views.FORMATS[UNMOVABLE]()
    conn = KVConnPluginConnector(cfg, _worker_role(), kv_views.kv_cache_config(specs))
    assert isinstance(conn._worker, DisabledWorker)
    conn.register_kv_caches(kv_views.allocate(specs))
    conn.unregister_kv_caches()
    conn.restore_kv_caches()
    spec = TransferSpec(request_id="r", token_ids=(1,) * 256, start=0, end=256,
                        block_ids=tuple(range(16)), skip_blocks=2)
    conn.bind_connector_metadata(KVConnMetadata(loads=[spec]))
    conn.start_load_kv(None)
    conn.wait_for_save()
    conn.clear_connector_metadata()
    # Failed by request (vLLM accepts that for any number of KV cache groups).
    assert conn.get_transfer_results(set()).failed_recving == {"r"}
    assert conn.get_block_ids_with_load_errors() == set()
    assert not [r for r in records if r.levelno >= logging.WARNING]  # the scheduler warns
    conn.shutdown()


def _worker_role():
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    return KVConnectorRole.WORKER


@pytest.mark.parametrize("name", ["MLA + indexer", "int8 per token-head", "nvfp4"])
def test_tensors_the_copy_cannot_move_degrade_the_worker(name, records):
    """The worker's own check of the registered views (config checks can miss a format)."""
    from kvconn_plugin import kv_formats

    specs, head_size, mla = kv_views.FORMATS[name]()
    if kv_formats.check_kv_caches(kv_views.allocate(specs), head_size=head_size,
                                  use_mla=mla).ok:
        pytest.skip(f"{name} is movable by this build's copy")
    url = f"tcp://127.0.0.1:{free_port()}"
    adapter = WorkerAdapter(
        parse_config(server_extra_config(url)), model_name="m",
        ranks=kv_ranks(mla=mla, world_size=1, rank=0, tp_size=1), block_size=kv_views.BLOCK,
        head_size=head_size, kv_split="mla" if mla else "fused")
    try:
        adapter.register_kv_caches(kv_views.allocate(specs))
        assert adapter.session is None
        msgs = [r.getMessage() for r in records if r.levelno == logging.WARNING]
        assert len(msgs) == 1 and "serving without the KV cache" in msgs[0], msgs
        spec = TransferSpec(request_id="r", token_ids=(1,) * 256, start=0, end=256,
                            block_ids=tuple(range(16)))
        adapter.start_transfers(KVConnMetadata(loads=[spec]))
        adapter.wait_for_save(KVConnMetadata(stores=[spec]))
        adapter.unregister_kv_caches()
        adapter.restore_kv_caches()
        for _ in range(500):
            _, done = adapter.get_finished(set())
            if done:
                break
            import time

            time.sleep(0.01)
        assert done == {"r"} and adapter.get_block_ids_with_load_errors() == set(range(16))
    finally:
        adapter.shutdown()
