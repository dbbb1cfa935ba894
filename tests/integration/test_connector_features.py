"""KV events, cache reset and per-request control on vLLM's real Scheduler with a real LMCache
server (workers simulated: chunks are put on the server as a worker stores them, loads are
retrieved the way a worker's COMMIT_RETRIEVE releases their locks)."""

from __future__ import annotations

import logging
import random
import time

import pytest
from vllm.config import KVEventsConfig
from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash

from kvconn_plugin.client.api import LMCacheClient
from kvconn_plugin.client.protocol import CacheKey
from kvconn_plugin.store_acks import StoreAckBatch
from tests.conftest import free_port
from tests.helpers.kv_events import KVEventSubscriber
from tests.helpers.sched_harness import SchedHarness
from tests.helpers.seed import CHUNK, seed_server, server_lock_counts

pytestmark = pytest.mark.lmcache_server


@pytest.fixture(scope="module")
def server(lmcache_server_factory):
    return lmcache_server_factory()


def _tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(10, 500) for _ in range(n)]


def _harness(server, events_port: int | None = None, **extra) -> SchedHarness:
    kw = {}
    if events_port is not None:
        kw["kv_events_config"] = KVEventsConfig(
            enable_kv_cache_events=True, publisher="zmq", endpoint=f"tcp://*:{events_port}")
    return SchedHarness.for_server(server.url, {"kvconn.lookup_timeout": 10,
                                                "lmcache.mp.heartbeat_interval": 1, **extra},
                                   max_model_len=4096, max_num_batched_tokens=2048, **kw)


def _lookup_chunks(server, model: str, toks: list[int], salt: str = "") -> int:
    with LMCacheClient(server.url) as c:
        key = CacheKey(model_name=model, world_size=1, worker_id=None, token_ids=toks,
                       start=0, end=len(toks) // CHUNK * CHUNK, request_id=f"probe-{time.time()}",
                       cache_salt=salt)
        hit = c.lookup(key, timeout=10)
        if hit:
            c.free_lookup_locks(key)
        c.end_session(key.request_id)
    return hit


class Worker:
    """The server side of a worker: retrieves handed-out loads (releasing their locks)."""

    def __init__(self, server, model: str):
        self.client = LMCacheClient(server.url)
        self.model = model
        self.iid = seed_server(server.url, model, _tokens(CHUNK, 999))  # registers

    def load(self, spec) -> bool:
        key = CacheKey(model_name=self.model, world_size=1, worker_id=0,
                       token_ids=list(spec.token_ids), start=spec.start, end=spec.end,
                       request_id=spec.request_id, cache_salt=spec.cache_salt)
        reply = self.client.prepare_retrieve(key, self.iid)
        if reply.success:
            self.client.commit_retrieve(key, self.iid)
        return reply.success

    def close(self) -> None:
        self.client.close()


def _drain(h: SchedHarness, max_steps: int = 400, **first):
    for i in range(max_steps):
        h.step(**(first if i == 0 else {}))
        sched = h.connector._scheduler
        if not h.scheduler.has_requests() and not sched._closing:
            return
        time.sleep(0.005)
    raise AssertionError(f"left: {sorted(h.scheduler.requests)}")


# ---------------------------------------------------------------------------- KV events


