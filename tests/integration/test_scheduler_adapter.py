"""Our scheduler side on vLLM's real Scheduler, talking to a real LMCache server.

The workers are simulated by the harness (mocked ModelRunnerOutput); the server is real,
so lookups, hits and lock bookkeeping are the server's own.
"""

from __future__ import annotations

import itertools
import random
import time

import pytest

from kvconn_plugin.metadata import KVConnMetadata
from tests.helpers.sched_harness import SchedHarness
from tests.helpers.seed import seed_server, server_lock_counts

pytestmark = pytest.mark.lmcache_server


@pytest.fixture(scope="module")
def server(lmcache_server_factory):
    return lmcache_server_factory()


def _harness(server, budget: int = 2048, **extra) -> SchedHarness:
    return SchedHarness.for_server(server.url, {"kvconn.lookup_timeout": 10, **extra},
                                   max_model_len=4096, max_num_batched_tokens=budget)


def _seed_server(server, model: str, tokens: list[int], salt: str = "") -> int:
    return seed_server(server.url, model, tokens, salt)


def _step_until(h: SchedHarness, pred, max_steps: int = 400, **kw):
    for _ in range(max_steps):
        so, _ = h.step(**kw)
        if pred(so):
            return so
        time.sleep(0.002)
    raise AssertionError("condition not reached")


def _meta(so) -> KVConnMetadata:
    return so.kv_connector_metadata


def _tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(10, 500) for _ in range(n)]


