"""Two LMCache servers behind one engine (``lmcache.mp.server_urls``), TP=2 style.

vLLM's real Scheduler (world size 2, tensor parallel 2) runs our scheduler side against two
real servers; two real worker adapters over CPU tensors stand in for TP ranks 0 and 1:
rank 0 talks to server A, rank 1 to server B (contiguous rank blocks, as LMCache maps
them), each storing its half of the heads. A chunk is a hit only where both servers have
it: the scheduler takes the minimum, and frees the read locks a server took beyond it.
"""

from __future__ import annotations

import random
import time

import pytest
import torch

from kvconn_plugin.config import parse_config
from kvconn_plugin.metadata import KVConnMetadata, TransferSpec
from kvconn_plugin.parallel import kv_ranks
from kvconn_plugin.worker.adapter import WorkerAdapter
from tests.helpers.connector_config import CONNECTOR, MODULE_PATH
from tests.helpers.sched_harness import SchedHarness, make_scheduler, make_vllm_config
from tests.helpers.seed import server_lock_counts

pytestmark = pytest.mark.lmcache_server

CHUNK, BLOCK = 256, 16
LAYERS, HEADS, HEAD = 2, 2, 64  # per rank
NUM_BLOCKS = 64
MODEL = "kvconn-test/fleet"
LOOKUP_TIMEOUT = 2.0
HEARTBEAT = 0.5


@pytest.fixture(scope="module")
def servers(lmcache_server_factory):
    """Servers A and B; the last test kills and restarts B."""
    return lmcache_server_factory(), lmcache_server_factory()


def _extra(*servers, **extra) -> dict:
    return {"lmcache.mp.server_urls": [s.url for s in servers],
            "lmcache.mp.autostart": False, "kvconn.model_name": MODEL,
            "kvconn.lookup_timeout": LOOKUP_TIMEOUT, "kvconn.transfer_timeout": 60,
            "lmcache.mp.heartbeat_interval": HEARTBEAT, **extra}


def _harness(*servers) -> SchedHarness:
    cfg = make_vllm_config(connector=CONNECTOR, module_path=MODULE_PATH,
                           extra_config=_extra(*servers), max_model_len=4096,
                           max_num_batched_tokens=2048,
                           # every hit below comes from the servers, none from vLLM's own cache
                           enable_prefix_caching=False)
    cfg.parallel_config.tensor_parallel_size = 2  # what `--tensor-parallel-size 2` sets
    cfg.parallel_config.world_size = 2
    return SchedHarness(cfg, make_scheduler(cfg))


