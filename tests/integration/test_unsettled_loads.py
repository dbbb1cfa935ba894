"""A load whose PREPARE_RETRIEVE failed on our side leaves the lookup's read locks on a real
LMCache server; ``UnsettledLoads`` releases them exactly once, whatever became of that
PREPARE_RETRIEVE (found by the chaos harness: a SIGSTOP or a freeze with PREPARE_RETRIEVE in
flight left read locks until the server's 300 s TTL)."""

from __future__ import annotations

import uuid

import msgspec
import pytest

from kvconn_plugin.client.api import LMCacheClient
from kvconn_plugin.client.protocol import CacheKey
from kvconn_plugin.errors import KVConnInFlightLost, KVConnTimeout, KVConnUnavailable
from kvconn_plugin.worker.unsettled_loads import UnsettledLoads
from tests.helpers.seed import CHUNK, seed_server, server_lock_counts

pytestmark = pytest.mark.lmcache_server

MODEL = "kvt/unsettled"


def _locked_lookup(client: LMCacheClient, tokens: list[int], n_chunks: int) -> CacheKey:
    """LOOKUP + QUERY like the scheduler (read locks taken); returns the scheduler's key."""
    key = CacheKey(model_name=MODEL, world_size=1, worker_id=None, token_ids=tokens, start=0,
                   end=n_chunks * CHUNK, request_id=f"req-{uuid.uuid4().hex[:8]}")
    assert client.lookup(key) == n_chunks
    return key


@pytest.fixture(scope="module")
def lmcache_server(lmcache_server_factory):
    """A server of this module's own: the lock counts below are the whole server's, so a lock
    another module left until the server's TTL would be counted too."""
    return lmcache_server_factory()


@pytest.mark.parametrize("fate", ["never_sent", "carried_out_late", "reported_twice"])
def test_failed_load_releases_lookup_locks_once(lmcache_server, fate):
    tokens = list(range(100, 100 + 2 * CHUNK))
    iid = seed_server(lmcache_server.url, MODEL, tokens)  # registered with the right layout
    with LMCacheClient(lmcache_server.url, control_timeout=10.0, transfer_timeout=10.0) as c:
        # Another request holds locks on the same chunks: our recovery must leave them.
        other = _locked_lookup(c, tokens, 2)
        key = msgspec.structs.replace(_locked_lookup(c, tokens, 2), worker_id=0)
        # /status counts read-locked objects (twice each, in two places), not readers.
        assert server_lock_counts(lmcache_server) == (4, 0)
        unsettled = UnsettledLoads()
        if fate == "never_sent":
            unsettled.add(key, KVConnUnavailable("no connection"))
        else:
            # The server carried it out and parked the keys for a COMMIT that never came.
            assert c.prepare_retrieve(key, iid).success
            unsettled.add(key, KVConnInFlightLost("aborted by the heartbeat"))
            if fate == "reported_twice":
                unsettled.add(key, KVConnTimeout("the same load again"))
        assert unsettled.settle(c, iid, timeout=10.0) == 1
        assert len(unsettled) == 0
        c.ping(None, timeout=10.0)  # the async COMMIT_RETRIEVE went out before this
        # The other request still holds its locks (a second release would have dropped
        # them) ...
        assert server_lock_counts(lmcache_server) == (4, 0)
        # ... and once it frees them nothing is locked: ours were released, exactly once.
        c.free_lookup_locks(other)
        c.end_session(other.request_id)
        c.end_session(key.request_id)
        assert server_lock_counts(lmcache_server) == (0, 0)


def test_unanswered_settle_is_retried_then_left_to_the_ttl():
    unsettled = UnsettledLoads()
    key = CacheKey(model_name=MODEL, world_size=1, worker_id=0, token_ids=list(range(CHUNK)),
                   start=0, end=CHUNK, request_id="r")
    unsettled.add(key, KVConnTimeout("x"))
    with LMCacheClient("tcp://127.0.0.1:9", control_timeout=0.2, transfer_timeout=0.2) as c:
        for _ in range(3):
            assert unsettled.settle(c, 1, timeout=0.2) == 0
    assert len(unsettled) == 0