def test_miss_schedules_and_plans_stores(server):
    h = _harness(server)
    toks = _tokens(600, 1)
    h.add(h.request("miss", toks))
    stores = []
    for _ in range(400):
        so, _ = h.step()
        stores += _meta(so).stores
        if not h.scheduler.has_requests():
            break
        time.sleep(0.002)
    # Whole chunks only, contiguous from 0, never past the computed tokens.
    assert stores and stores[0].start == 0 and stores[-1].end == 512
    assert all(b.start == a.end for a, b in itertools.pairwise(stores))
    assert all(len(s.block_ids) == (s.end - s.start) // h.block_size for s in stores)
    h.assert_empty()
    h.connector.shutdown()


def test_hit_loads_async_and_releases(server):
    h = _harness(server)
    model = h.vllm_config.model_config.model
    toks = _tokens(700, 2)
    _seed_server(server, model, toks)
    h.add(h.request("hit", toks))
    so = _step_until(h, lambda so: _meta(so).loads)
    load = _meta(so).loads[0]
    assert (load.start, load.end, load.skip_blocks) == (0, 512, 0)
    assert len(load.block_ids) == 512 // h.block_size
    # The request waits for the workers; report the load as done.
    h.step(finished_recving={"hit"})
    for _ in range(50):
        h.step()
        if not h.scheduler.has_requests():
            break
    h.assert_empty()
    sched = h.connector._scheduler
    assert not sched._trackers and not sched._closing
    h.connector.shutdown()


def test_full_prompt_hit_leaves_one_token(server):
    h = _harness(server)
    toks = _tokens(512, 3)  # exactly two chunks: the last token must still be computed
    _seed_server(server, h.vllm_config.model_config.model, toks)
    h.add(h.request("full", toks))
    so = _step_until(h, lambda so: _meta(so).loads or so.num_scheduled_tokens)
    loads = _meta(so).loads
    assert not loads or loads[0].end <= 256
    h.connector.shutdown()


def test_abort_mid_load_holds_blocks_until_worker_done(server):
    h = _harness(server)
    toks = _tokens(600, 4)
    _seed_server(server, h.vllm_config.model_config.model, toks)
    h.add(h.request("abort", toks))
    _step_until(h, lambda so: _meta(so).loads)
    h.scheduler.finish_requests(["abort"], finished_status=__import__(
        "vllm.v1.request", fromlist=["RequestStatus"]).RequestStatus.FINISHED_ABORTED)
    h.step()
    assert "abort" in h.scheduler.requests  # blocks held: the load may still be writing
    h.step(finished_recving={"abort"})
    for _ in range(5):
        h.step()
    h.assert_empty()
    h.connector.shutdown()


def test_cache_salt_isolates(server):
    h = _harness(server)
    toks = _tokens(600, 5)
    _seed_server(server, h.vllm_config.model_config.model, toks, salt="tenant-a")
    h.add(h.request("salted", toks, cache_salt="tenant-b"))
    loads = []
    for _ in range(200):
        so, _ = h.step()
        loads += _meta(so).loads
        if not h.scheduler.has_requests():
            break
        time.sleep(0.005)
    assert loads == []
    h.assert_empty()
    h.connector.shutdown()


def test_no_server_degrades_without_blocking(tmp_path):
    from tests.conftest import free_port

    t0 = time.monotonic()
    h = SchedHarness.for_server(f"tcp://127.0.0.1:{free_port()}", {"kvconn.connect_timeout": 1})
    assert time.monotonic() - t0 < 30  # start-up decides quickly (bounded wait, not a timing)
    h.add(h.request("r", _tokens(300, 6)))
    for _ in range(20):
        h.step()
        if not h.scheduler.has_requests():
            break
    h.assert_empty()
    h.connector.shutdown()


def test_chunked_prefill_stores_each_chunk_once_as_it_completes(server):
    h = _harness(server, budget=96)  # a 700-token prompt takes 8 prefill steps
    toks = _tokens(700, 7)
    h.add(h.request("chunked", toks))
    seen = []
    for _ in range(400):
        so, _ = h.step()
        req = h.scheduler.requests.get("chunked")
        for spec in _meta(so).stores:
            # Never ahead of what this step computes, always whole chunks, in order.
            assert spec.end <= req.num_computed_tokens
            seen.append((spec.start, spec.end))
        if not h.scheduler.has_requests():
            break
        time.sleep(0.002)
    assert seen == [(0, 256), (256, 512)]
    h.assert_empty()
    h.connector.shutdown()


@pytest.mark.parametrize("report", ["invalid_blocks", "failed_recving"])
def test_failed_load_completes_recomputed_and_is_never_offered_again(server, report):
    """A load the workers report failed: vLLM recomputes the request, and the connector never
    offers the same hit again (vLLM asks again when the failed load left it nothing: the
    old answer would send it back to wait for a load nobody plans, forever)."""
    h = _harness(server)
    toks = _tokens(700, 8)
    _seed_server(server, h.vllm_config.model_config.model, toks)
    h.add(h.request("bad", toks))
    so = _step_until(h, lambda so: _meta(so).loads)
    load = _meta(so).loads[0]
    sched = h.connector._scheduler
    outcome = ({"invalid_block_ids": set(load.block_ids[load.skip_blocks:])}
               if report == "invalid_blocks" else {"failed_recving": {"bad"}})
    h.step(finished_recving={"bad"}, **outcome)
    assert sched._trackers["bad"].load_failed
    loads = []
    for _ in range(100):
        so, _ = h.step()
        loads += _meta(so).loads
        if not h.scheduler.has_requests():
            break
    assert loads == [], "a failed load was planned again"
    h.assert_empty()
    assert not sched._trackers and not sched._closing
    h.connector.shutdown()


def test_hit_covered_by_vllms_own_cache_is_not_stored_again(server):
    """A second request whose server hit vLLM's own prefix cache already covers plans no
    store of those chunks: the server holds them (perhaps only in L2, where a store would
    copy them back up to L1 and out to L2 again)."""
    h = _harness(server)
    toks = _tokens(700, 7)
    _seed_server(server, h.vllm_config.model_config.model, toks)
    h.add(h.request("first", toks))
    _step_until(h, lambda so: _meta(so).loads)
    h.step(finished_recving={"first"})
    for _ in range(50):
        h.step()
        if not h.scheduler.has_requests():
            break
    h.add(h.request("second", toks))
    stores, loads = [], []
    for _ in range(400):
        so, _ = h.step()
        stores += _meta(so).stores
        loads += _meta(so).loads
        if not h.scheduler.has_requests():
            break
        time.sleep(0.002)
    assert not loads, "vLLM's own cache had the prefix: nothing to load"
    assert all(s.start >= 512 for s in stores), [(s.start, s.end) for s in stores]
    h.assert_empty()
    h.connector.shutdown()


def test_shutdown_frees_the_locks_of_hits_still_waiting(lmcache_server_factory):
    """A request whose lookup hit but whose load vLLM never planned (still waiting when the
    engine stops, as in a rolling restart) leaves no read locks behind: they would pin its
    chunks until the server's TTL."""
    server = lmcache_server_factory()  # lock counts are the whole server's: no one else's
    h = _harness(server)
    try:
        toks = _tokens(700, 8)
        _seed_server(server, h.vllm_config.model_config.model, toks)
        assert server_lock_counts(server) == (0, 0)
        req = h.request("waiting", toks)
        h.add(req)  # vLLM sends the lookup on arrival; the request is never scheduled
        sched = h.connector._scheduler
        for _ in range(2000):
            if sched.get_num_new_matched_tokens(req, 0)[0] is not None:
                break
            time.sleep(0.005)
        assert sched.lookup_hit_tokens("waiting") == 512
        assert server_lock_counts(server)[0] > 0  # the hit's chunks are read-locked
    finally:
        h.connector.shutdown()
    assert server_lock_counts(server) == (0, 0)