def test_routers_see_our_chunks_with_vllm_block_hashes_and_their_eviction(server):
    port = free_port()
    h = _harness(server, events_port=port)
    sub = KVEventSubscriber(f"tcp://127.0.0.1:{port}")
    model = h.vllm_config.model_config.model
    try:
        assert h.connector._events.streams
        deadline = time.monotonic() + 20
        while not h.connector._events.live and time.monotonic() < deadline:
            time.sleep(0.05)
        toks = _tokens(600, 11)
        req = h.request("ev", toks, cache_salt="tenant-1")
        h.add(req)
        stores = []
        while not stores:
            so, _ = h.step()
            stores = so.kv_connector_metadata.stores
        assert [(s.start, s.end) for s in stores] == [(0, 512)]
        # The worker commits the chunks (to the real server) and confirms them.
        seed_server(server.url, model, toks[:512], salt="tenant-1")
        h.step(kv_cache_events=StoreAckBatch([("ev", 0, 512, (0, 1))]))
        events = sub.wait_for(lambda ev: len(sub.stored("CPU")) >= 2, 20)
        cpu = sub.stored("CPU")
        assert len(cpu) == 2, events
        ours = [maybe_convert_block_hash(x) for x in req.block_hashes[: 512 // h.block_size]]
        bpc = CHUNK // h.block_size
        assert cpu[0].block_hashes == ours[:bpc] and cpu[1].block_hashes == ours[bpc:]
        assert cpu[0].parent_block_hash is None and cpu[1].parent_block_hash == ours[bpc - 1]
        assert cpu[0].token_ids == toks[:CHUNK] and cpu[0].block_size == h.block_size
        # vLLM's own GPU events for the same blocks carry the same hashes and extra keys.
        gpu = {hh: (e, i) for e in sub.stored("GPU") for i, hh in enumerate(e.block_hashes)}
        assert set(ours) <= set(gpu)
        e, i = gpu[ours[0]]
        assert cpu[0].extra_keys[0] == e.extra_keys[i]  # the cache_salt, as vLLM puts it
        _drain(h)
        # Reset the external cache: the server's CLEAR evicts the chunks; the stream
        # reports it and routers get BlockRemoved for the very hashes announced.
        assert h.scheduler.reset_prefix_cache(reset_connector=True)
        for _ in range(100):
            h.step()
            if {x for r in sub.removed("CPU") for x in r.block_hashes} >= set(ours):
                break
            sub.poll(0.1)
        assert {x for r in sub.removed("CPU") for x in r.block_hashes} == set(ours)
        assert _lookup_chunks(server, model, toks, "tenant-1") == 0
        h.assert_empty()
    finally:
        h.scheduler.shutdown()
        sub.close()


def test_no_events_and_no_stream_unless_vllm_publishes_them(server):
    h = _harness(server)
    try:
        assert h.connector._events is None
        assert list(h.connector.take_events()) == []
    finally:
        h.scheduler.shutdown()


# ---------------------------------------------------------------------------- reset


def test_reset_with_requests_in_flight(server):
    h = _harness(server)
    model = h.vllm_config.model_config.model
    worker = Worker(server, model)
    p_load, p_late = _tokens(600, 21), _tokens(600, 22)
    seed_server(server.url, model, p_load)
    seed_server(server.url, model, p_late)
    try:
        h.add(h.request("load", p_load))
        load_spec = None
        for _ in range(400):
            so, _ = h.step()
            if so.kv_connector_metadata.loads:
                load_spec = so.kv_connector_metadata.loads[0]
                break
            time.sleep(0.005)
        assert load_spec is not None and load_spec.end == 512
        h.add(h.request("run", _tokens(700, 23)))
        h.step()
        h.add(h.request("late", p_late))  # its lookup is in flight or answered at the reset
        h.step()
        # vLLM's reset path: the GPU cache cannot reset while requests hold blocks, the
        # connector resets regardless and says so.
        h.scheduler.reset_prefix_cache(reset_connector=True)
        assert h.scheduler.reset_connector_cache() is True
        # The load in flight survives (its chunks were locked) and is still reported.
        assert worker.load(load_spec)
        late_loads = []
        for i in range(400):
            so, _ = h.step(finished_recving={"load"} if i == 0 else None)
            late_loads += [s for s in so.kv_connector_metadata.loads if s.request_id == "late"]
            if not h.scheduler.has_requests() and not h.connector._scheduler._closing:
                break
            time.sleep(0.005)
        assert late_loads == []  # nothing from before the reset is loaded
        h.assert_empty()
        sched = h.connector._scheduler
        assert not sched._trackers and not sched._closing
        deadline = time.monotonic() + 15
        while server_lock_counts(server) != (0, 0) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert server_lock_counts(server) == (0, 0)
        # Once the lookups and the load that held chunks through the reset were over, the
        # connector cleared again: nothing from before the reset is left on the server.
        assert _lookup_chunks(server, model, p_late) == 0
        assert _lookup_chunks(server, model, p_load) == 0
    finally:
        worker.close()
        h.scheduler.shutdown()


def test_reset_with_the_server_down_answers_false_at_once(lmcache_server_factory):
    server = lmcache_server_factory()
    h = _harness(server)
    try:
        server.kill_hard()
        deadline = time.monotonic() + 30
        while h.connector._scheduler.healthy and time.monotonic() < deadline:
            time.sleep(0.1)
        t0 = time.monotonic()
        assert h.scheduler.reset_connector_cache() is False
        assert time.monotonic() - t0 < 10  # bounded, never a hang
        h.add(h.request("after", _tokens(300, 31)))
        _drain(h)
        h.assert_empty()
    finally:
        h.scheduler.shutdown()


# ---------------------------------------------------------------------------- per request


def _run_collect(h: SchedHarness, worker: Worker | None = None):
    stores, loads, params = [], [], {}
    done: set[str] = set()  # loads the worker finished, reported with the next step
    for _ in range(600):
        so, outs = h.step(finished_recving=done)
        done = set()
        stores += so.kv_connector_metadata.stores
        for spec in so.kv_connector_metadata.loads:
            loads.append(spec)
            if worker is not None:
                worker.load(spec)
            done.add(spec.request_id)
        for eco in outs.values():
            for o in eco.outputs:
                if o.finish_reason is not None:
                    params[o.request_id] = o.kv_transfer_params
        if not h.scheduler.has_requests() and not h.connector._scheduler._closing:
            return stores, loads, params
        time.sleep(0.005)
    left = {r: (q.status, q.num_computed_tokens) for r, q in h.scheduler.requests.items()}
    raise AssertionError(f"left: {left}")


def test_per_request_kv_transfer_params(server, caplog):
    h = _harness(server)
    model = h.vllm_config.model_config.model
    worker = Worker(server, model)
    cached, cached_b, cached_c = _tokens(600, 41), _tokens(600, 47), _tokens(600, 48)
    for toks in (cached, cached_b, cached_c):
        seed_server(server.url, model, toks)
    try:
        h.add(
            h.request("skip", _tokens(600, 42), kv_transfer_params={"lmcache.skip_save": True}),
            h.request("cap", _tokens(800, 43),
                      kv_transfer_params={"lmcache.max_offload_tokens": 300}),
            h.request("noload", cached, kv_transfer_params={"kvconn.skip_load": True,
                                                           "cached_token_stats": True}),
            h.request("stats", [*cached_b[:512], *_tokens(50, 44)],
                      kv_transfer_params={"cached_token_stats": True}),
            h.request("bad", _tokens(600, 45),
                      kv_transfer_params={"lmcache.skip_save": "maybe",
                                          "lmcache.max_offload_tokens": -5}),
            h.request("plain", _tokens(300, 46)),
            h.request("loadcap", cached_c, kv_transfer_params={"max_load_tokens": 300}),
        )
        with caplog.at_level(logging.WARNING, logger="kvconn_plugin.request_params"):
            stores, loads, params = _run_collect(h, worker)
        by = {}
        for s in stores:
            by.setdefault(s.request_id, []).append((s.start, s.end))
        assert "skip" not in by
        assert by["cap"] == [(0, 256)]
        assert by["bad"] == [(0, 512)]  # bad values ignored: defaults apply
        assert any("maybe" in r.getMessage() for r in caplog.records)
        assert {(s.request_id, s.start, s.end) for s in loads} == {("stats", 0, 512),
                                                                   ("loadcap", 0, 256)}
        assert params["stats"] == {"cached_token_stats": {
            "num_vllm_cached_tokens": 0, "num_lmcache_cached_tokens": 512,
            "num_lmcache_extra_cached_tokens": 512}}
        assert params["noload"]["cached_token_stats"]["num_lmcache_cached_tokens"] == 0
        assert params["plain"] is None and params["skip"] is None
        h.assert_empty()
        assert len(h.connector._scheduler.controls) == 0
    finally:
        worker.close()
        h.scheduler.shutdown()
