"""vLLM sleep mode and cache resets (RLHF loops use both).

Worker side, over plain CPU tensors and a real server: ``unregister_kv_caches`` stops every
copy before vLLM unmaps the KV memory (a copy already running finishes first),
``restore_kv_caches`` binds the views again after re-checking them. Scheduler side, on vLLM's
real Scheduler: ``reset_prefix_cache(reset_connector=True)`` (what sleep and weight updates
call) clears the server, so KV computed with old weights is never loaded again.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from kvconn_plugin.config import parse_config
from kvconn_plugin.metadata import KVConnMetadata, TransferSpec
from kvconn_plugin.parallel import kv_ranks
from kvconn_plugin.worker.adapter import WorkerAdapter
from tests.helpers.connector_config import server_extra_config
from tests.helpers.sched_harness import SchedHarness
from tests.helpers.seed import seed_server

pytestmark = pytest.mark.lmcache_server

CHUNK, BLOCK, LAYERS, HEADS, HEAD, NUM_BLOCKS = 256, 16, 2, 2, 64, 64
MODEL = "kvconn-test/sleep"


@pytest.fixture(scope="module")
def server(lmcache_server_factory):
    return lmcache_server_factory()


class Worker:
    def __init__(self, server):
        self.kv = [torch.zeros(NUM_BLOCKS, HEADS, BLOCK, 2 * HEAD, dtype=torch.bfloat16)
                   for _ in range(LAYERS)]
        self.adapter = WorkerAdapter(
            parse_config(server_extra_config(server.url)), model_name=MODEL,
            ranks=kv_ranks(mla=False, world_size=1, rank=0, tp_size=1), block_size=BLOCK,
            head_size=HEAD)
        self.adapter.register_kv_caches(self.caches())
        assert self.adapter.session is not None and self.adapter.session.healthy

    def caches(self) -> dict[str, torch.Tensor]:
        return {f"layer{i}": t for i, t in enumerate(self.kv)}

    def fill(self, blocks: range, seed: int) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        for t in self.kv:
            t[blocks.start:blocks.stop] = torch.randn(
                len(blocks), HEADS, BLOCK, 2 * HEAD, generator=g).to(torch.bfloat16)
        return [t[blocks.start:blocks.stop].clone() for t in self.kv]

    def poison(self, blocks: range) -> None:
        for t in self.kv:
            t[blocks.start:blocks.stop].view(torch.uint8).fill_(0x5A)

    def untouched(self, blocks: range) -> bool:
        return all(bool((t[blocks.start:blocks.stop].view(torch.uint8) == 0x5A).all())
                   for t in self.kv)

    def equals(self, blocks: range, expected: list[torch.Tensor]) -> bool:
        return all(torch.equal(t[blocks.start:blocks.stop], e)
                   for t, e in zip(self.kv, expected, strict=True))

    def store(self, rid: str, tokens: list[int], blocks: range) -> None:
        meta = KVConnMetadata(stores=[_spec(rid, tokens, blocks)])
        self.adapter.start_transfers(meta)
        self.adapter.wait_for_save(meta)
        assert self.adapter.wait_stores_idle(30)

    def load(self, server, rid: str, tokens: list[int], blocks: range) -> set[int]:
        """LOOKUP (as the scheduler would), then load; returns the blocks reported failed."""
        from kvconn_plugin.client.api import LMCacheClient
        from kvconn_plugin.client.protocol import CacheKey

        with LMCacheClient(server.url) as c:
            c.lookup(CacheKey(model_name=MODEL, world_size=1, worker_id=None, token_ids=tokens,
                              start=0, end=len(tokens), request_id=rid), timeout=10)
        self.adapter.start_transfers(KVConnMetadata(loads=[_spec(rid, tokens, blocks)]))
        deadline = time.monotonic() + 30
        while True:
            _, recving = self.adapter.get_finished(set())
            if recving and rid in recving:
                return self.adapter.get_block_ids_with_load_errors()
            assert time.monotonic() < deadline, f"load {rid} not reported within 30 s"
            time.sleep(0.01)


def _worker_retrieves(server, model: str, iid: int, spec: TransferSpec) -> None:
    """What a worker's load does on the server: PREPARE/COMMIT_RETRIEVE (drops the locks)."""
    from kvconn_plugin.client.api import LMCacheClient
    from kvconn_plugin.client.protocol import CacheKey

    key = CacheKey(model_name=model, world_size=1, worker_id=0, token_ids=list(spec.token_ids),
                   start=spec.start, end=spec.end, request_id=spec.request_id)
    with LMCacheClient(server.url) as c:
        if c.prepare_retrieve(key, iid).success:
            c.commit_retrieve(key, iid)


def _spec(rid: str, tokens: list[int], blocks: range) -> TransferSpec:
    return TransferSpec(request_id=rid, token_ids=tuple(tokens), start=0, end=len(tokens),
                        block_ids=tuple(blocks))