class Rank:
    """One TP rank's worker adapter over CPU paged KV, [B, H, N, 2*head] per layer."""

    def __init__(self, rank: int, servers):
        ranks = kv_ranks(mla=False, world_size=2, rank=rank, tp_size=2, n_servers=2)
        assert ranks.server_index == rank
        self.server = servers[rank]
        self.kv = [torch.zeros(NUM_BLOCKS, HEADS, BLOCK, 2 * HEAD, dtype=torch.bfloat16)
                   for _ in range(LAYERS)]
        self.adapter = WorkerAdapter(parse_config(_extra(*servers)), model_name=MODEL,
                                     ranks=ranks, block_size=BLOCK, head_size=HEAD)
        self.adapter.register_kv_caches({f"layer{i}": t for i, t in enumerate(self.kv)})
        assert self.adapter.session is not None and self.adapter.session.healthy

    def fill(self, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        for t in self.kv:
            t.copy_(torch.randn(t.shape, generator=g).to(torch.bfloat16))

    def store(self, tokens: list[int], end: int) -> None:
        spec = TransferSpec(request_id=f"store-{random.random()}", token_ids=tuple(tokens[:end]),
                            start=0, end=end, block_ids=tuple(range(end // BLOCK)))
        meta = KVConnMetadata(stores=[spec])
        self.adapter.start_transfers(meta)
        self.adapter.wait_for_save(meta)
        assert self.adapter.wait_stores_idle(60), "store still unsettled"

    def load(self, spec: TransferSpec, timeout: float = 30.0) -> set[int]:
        t0 = time.monotonic()
        self.adapter.start_load_kv(KVConnMetadata(loads=[spec]))
        while True:
            _, recving = self.adapter.get_finished(set())
            if recving and spec.request_id in recving:
                return self.adapter.get_block_ids_with_load_errors()
            assert time.monotonic() - t0 < timeout, f"load of {spec.request_id} not reported"
            time.sleep(0.01)

    def close(self) -> None:
        self.adapter.shutdown()


@pytest.fixture
def ranks(servers):
    made = [Rank(0, servers), Rank(1, servers)]
    yield made
    for r in made:
        r.close()


@pytest.fixture
def harness(servers):
    h = _harness(*servers)
    yield h
    h.connector.shutdown()


def _tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(10, 500) for _ in range(n)]


def _step_until(h: SchedHarness, pred, timeout: float = 20.0, **kw):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        so, _ = h.step(**kw)
        if pred(so):
            return so
        time.sleep(0.005)
    raise AssertionError("condition not reached")


def _first_step(h: SchedHarness, rid: str):
    """Step until ``rid`` either gets a load planned or is scheduled to compute."""
    def seen(so) -> bool:
        loads = so.kv_connector_metadata.loads
        return any(s.request_id == rid for s in loads) or rid in so.num_scheduled_tokens

    return _step_until(h, seen)


def _finish(h: SchedHarness, rid: str | None = None) -> None:
    """Report ``rid``'s load done (the workers' finished_recving), then run to idle."""
    if rid:
        h.step(finished_recving={rid})
    _step_until(h, lambda so: not h.scheduler.has_requests())
    h.assert_empty()


def _locks_settle(h: SchedHarness, *servers, expect=(0, 0), timeout: float = 15.0) -> None:
    """Step (each step flushes the queued frees) until every server's lock counts are
    ``expect``."""
    deadline = time.monotonic() + timeout
    while True:
        counts = [server_lock_counts(s) for s in servers]
        if all(c == expect for c in counts):
            return
        assert time.monotonic() < deadline, f"lock counts {counts}, expected {expect}"
        h.step()
        time.sleep(0.05)


def _load_everywhere(h: SchedHarness, ranks, load: TransferSpec, sources: list) -> None:
    """Both ranks load ``load`` into poisoned blocks; each gets back the heads it stored."""
    for r, src in zip(ranks, sources, strict=True):
        for t in r.kv:
            t[list(load.block_ids)] = -7.0
        assert r.load(load) == set()
        n = (load.end - load.start) // BLOCK
        for t, s in zip(r.kv, src, strict=True):
            assert torch.equal(t[list(load.block_ids)], s[:n])


def test_hit_needs_both_servers_and_loads_each_rank_half(servers, ranks, harness):
    h = harness
    toks = _tokens(600, 1)
    for i, r in enumerate(ranks):
        r.fill(seed=10 + i)  # different heads on each rank
        r.store(toks, 2 * CHUNK)
    sources = [[t.clone() for t in r.kv] for r in ranks]
    h.add(h.request("both", toks))
    so = _first_step(h, "both")
    (load,) = so.kv_connector_metadata.loads
    assert (load.start, load.end, load.skip_blocks) == (0, 2 * CHUNK, 0)
    _load_everywhere(h, ranks, load, sources)
    _finish(h, "both")
    _locks_settle(h, *servers)  # the loads consumed every read lock on both servers


def test_min_hit_frees_the_surplus_on_the_other_server(servers, ranks, harness):
    h = harness
    toks = _tokens(600, 2)
    for i, r in enumerate(ranks):
        r.fill(seed=20 + i)
    ranks[0].store(toks, 2 * CHUNK)  # A has two chunks
    ranks[1].store(toks, CHUNK)      # B has one
    sources = [[t.clone() for t in r.kv] for r in ranks]
    h.add(h.request("min", toks))
    so = _first_step(h, "min")
    (load,) = so.kv_connector_metadata.loads
    assert (load.start, load.end) == (0, CHUNK)
    # A's lock on its second chunk is freed at once; the first chunk stays locked on both
    # servers for the load (/status counts each read-locked object twice).
    _locks_settle(h, *servers, expect=(2, 0))
    _load_everywhere(h, ranks, load, sources)
    _finish(h, "min")
    _locks_settle(h, *servers)


def test_one_server_only_is_a_miss_and_frees_its_locks(servers, ranks, harness):
    h = harness
    toks = _tokens(600, 3)
    ranks[0].fill(seed=30)
    ranks[0].store(toks, 2 * CHUNK)  # only A
    h.add(h.request("onlyA", toks))
    so = _first_step(h, "onlyA")
    assert not so.kv_connector_metadata.loads
    assert so.num_scheduled_tokens["onlyA"] == len(toks)  # all of it computed
    _locks_settle(h, *servers)
    _finish(h)


def test_chunk_size_mismatch_serves_without_the_cache(servers, lmcache_server_factory):
    other = lmcache_server_factory(chunk_size=512, l1_size_gb=0.25)
    try:
        h = _harness(servers[0], other)  # builds, never raises
        try:
            sched = h.connector._scheduler
            assert not sched.healthy
            assert "different chunk sizes" in (sched._health.disabled_reason or "")
            h.add(h.request("mismatch", _tokens(600, 4)))
            so = _first_step(h, "mismatch")
            assert not so.kv_connector_metadata.loads
            _finish(h)
        finally:
            h.connector.shutdown()
    finally:
        other.kill()


def test_dead_server_means_misses_then_hits_resume(servers, ranks, harness):
    h = harness
    a, b = servers
    sched = h.connector._scheduler
    toks = _tokens(600, 5)
    for i, r in enumerate(ranks):
        r.fill(seed=50 + i)
        r.store(toks, 2 * CHUNK)
    b.kill_hard()
    t0 = time.monotonic()
    h.add(h.request("dead", toks))
    so = _first_step(h, "dead")  # no exception into vLLM
    took = time.monotonic() - t0
    assert not so.kv_connector_metadata.loads and so.num_scheduled_tokens["dead"] == len(toks)
    assert took < LOOKUP_TIMEOUT + 0.5, f"the miss took {took:.2f}s"
    _finish(h)
    # Within two heartbeats the scheduler knows B is down; lookups are skipped (no wait).
    deadline = time.monotonic() + 4 * HEARTBEAT + 2
    while sched.healthy or b.url not in sched.client.down:
        assert time.monotonic() < deadline, "B's outage not noticed"
        time.sleep(0.05)
    t0 = time.monotonic()
    h.add(h.request("dead2", toks))
    so = _first_step(h, "dead2")
    assert not so.kv_connector_metadata.loads
    assert time.monotonic() - t0 < 0.5
    _finish(h)
    _locks_settle(h, a)  # A's locks of both lookups were freed

    b.restart()  # same address, an empty server
    deadline = time.monotonic() + 30
    while not (sched.healthy and ranks[1].adapter.session.healthy):
        assert time.monotonic() < deadline, "B not back"
        time.sleep(0.05)
    ranks[1].store(toks, 2 * CHUNK)  # B's rank stores its half again (A still has its)
    sources = [[t.clone() for t in r.kv] for r in ranks]
    h.add(h.request("back", toks))
    so = _first_step(h, "back")
    (load,) = so.kv_connector_metadata.loads
    assert (load.start, load.end) == (0, 2 * CHUNK)
    _load_everywhere(h, ranks, load, sources)
    _finish(h, "back")
    _locks_settle(h, *servers)
