"""Requests whose prefix vLLM's own cache already holds, on vLLM's real Scheduler and a real
LMCache server (workers simulated by the harness).

Such a request gains nothing from our lookup: every chunk the lookup can report is already
computed. So it is scheduled in its first step instead of waiting a step for the lookup, and
its lookup still decides what it stores: chunks the server holds are not stored again, and
chunks it lacks are. Prompt lengths and what the server holds are drawn at random around the
chunk boundaries (a prompt of whole chunks computes one more chunk than its lookup covers).
"""

from __future__ import annotations

import random
import time

import pytest

from tests.helpers.sched_harness import SchedHarness
from tests.helpers.seed import CHUNK, seed_server, server_lock_counts

pytestmark = pytest.mark.lmcache_server
# Each step's stand-in for the forward: a real step takes longer than a lookup's round trip.
FORWARD_S = 0.03


def _tokens(n: int, rng: random.Random) -> list[int]:
    return [rng.randrange(10, 500) for _ in range(n)]


def _run_until_idle(h: SchedHarness, rid: str) -> list:
    """Step to the end; report every load of ``rid`` done at once. Returns its stores."""
    stores = []
    for _ in range(400):
        so, _ = h.step(forward_s=FORWARD_S)
        meta = so.kv_connector_metadata
        stores += [s for s in meta.stores if s.request_id == rid]
        loading = {s.request_id for s in meta.loads}
        if loading:
            h.step(finished_recving=loading)
        if not h.scheduler.has_requests():
            return stores
        time.sleep(0.002)
    raise AssertionError(f"scheduler still busy: {sorted(h.scheduler.requests)}")


def _case(rng: random.Random) -> tuple[int, int]:
    """A prompt length near a chunk boundary and how many of its chunks the server holds."""
    n = rng.choice([2, 3]) * CHUNK + rng.choice([-37, -1, 0, 1, 29])
    return n, rng.randrange(0, n // CHUNK + 1)


@pytest.fixture(scope="module")
def server(lmcache_server_factory):
    return lmcache_server_factory()  # this module's alone: lock counts are the server's


@pytest.mark.parametrize("seed", range(10))
def test_a_local_hit_is_scheduled_at_once_and_stores_only_what_the_server_lacks(
        server, seed):
    rng = random.Random(seed)
    h = SchedHarness.for_server(server.url, {"kvconn.lookup_timeout": 10},
                                max_model_len=4096, max_num_batched_tokens=2048)
    try:
        n, held = _case(rng)
        toks = _tokens(n, rng)
        # The first request fills vLLM's cache. Its stores never reach the server (the
        # harness runs no workers), so the server then holds only what is seeded.
        h.add(h.request("first", toks))
        _run_until_idle(h, "first")
        if held:
            seed_server(server.url, h.vllm_config.model_config.model, toks[:held * CHUNK])

        h.add(h.request("second", toks))
        so, _ = h.step(forward_s=FORWARD_S)
        assert "second" in {r.req_id for r in so.scheduled_new_reqs}, (
            "a request vLLM's cache covers waited for its lookup")
        assert not so.kv_connector_metadata.loads
        local = h.scheduler.requests["second"].num_computed_tokens
        assert local >= (n - 1) // CHUNK * CHUNK  # every chunk a lookup can report
        stores = [s for s in so.kv_connector_metadata.stores if s.request_id == "second"]
        stores += _run_until_idle(h, "second")

        whole = n // CHUNK * CHUNK
        covered = set(range(0, held * CHUNK, CHUNK))
        for s in stores:
            covered |= set(range(s.start, s.end, CHUNK))
        assert covered >= set(range(0, whole, CHUNK)), ("a chunk the server lacks was not "
                                                        "stored", n, held, stores)
        if n % CHUNK:
            # The prompt's chunks were all inside the lookup's range, which answers within
            # a step: what the server held is not stored again.
            assert all(s.start >= held * CHUNK for s in stores), (n, held, stores)
        h.assert_empty()
    finally:
        h.connector.shutdown()
    deadline = time.monotonic() + 10
    while server_lock_counts(server) != (0, 0) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server_lock_counts(server) == (0, 0)