def _tokens(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, 30000, (n,), generator=g).tolist()


def test_asleep_no_copy_touches_kv_and_wake_restores_transfers(server):
    w = Worker(server)
    try:
        toks, src = _tokens(CHUNK, 1), range(CHUNK // BLOCK)
        expected = w.fill(src, seed=1)
        w.store("before", toks, src)

        w.adapter.unregister_kv_caches()
        w.adapter.unregister_kv_caches()  # idempotent
        dst = range(32, 32 + len(src))
        w.poison(dst)
        assert w.load(server, "asleep-load", toks, dst) == set(dst)  # vLLM recomputes
        assert w.untouched(dst)
        failures = w.adapter.stats.data.get("store_failures", 0)
        w.store("asleep-store", _tokens(CHUNK, 2), src)  # dropped, nothing read
        assert w.adapter.stats.data.get("store_failures", 0) == failures + 1

        w.adapter.restore_kv_caches()
        w.adapter.restore_kv_caches()  # idempotent
        assert w.load(server, "awake-load", toks, dst) == set()
        assert w.equals(dst, expected)
    finally:
        w.adapter.shutdown()


def test_unregister_waits_for_a_copy_in_progress(server):
    w = Worker(server)
    try:
        session = w.adapter.session
        done = threading.Event()
        with session.xfer_lock:  # a copy is running
            t = threading.Thread(target=lambda: (w.adapter.unregister_kv_caches(), done.set()))
            t.start()
            assert not done.wait(0.5), "unregister returned while a copy was still running"
        t.join(timeout=10)
        assert done.is_set()
        w.adapter.restore_kv_caches()
    finally:
        w.adapter.shutdown()


def test_wake_rebinds_moved_tensors_and_refuses_a_changed_geometry(server):
    w = Worker(server)
    try:
        toks, src = _tokens(CHUNK, 3), range(CHUNK // BLOCK)
        expected = w.fill(src, seed=3)
        w.store("moved", toks, src)
        w.adapter.unregister_kv_caches()
        # Same geometry at new addresses: every pointer is re-read and bounds-checked.
        w.kv = [t.clone() for t in w.kv]
        w.adapter._kv_caches = w.caches()
        w.adapter.restore_kv_caches()
        dst = range(40, 40 + len(src))
        w.poison(dst)
        assert w.load(server, "moved-load", toks, dst) == set()
        assert w.equals(dst, expected)

        w.adapter.unregister_kv_caches()
        w.adapter._kv_caches = {k: t[:32] for k, t in w.caches().items()}  # fewer blocks
        w.adapter.restore_kv_caches()  # refused: stays off on this worker, no raise
        assert w.load(server, "reshaped-load", toks, range(16, 32)) == set(range(16, 32))
    finally:
        w.adapter.shutdown()


def test_vllm_accepts_our_connector_with_sleep_mode():
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1

    if not hasattr(KVConnectorBase_V1, "supports_sleep_mode"):
        pytest.skip("this vLLM has no connector sleep-mode hooks (0.33 added them)")
    from tests.helpers.sched_harness import make_vllm_config

    cfg = make_vllm_config(connector="KVConnPluginConnector",
                           module_path="kvconn_plugin.connector",
                           extra_config={"lmcache.mp.autostart": False})
    # The CPU platform refuses sleep mode itself; vLLM's connector check is what matters.
    object.__setattr__(cfg.model_config, "enable_sleep_mode", True)
    cfg._verify_kv_transfer_compat()  # raises "... does not support sleep mode" otherwise


def test_reset_prefix_cache_with_connector_clears_the_server(server):
    h = SchedHarness.for_server(server.url, {"kvconn.lookup_timeout": 10}, max_model_len=4096,
                                max_num_batched_tokens=2048)
    try:
        toks = _tokens(600, 4)
        model = h.vllm_config.model_config.model
        iid = seed_server(server.url, model, toks)

        def first_load(rid: str) -> list:
            h.add(h.request(rid, toks))
            for _ in range(400):
                so, _ = h.step()
                if so.kv_connector_metadata.loads:
                    _worker_retrieves(server, model, iid, so.kv_connector_metadata.loads[0])
                    h.step(finished_recving={rid})
                    break
                if rid not in h.scheduler.requests or so.num_scheduled_tokens.get(rid):
                    break
                time.sleep(0.002)
            loads = so.kv_connector_metadata.loads
            for _ in range(50):
                if not h.scheduler.has_requests():
                    break
                h.step()
            return loads

        assert first_load("before-reset"), "seeded chunks should hit"
        assert h.scheduler.reset_prefix_cache(reset_connector=True)
        assert first_load("after-reset") == [], "KV from before the reset was loaded again"
        h.assert_empty()
    finally:
        h.connector.shutdown()
