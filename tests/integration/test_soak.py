"""Soak: 10,000 requests through vLLM's real Scheduler and a real LMCache server, with hits,
random aborts (before lookup, while waiting, mid-load, while running) and preemptions.

Workers are simulated, but their server side is real: every load the scheduler hands out
is PREPARE_RETRIEVE'd and COMMIT_RETRIEVE'd by a worker client, exactly as a worker
releases its locks. At the end the server holds no read or write locks, every request is
gone from the scheduler, and the client's memory stayed flat.
"""

from __future__ import annotations

import json
import os
import random
import resource
import time
import urllib.request

import pytest
from vllm.v1.request import RequestStatus

from kvconn_plugin.client.api import LMCacheClient
from kvconn_plugin.client.protocol import CacheKey
from tests.helpers.sched_harness import SchedHarness
from tests.helpers.seed import seed_server

pytestmark = pytest.mark.lmcache_server

N_REQUESTS = int(os.environ.get("KVCONN_SOAK_REQUESTS", "10000"))
CHUNK = 256


def server_lock_counts(server) -> tuple[int, int]:
    """(read_locked, write_locked) objects from the server's HTTP /status."""
    with urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/status", timeout=10) as r:
        status = json.loads(r.read())
    found: dict[str, int] = {}

    def walk(node):
        if isinstance(node, dict):
            for k, v in node.items():
                if k in ("read_locked_count", "write_locked_count") and isinstance(v, int):
                    found[k] = found.get(k, 0) + v
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(status)
    if not found:
        pytest.skip("server /status has no lock counts")
    return found.get("read_locked_count", 0), found.get("write_locked_count", 0)


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
        key = CacheKey(model_name=self.model, world_size=1, worker_id=0, token_ids=list(spec.token_ids),
                       start=spec.start, end=spec.end, request_id=spec.request_id)
        reply = self.client.prepare_retrieve(key, self.iid)
        if reply.success:
            self.client.commit_retrieve(key, self.iid)

    def close(self) -> None:
        self.client.close()


def test_soak_10k_requests_no_leaks(lmcache_server_factory):
    server = lmcache_server_factory()
    host, port = server.url.rsplit(":", 1)
    h = SchedHarness.create(
        connector="KVConnPluginConnector", module_path="kvconn_plugin.connector",
        extra_config={"lmcache.mp.host": host, "lmcache.mp.port": int(port), "lmcache.mp.autostart": False},
        num_blocks=400, max_model_len=2048, max_num_batched_tokens=4096, max_num_seqs=32,
    )
    model = h.vllm_config.model_config.model
    rng = random.Random(0)
    prefixes = [[rng.randrange(10, 500) for _ in range(2 * CHUNK)] for _ in range(8)]
    iid = None
    for p in prefixes[:6]:  # most prefixes are cached on the server: hits and loads
        iid = seed_server(server.url, model, p + [7])
    worker = FakeWorker(server, model, iid)
    recving: set[str] = set()
    live: list[str] = []
    submitted = 0
    rss_start = None
    aborted = 0
    steps = 0
    try:
        max_steps = 40 * N_REQUESTS
        while submitted < N_REQUESTS or h.scheduler.has_requests():
            if steps > max_steps:
                stuck = {r: (q.status, q.num_computed_tokens) for r, q in h.scheduler.requests.items()}
                raise AssertionError(f"no progress after {steps} steps; left: {list(stuck.items())[:5]}")
            while submitted < N_REQUESTS and len(h.scheduler.requests) < 48:
                toks = rng.choice(prefixes) + [rng.randrange(10, 500) for _ in range(rng.randrange(1, 300))]
                rid = f"r{submitted}"
                h.add(h.request(rid, toks, max_tokens=rng.randrange(1, 4)))
                live.append(rid)
                submitted += 1
            if live and rng.random() < 0.15:  # random abort at whatever stage it is in
                victim = rng.choice(live)
                if victim in h.scheduler.requests:
                    h.scheduler.finish_requests([victim], RequestStatus.FINISHED_ABORTED)
                    aborted += 1
            so, _ = h.step(finished_recving=recving)
            steps += 1
            meta = so.kv_connector_metadata
            recving = set()
            for spec in meta.loads:
                worker.load(spec)
                recving.add(spec.request_id)
            live = [r for r in live if r in h.scheduler.requests]
            if submitted >= 1000 and rss_start is None:
                rss_start = _rss_mb()
        for _ in range(20):  # let the connector drain finished lookups and sessions
            h.step()
        sched = h.connector._scheduler
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
        print(f"\nsoak: {N_REQUESTS} requests, {aborted} aborts, {steps} steps, "
              f"preemptions {h.scheduler.num_preemptions if hasattr(h.scheduler, 'num_preemptions') else 'n/a'}, "
              f"client RSS growth after warm-up {growth:.1f} MB")
        assert growth < 150, f"client RSS grew {growth:.1f} MB"
    finally:
        worker.close()
        h.connector.shutdown()
