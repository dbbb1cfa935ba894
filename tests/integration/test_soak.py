"""Soak: 10,000 requests through vLLM's real Scheduler and a real LMCache server, with hits,
random aborts (before lookup, while waiting, mid-load, while running) and preemptions.

Workers are simulated, but their server side is real: every load the scheduler hands out
is PREPARE_RETRIEVE'd and COMMIT_RETRIEVE'd by a worker client, exactly as a worker
releases its locks. At the end the server holds no read or write locks, every request is
gone from the scheduler, and the client's memory stayed flat.
"""

from __future__ import annotations

import os
import random
import resource
import time

import pytest
from vllm.v1.request import RequestStatus

from kvconn_plugin.client.api import LMCacheClient
from kvconn_plugin.client.protocol import CacheKey
from kvconn_plugin.scheduler.adapter import DRAIN_TIMEOUT
from tests.helpers.sched_harness import SchedHarness
from tests.helpers.seed import seed_server, server_lock_counts

pytestmark = pytest.mark.lmcache_server

N_REQUESTS = int(os.environ.get("KVCONN_SOAK_REQUESTS", "10000"))
CHUNK = 256
FORWARD_S = 0.001


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class FakeWorker:
    """Releases the read locks of handed-out loads the way a worker's COMMIT_RETRIEVE does."""

    def __init__(self, server, model: str, iid: int):
        self.client = LMCacheClient(server.url)
        self.model = model
        self.iid = iid

    def load(self, spec) -> None:
        key = CacheKey(model_name=self.model, world_size=1, worker_id=0,
                       token_ids=list(spec.token_ids), start=spec.start, end=spec.end,
                       request_id=spec.request_id)
        reply = self.client.prepare_retrieve(key, self.iid)
        if reply.success:
            self.client.commit_retrieve(key, self.iid)

    def close(self) -> None:
        self.client.close()


def test_soak_10k_requests_no_leaks(lmcache_server_factory):
    server = lmcache_server_factory()
    h = SchedHarness.for_server(
        server.url, num_blocks=160, max_model_len=2048, max_num_batched_tokens=1024,
        max_num_seqs=32,
    )
    model = h.vllm_config.model_config.model
    rng = random.Random(0)
    prefixes = [[rng.randrange(10, 500) for _ in range(2 * CHUNK)] for _ in range(8)]
    iid = None
    for p in prefixes[:6]:  # most prefixes are cached on the server: hits and loads
        iid = seed_server(server.url, model, [*p, 7])
    worker = FakeWorker(server, model, iid)
    recving: set[str] = set()
    live: list[str] = []
    submitted = 0
    rss_start = None
    aborted = 0
    preempted = 0
    n_loads = 0
    steps = 0
    try:
        max_steps = 40 * N_REQUESTS
        while submitted < N_REQUESTS or h.scheduler.has_requests():
            if steps > max_steps:
                stuck = {r: (q.status, q.num_computed_tokens)
                         for r, q in h.scheduler.requests.items()}
                raise AssertionError(
                    f"no progress after {steps} steps; left: {list(stuck.items())[:5]}")
            while submitted < N_REQUESTS and len(h.scheduler.requests) < 48:
                toks = rng.choice(prefixes) + [rng.randrange(10, 500)
                                               for _ in range(rng.randrange(1, 300))]
                rid = f"r{submitted}"
                h.add(h.request(rid, toks, max_tokens=rng.randrange(1, 40)))
                live.append(rid)
                submitted += 1
            if live and rng.random() < 0.04:  # random abort at whatever stage it is in
                victim = rng.choice(live)
                if victim in h.scheduler.requests:
                    h.scheduler.finish_requests([victim], RequestStatus.FINISHED_ABORTED)
                    aborted += 1
            # A short simulated forward pass, as an engine step has: the server keeps up,
            # so lookups hit and loads run (test_lookups_that_time_out_on_a_stalled_server_*
            # covers a server that falls behind).
            so, _ = h.step(finished_recving=recving, forward_s=FORWARD_S)
            steps += 1
            preempted += len(so.preempted_req_ids or ())
            meta = so.kv_connector_metadata
            recving = set()
            for spec in meta.loads:
                n_loads += 1
                worker.load(spec)
                recving.add(spec.request_id)
            live = [r for r in live if r in h.scheduler.requests]
            if submitted >= 1000 and rss_start is None:
                rss_start = _rss_mb()
        # Let the connector drain finished lookups and sessions (any recovered lookup
        # needs its QUERY and FREE answered), bounded by the connector's drain deadline.
        sched = h.connector._scheduler
        deadline = time.monotonic() + DRAIN_TIMEOUT + 5
        while (sched._closing or h.scheduler.has_requests()) and time.monotonic() < deadline:
            h.step()
            time.sleep(0.01)
        assert not sched._trackers, f"{len(sched._trackers)} trackers left"
        assert not sched._closing
        h.assert_empty()
        # Lock releases are fire-and-forget; give the server a bounded moment to apply them.
        deadline = time.monotonic() + 15
        while server_lock_counts(server) != (0, 0) and time.monotonic() < deadline:
            h.step()
            time.sleep(0.2)
        assert server_lock_counts(server) == (0, 0)
        growth = _rss_mb() - (rss_start or _rss_mb())
        print(f"\nsoak: {N_REQUESTS} requests, {n_loads} loads, {aborted} aborts, "
              f"{preempted} preemptions, {steps} steps, client RSS growth after warm-up "
              f"{growth:.1f} MB")
        assert preempted > 0, "the soak must exercise preemption (fewer KV blocks needed)"
        assert n_loads > N_REQUESTS // 20, "the soak must exercise hits and loads"
        assert growth < 150, f"client RSS grew {growth:.1f} MB"
    finally:
        worker.close()
        h.connector.shutdown()