def test_a_free_before_any_query_releases_the_prefetch_locks(lmcache_server):
    """The scheduler frees an acknowledged lookup whose QUERY never reached the server (no
    connection) as a plain miss. That is safe only because LMCache's FREE_LOOKUP_LOCKS hands
    a finished prefetch's result to the session itself when no QUERY did: checked here on a
    real server (LOOKUP, its locks taken, FREE with no QUERY: every lock released)."""
    import time

    from kvconn_plugin.client.protocol import Op
    from kvconn_plugin.client.transport import wait

    tokens = list(range(300, 300 + 2 * CHUNK))
    seed_server(lmcache_server.url, MODEL, tokens)
    with LMCacheClient(lmcache_server.url, control_timeout=10.0) as c:
        key = CacheKey(model_name=MODEL, world_size=1, worker_id=None, token_ids=tokens,
                       start=0, end=2 * CHUNK, request_id=f"req-{uuid.uuid4().hex[:8]}")
        wait(c.lookup_async(key, wait_for_peer=True), Op.LOOKUP, 10.0)
        deadline = time.monotonic() + 10
        while server_lock_counts(lmcache_server) == (0, 0) and time.monotonic() < deadline:
            time.sleep(0.05)  # the prefetch takes its locks in the background
        assert server_lock_counts(lmcache_server) == (4, 0)
        time.sleep(0.5)  # let the prefetch finish: a running one keeps its locks
        c.free_lookup_locks(key)
        c.end_session(key.request_id)
        c.ping(None, timeout=10.0)
        assert server_lock_counts(lmcache_server) == (0, 0)


def test_an_end_session_queued_behind_an_unsent_free_waits_for_its_resend(lmcache_server):
    """Chaos episode 1003 on a real server: FREE_LOOKUP_LOCKS and END_SESSION queued while
    the server is unreachable; the FREE expires unsent and is kept for a resend; the server
    comes back before the END expires. The END must not go out first: LMCache drops the
    lookup result with the session, and the resent FREE would release nothing."""
    import random
    import socket
    import time

    from tests.helpers.fault_proxy import FaultProxy

    def port_outside_ephemeral_range() -> int:
        # A client retrying connects to a port in the ephemeral range can end up connected
        # to itself (TCP simultaneous open) and take the port the relay is to bind.
        for _ in range(100):
            port = random.randrange(20000, 32000)
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
        pytest.skip("no free port below the ephemeral range")

    tokens = list(range(600, 600 + 2 * CHUNK))
    seed_server(lmcache_server.url, MODEL, tokens)
    host, port = lmcache_server.url.removeprefix("tcp://").rsplit(":", 1)
    relay_port = port_outside_ephemeral_range()
    with LMCacheClient(lmcache_server.url, control_timeout=10.0) as direct, \
            LMCacheClient(f"tcp://127.0.0.1:{relay_port}", control_timeout=2.0) as away:
        key = CacheKey(model_name=MODEL, world_size=1, worker_id=None, token_ids=tokens,
                       start=0, end=2 * CHUNK, request_id=f"req-{uuid.uuid4().hex[:8]}")
        assert direct.lookup(key) == 2
        assert server_lock_counts(lmcache_server) == (4, 0)
        free = away.free_lookup_locks_async(key)
        time.sleep(1.0)
        away.end_session_async(key.request_id)  # queued 1 s after the FREE
        with pytest.raises(KVConnUnavailable):
            free.result(timeout=5.0)  # expired unsent: kept for a resend
        with FaultProxy((host, int(port)), port=relay_port):
            deadline = time.monotonic() + 5
            while not away.connected and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.3)  # what was still queued (the END, without the fix) goes out
            away.resend_unsent_frees()
            away.ping(None, timeout=5.0)
            away.ping(None, timeout=5.0)  # the END behind the resent FREE went out too
        assert server_lock_counts(lmcache_server) == (0, 0)
