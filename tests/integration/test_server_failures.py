"""Both sides of the connector against a real LMCache server that freezes, dies with a call in
flight, comes back, or comes back with another chunk size or transfer mode.

The worker adapter runs here with real CPU KV tensors, so every byte the server lends is
really gathered and scattered. "In flight" is made deterministic by freezing the server
(SIGSTOP) before the call and killing it (SIGKILL) while the call waits for its reply.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time

import pytest
import torch

from kvconn_plugin.client.api import LMCacheClient
from kvconn_plugin.client.protocol import CacheKey
from kvconn_plugin.config import parse_config
from kvconn_plugin.metadata import KVConnMetadata, TransferSpec
from kvconn_plugin.parallel import kv_ranks
from kvconn_plugin.worker.adapter import WorkerAdapter
from tests.helpers.connector_config import server_extra_config
from tests.helpers.sched_harness import SchedHarness
from tests.helpers.seed import seed_server, server_lock_counts

pytestmark = pytest.mark.lmcache_server

CHUNK = 256
BLOCK = 16
LAYERS, HEADS, HEAD = 2, 2, 64
NUM_BLOCKS = 64
HEARTBEAT = 0.5
MODEL = "kvconn-test/worker-failures"
POISON = 0x5A


def _config(server, **extra):
    # A long transfer timeout: "fails fast" below then means "noticed the dead connection",
    # never "waited out the deadline".
    return parse_config(server_extra_config(
        server.url, **{"kvconn.transfer_timeout": 120, "lmcache.mp.heartbeat_interval": HEARTBEAT,
                       **extra}))


class Worker:
    """A WorkerAdapter over real (CPU) paged KV tensors, [B, H, N, 2*head] per layer."""

    def __init__(self, server, **extra):
        self.kv = [torch.zeros(NUM_BLOCKS, HEADS, BLOCK, 2 * HEAD, dtype=torch.bfloat16)
                   for _ in range(LAYERS)]
        self.adapter = WorkerAdapter(
            _config(server, **extra), model_name=MODEL,
            ranks=kv_ranks(mla=False, world_size=1, rank=0, tp_size=1),
            block_size=BLOCK, head_size=HEAD)
        self.adapter.register_kv_caches({f"layer{i}": t for i, t in enumerate(self.kv)})

    @property
    def session(self):
        return self.adapter.session

    def fill(self, blocks: range, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        for t in self.kv:
            t[blocks.start:blocks.stop] = torch.randn(
                len(blocks), HEADS, BLOCK, 2 * HEAD, generator=g).to(torch.bfloat16)

    def blocks_bytes(self, blocks: range) -> list[torch.Tensor]:
        return [t[blocks.start:blocks.stop].clone() for t in self.kv]

    def assert_holds(self, blocks: range, expected: list[torch.Tensor]) -> None:
        """Every layer's ``blocks`` hold exactly ``expected`` (``blocks_bytes`` of others)."""
        for t, ref in zip(self.kv, expected, strict=True):
            assert torch.equal(t[blocks.start:blocks.stop].view(torch.uint8), ref.view(torch.uint8))

    def poison(self, blocks: range) -> None:
        for t in self.kv:
            t[blocks.start:blocks.stop].view(torch.uint8).fill_(POISON)

    def store(self, spec: TransferSpec, settle: float = 60.0) -> float:
        """One step's store as vLLM drives it (bind, forward, wait_for_save); returns how
        long wait_for_save held the engine thread, after waiting (at most ``settle`` s) for
        the store's network legs to finish in the background."""
        meta = KVConnMetadata(stores=[spec])
        self.adapter.start_transfers(meta)
        t0 = time.monotonic()
        self.adapter.wait_for_save(meta)
        held = time.monotonic() - t0
        assert self.adapter.wait_stores_idle(settle), "store still unsettled"
        return held

    def load(self, spec: TransferSpec, timeout: float = 20.0) -> tuple[float, set[int]]:
        """Start the load and wait until the worker reports it; returns (seconds, error blocks)."""
        t0 = time.monotonic()
        self.adapter.start_load_kv(KVConnMetadata(loads=[spec]))
        while True:
            _, recving = self.adapter.get_finished(set())
            if recving and spec.request_id in recving:
                return time.monotonic() - t0, self.adapter.get_block_ids_with_load_errors()
            if time.monotonic() - t0 > timeout:
                raise AssertionError(f"load of {spec.request_id} not reported within {timeout}s")
            time.sleep(0.01)

    def close(self) -> None:
        self.adapter.shutdown()


def _spec(rid: str, tokens: list[int], blocks: range) -> TransferSpec:
    return TransferSpec(request_id=rid, token_ids=tuple(tokens), start=0, end=len(tokens),
                        block_ids=tuple(blocks))


def _lookup(server, rid: str, tokens: list[int]) -> int:
    """What the scheduler does before a load: LOOKUP (locks the hit chunks for ``rid``)."""
    key = CacheKey(model_name=MODEL, world_size=1, worker_id=None, token_ids=tokens, start=0,
                   end=len(tokens), request_id=rid)
    with LMCacheClient(server.url) as c:
        return c.lookup(key, timeout=10)


def _tokens(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, 30000, (n,), generator=g).tolist()


def _wait_for(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _wait_sent(worker: Worker, timeout: float = 5.0) -> None:
    """Until a request is on the wire (the frozen server will never answer it)."""
    transport = worker.session.client.transport
    _wait_for(lambda: any(p.sent for p in list(transport._pending.values())), timeout,
              "a request in flight")


@pytest.fixture
def server(lmcache_server_factory):
    srv = lmcache_server_factory()
    yield srv
    srv.kill()


def test_retrieve_in_flight_when_server_dies_becomes_load_error_then_hits_resume(server):
    w = Worker(server)
    try:
        toks, blocks = _tokens(2 * CHUNK, 1), range(2 * CHUNK // BLOCK)
        w.fill(blocks, seed=1)
        expected = w.blocks_bytes(blocks)
        w.store(_spec("a-store", toks, blocks))
        assert w.adapter.stats.data.get("stored_chunks") == 2

        # The retrieve is sent to a frozen server, which is then killed: the connection
        # drop fails it at once instead of after the 30 s transfer timeout.
        dst = range(32, 32 + len(blocks))
        w.poison(dst)
        assert _lookup(server, "a-load", toks) == 2
        server.freeze()
        killer = threading.Timer(1.0, server.kill_hard)
        killer.start()
        try:
            took, errors = w.load(_spec("a-load", toks, dst))
        finally:
            killer.join()
        assert errors == set(dst), "every block of the failed load is reported for recompute"
        assert took < 30, f"load error took {took:.1f}s (the deadline is 120 s)"
        for t in w.kv:  # nothing was written into vLLM's blocks
            assert bool((t[dst.start:dst.stop].view(torch.uint8) == POISON).all())
        _wait_for(lambda: not w.session.healthy, 2 * HEARTBEAT + 5, "the worker to notice")

        # While the server is down: loads fail fast, stores are dropped, nothing raises.
        took, errors = w.load(_spec("a-down", toks, dst))
        assert errors == set(dst) and took < 30
        w.store(_spec("a-down-store", toks, blocks))
        assert w.adapter.stats.data.get("store_failures", 0) >= 1

        # Back on the same address with a new, empty pool: re-register, then round trips work.
        server.restart()
        _wait_for(lambda: w.session.healthy, 2 * HEARTBEAT + 10, "re-registration")
        w.store(_spec("b-store", toks, blocks))
        w.poison(dst)
        assert _lookup(server, "b-load", toks) == 2
        _, errors = w.load(_spec("b-load", toks, dst))
        assert errors == set()
        w.assert_holds(dst, expected)
    finally:
        w.close()


def test_store_in_flight_when_server_dies_is_dropped_without_raising(server):
    w = Worker(server)
    try:
        toks, blocks = _tokens(CHUNK, 2), range(CHUNK // BLOCK)
        w.fill(blocks, seed=2)
        server.freeze()
        done = threading.Event()
        errors: list[BaseException] = []

        def store():
            try:
                w.store(_spec("s-store", toks, blocks))
            except BaseException as exc:  # the test reports it
                errors.append(exc)
            done.set()

        t = threading.Thread(target=store)
        t.start()
        _wait_sent(w)
        t0 = time.monotonic()
        server.kill_hard()
        assert done.wait(60), "the store still blocks after the server died"
        t.join()
        assert not errors
        assert time.monotonic() - t0 < 30  # the deadline is 120 s
        assert w.adapter.stats.data.get("store_failures") == 1
        assert not w.adapter.stats.data.get("stored_chunks")
    finally:
        w.close()


def test_restart_with_another_chunk_size_disables_instead_of_mixing(server, caplog):
    w = Worker(server)
    h = SchedHarness.for_server(server.url, {"lmcache.mp.heartbeat_interval": HEARTBEAT},
                                max_model_len=4096, max_num_batched_tokens=2048)
    sched = h.connector._scheduler
    try:
        assert w.session.chunk_size == CHUNK and sched.chunk_size == CHUNK
        toks, blocks = _tokens(CHUNK, 3), range(CHUNK // BLOCK)
        w.fill(blocks, seed=3)
        w.store(_spec("c-store", toks, blocks))

        with caplog.at_level(logging.ERROR, logger="kvconn_plugin"):
            server.restart(chunk_size=2 * CHUNK)
            _wait_for(lambda: w.session.disabled_reason is not None, 2 * HEARTBEAT + 10,
                      "the worker to disable the cache")
            _wait_for(lambda: sched._health.disabled_reason is not None, 2 * HEARTBEAT + 10,
                      "the scheduler to disable the cache")
        assert "chunk size changed from 256 to 512" in w.session.disabled_reason
        assert "chunk size changed from 256 to 512" in sched._health.disabled_reason
        assert any("disabling the KV cache" in r.getMessage() for r in caplog.records)

        # Stays off: never registers into the new layout, keeps chunk 256 for its own math.
        time.sleep(3 * HEARTBEAT)
        assert not w.session.healthy and not sched.healthy
        assert w.session.chunk_size == CHUNK and sched.chunk_size == CHUNK

        # The scheduler answers 0 at once and plans no stores; the worker drops both ways.
        req = h.request("c-req", toks + _tokens(CHUNK, 4))
        assert sched.get_num_new_matched_tokens(req, 0) == (0, False)
        _, errors = w.load(_spec("c-load", toks, range(32, 32 + len(blocks))))
        assert errors == set(range(32, 32 + len(blocks)))
        w.store(_spec("c-store2", toks, blocks))
        assert w.adapter.stats.data.get("store_failures", 0) >= 1
    finally:
        h.connector.shutdown()
        w.close()


def test_restart_without_engine_driven_mode_keeps_the_cache_off(server):
    w = Worker(server)
    try:
        toks, blocks = _tokens(CHUNK, 5), range(CHUNK // BLOCK)
        server.restart(transfer_mode="lmcache_driven")
        _wait_for(lambda: not w.session.healthy, 2 * HEARTBEAT + 10, "the worker to notice")
        # Registration is never answered by such a server; the worker keeps retrying in the
        # background and every transfer fails fast in the meantime.
        time.sleep(3 * HEARTBEAT)
        assert not w.session.healthy
        took, errors = w.load(_spec("d-load", toks, range(32, 32 + len(blocks))))
        assert errors == set(range(32, 32 + len(blocks))) and took < 30
    finally:
        w.close()


def test_frozen_server_never_blocks_the_scheduler_step(server):
    """Connection up, no replies (SIGSTOP): every lookup times out into a miss, requests are
    computed without the cache, and late replies after SIGCONT change nothing."""
    h = SchedHarness.for_server(server.url, {"kvconn.lookup_timeout": 1.0},
                                max_model_len=4096, max_num_batched_tokens=2048)
    try:
        server.freeze()
        h.add(*(h.request(f"f{i}", _tokens(3 * CHUNK, 10 + i)) for i in range(4)))
        slowest, steps, t_end = 0.0, 0, time.monotonic() + 60
        while h.scheduler.has_requests() and time.monotonic() < t_end:
            t0 = time.monotonic()
            h.step()
            slowest = max(slowest, time.monotonic() - t0)
            steps += 1
            time.sleep(0.01)
        assert not h.scheduler.has_requests(), "requests did not complete against a frozen server"
        # A blocked network call would take the control timeout (5 s) or more.
        assert slowest < 2.5, f"a scheduler step took {slowest:.2f}s"
        os.killpg(server.process.pid, signal.SIGCONT)
        h.add(h.request("f-after", _tokens(3 * CHUNK, 20)))
        for _ in range(400):
            if not h.scheduler.has_requests():
                break
            h.step()
            time.sleep(0.01)
        h.assert_empty()
    finally:
        if server.process is not None:
            os.killpg(server.process.pid, signal.SIGCONT)
        h.connector.shutdown()


def test_frozen_server_mid_transfer_is_cut_off_by_the_heartbeat(server):
    """SIGSTOP keeps the connection up, so no disconnect fails the calls: the heartbeat's
    missed ping must end the waiting store and retrieve (deadline 120 s) within about two
    intervals, and the session must recover by itself after SIGCONT."""
    w = Worker(server)
    try:
        toks, blocks = _tokens(CHUNK, 6), range(CHUNK // BLOCK)
        w.fill(blocks, seed=6)
        expected = w.blocks_bytes(blocks)
        w.store(_spec("e-seed", toks, blocks))
        dst = range(32, 32 + len(blocks))
        assert _lookup(server, "e-load", toks) == 1

        server.freeze()
        w.poison(dst)
        # Both in flight at once: the retrieve on the load thread, the store right here.
        loading = threading.Thread(target=lambda: result.append(w.load(_spec("e-load", toks, dst))))
        result: list[tuple[float, set[int]]] = []
        loading.start()
        _wait_sent(w)
        t0 = time.monotonic()
        w.store(_spec("e-store", toks + _tokens(CHUNK, 7), range(2 * CHUNK // BLOCK)))
        store_s = time.monotonic() - t0
        loading.join(60)
        assert w.adapter.stats.data.get("store_failures") == 1
        assert not w.session.healthy
        (load_s, errors), = result
        assert errors == set(dst)
        for t in w.kv:
            assert bool((t[dst.start:dst.stop].view(torch.uint8) == POISON).all())
        # A store waits at most ~2 heartbeat intervals (0.5 s each here), never its 120 s
        # deadline; the margin is for this loaded 2-vCPU host.
        assert store_s < 4 * HEARTBEAT + 5, f"store blocked {store_s:.1f}s"
        assert load_s < 4 * HEARTBEAT + 5, f"load reported after {load_s:.1f}s"

        os.killpg(server.process.pid, signal.SIGCONT)
        _wait_for(lambda: w.session.healthy, 2 * HEARTBEAT + 10, "recovery after SIGCONT")
        assert _lookup(server, "e-load2", toks) == 1
        w.poison(dst)
        _, errors = w.load(_spec("e-load2", toks, dst))
        assert errors == set()
        w.assert_holds(dst, expected)
    finally:
        if server.process is not None:
            os.killpg(server.process.pid, signal.SIGCONT)
        w.close()


# ---------------------------------------------------------------------------- no server at start


def _dead_address(lmcache_server_factory):
    """A server started and killed at once: an address with nobody behind it, which the test
    can bring up again later with ``restart()``."""
    srv = lmcache_server_factory()
    srv.kill()
    return srv


@pytest.mark.parametrize("role", ["scheduler", "worker"])
def test_no_server_at_start_up_warns_once_then_picks_the_server_up(lmcache_server_factory,
                                                                  caplog, role):
    srv = _dead_address(lmcache_server_factory)
    _host, _port = srv.url.rsplit(":", 1)
    with caplog.at_level(logging.INFO, logger="kvconn_plugin"):
        t0 = time.monotonic()
        if role == "worker":
            w = Worker(srv)
            healthy = lambda: w.session.healthy  # noqa: E731
            close = w.close
        else:
            h = SchedHarness.for_server(srv.url, {"lmcache.mp.heartbeat_interval": HEARTBEAT},
                                        max_model_len=4096)
            healthy = lambda: h.connector._scheduler.healthy  # noqa: E731
            close = h.connector.shutdown
        took = time.monotonic() - t0
    try:
        # Decided by kvconn.connect_timeout (5 s), not by any longer deadline.
        assert took < 30, f"start-up took {took:.1f}s without a server"
        warnings = [r.getMessage() for r in caplog.records
                    if r.levelno >= logging.WARNING and r.name.startswith("kvconn_plugin")]
        if role == "scheduler":  # the one warning of an engine: address and how to fix it
            assert len(warnings) == 1, warnings
            assert srv.url in warnings[0] and "lmcache server --l1-size-gb" in warnings[0]
        else:  # every worker only notes it (INFO): N ranks must not add N warnings
            assert not warnings, warnings
            assert any(srv.url in r.getMessage() for r in caplog.records)
        assert not healthy()
        srv.restart()  # the server comes up later: picked up in the background
        _wait_for(healthy, 2 * HEARTBEAT + 15, f"the {role} to pick the server up")
    finally:
        close()


@pytest.mark.parametrize("role", ["scheduler", "worker"])
def test_require_server_fails_start_up_naming_the_address(lmcache_server_factory, role):
    from kvconn_plugin.errors import KVConnError

    srv = _dead_address(lmcache_server_factory)
    _host, _port = srv.url.rsplit(":", 1)
    t0 = time.monotonic()
    with pytest.raises(KVConnError) as err:
        if role == "worker":
            Worker(srv, **{"kvconn.require_server": True})
        else:
            SchedHarness.for_server(srv.url, {"kvconn.require_server": True}, max_model_len=4096)
    assert time.monotonic() - t0 < 30
    assert srv.url in str(err.value) and "require_server" in str(err.value)


@contextlib.contextmanager
def _frozen_server_with_hits(server, n: int, seed: int, heartbeat: float):
    """A scheduler harness (1 s lookup and control deadlines) on ``server``, which holds two
    seeded chunks of each of ``n`` prompts and is then frozen (SIGSTOP). Yields
    ``(harness, prompts)``; resumes the server and shuts the connector down after."""
    h = SchedHarness.for_server(
        server.url, {"lmcache.mp.mq_timeout": 1, "kvconn.lookup_timeout": 1,
                     "lmcache.mp.heartbeat_interval": heartbeat},
        max_model_len=4096, max_num_batched_tokens=4096)
    model = h.vllm_config.model_config.model
    try:
        prompts = [_tokens(2 * CHUNK, seed + i) for i in range(n)]
        for p in prompts:
            seed_server(server.url, model, [*p, 7])
        assert server_lock_counts(server) == (0, 0)
        server.freeze()
        yield h, prompts
    finally:
        if server.process is not None:
            os.killpg(server.process.pid, signal.SIGCONT)
        h.connector.shutdown()


def _run_until_settled_and_unlocked(h: SchedHarness, server) -> None:
    """Step until every request and every unsettled lookup is done, then wait for the
    server's read locks to drop."""
    sched = h.connector._scheduler
    deadline = time.monotonic() + 60
    while (h.scheduler.has_requests() or sched._closing) and time.monotonic() < deadline:
        h.step()
        time.sleep(0.01)
    h.assert_empty()
    assert not sched._closing
    _wait_for(lambda: server_lock_counts(server) == (0, 0), 15,
              f"the server's read locks to drop (now {server_lock_counts(server)})")


def test_lookups_that_time_out_on_a_stalled_server_still_free_their_locks(server):
    """LOOKUPs sent to a stalled server time out on our side, but the server carries them
    out once it resumes and read-locks the hit chunks. The connector must recover those
    locks (one more QUERY, then FREE_LOOKUP_LOCKS) rather than leave them pinned for the
    server's 300 s read TTL; the requests themselves are served as misses."""
    with _frozen_server_with_hits(server, 6, 40, heartbeat=30) as (h, prompts):
        h.add(*(h.request(f"s{i}", p + _tokens(40, 50 + i)) for i, p in enumerate(prompts)))
        h.step()  # lookups go out to the stalled server
        time.sleep(1.6)  # their acks time out (1 s); recovery QUERYs queue behind them
        os.killpg(server.process.pid, signal.SIGCONT)
        _run_until_settled_and_unlocked(h, server)
        assert not h.connector._scheduler._trackers


def test_lookups_lost_with_their_connection_to_a_stopped_server_are_recovered(server):
    """A server stopped longer than every recovery QUERY's deadline (the heartbeat drops the
    connection meanwhile): the LOOKUPs sent to it are still carried out when it resumes.
    Their locks must be freed only once the server answers again and their prefetch is
    over; a FREE sent earlier, or while the prefetch runs, releases nothing (chaos 7109)."""
    with _frozen_server_with_hits(server, 4, 80, heartbeat=1) as (h, prompts):
        h.add(*(h.request(f"stop{i}", p + _tokens(40, 90 + i)) for i, p in enumerate(prompts)))
        deadline = time.monotonic() + 7  # past 3 recovery QUERYs of 1 s each
        while time.monotonic() < deadline:
            h.step()
            time.sleep(0.05)
        os.killpg(server.process.pid, signal.SIGCONT)
        _run_until_settled_and_unlocked(h, server)


def test_an_idle_engine_still_frees_the_locks_of_its_last_requests(server):
    """Requests that finish while their lookup's outcome is unknown (the server stalled)
    are settled later. The engine may then have nothing left to run, so no scheduler step
    comes to do it: the health thread must, or their chunks stay read-locked for the
    server's 300 s TTL (found by the chaos harness: a dropped QUERY reply, then idle)."""
    from vllm.v1.request import RequestStatus

    with _frozen_server_with_hits(server, 4, 60, heartbeat=1) as (h, prompts):
        sched = h.connector._scheduler
        ids = [f"idle{i}" for i in range(len(prompts))]
        h.add(*(h.request(rid, p + _tokens(40, 70 + i))
                for i, (rid, p) in enumerate(zip(ids, prompts, strict=True))))
        h.step()  # lookups go out to the stalled server
        time.sleep(1.6)  # they time out on our side; the server will still carry them out
        h.scheduler.finish_requests(ids, RequestStatus.FINISHED_ABORTED)
        assert sched._closing, "nothing left to settle: the test lost its point"
        os.killpg(server.process.pid, signal.SIGCONT)
        # No step from here on, as in an engine with nothing to run.
        _wait_for(lambda: not sched._closing, 20, "the finished lookups to settle")
        _wait_for(lambda: server_lock_counts(server) == (0, 0), 15,
                  f"the server's read locks to drop (now {server_lock_counts(server)})")


def test_a_lookup_after_a_preemption_leaves_no_lock_of_the_one_before(server):
    """A request whose lookup timed out runs as a miss while that lookup stays unsettled;
    preempted, it is looked up again when it resumes. The server keeps one prefetch job
    per session id: sent under the same id, the second LOOKUP replaced the first one's
    job, whose read locks nobody could free any more, and the first lookup's QUERY took
    the second one's result (chaos 7105: 1-2 chunks read-locked after balanced traffic).
    Both lookups are queued at a stalled server here, so it sees them back to back."""
    from vllm.v1.request import RequestStatus

    with _frozen_server_with_hits(server, 1, 120, heartbeat=30) as (h, prompts):
        sched = h.connector._scheduler
        h.add(h.request("pre0", prompts[0] + _tokens(40, 130)))
        h.step()  # the first LOOKUP goes out to the stalled server
        first = sched._trackers["pre0"]
        assert first.in_flight
        sched._reset_for_resume(first)  # what a preemption of the request does
        h.step()  # the resumed request's LOOKUP follows it
        second = sched._trackers["pre0"]
        assert second is not first and second.in_flight
        assert second.session_id != first.session_id
        # Aborted before either answer: no load takes the hit's locks, so every lock
        # either lookup took must be freed by the connector.
        h.scheduler.finish_requests(["pre0"], RequestStatus.FINISHED_ABORTED)
        os.killpg(server.process.pid, signal.SIGCONT)
        _run_until_settled_and_unlocked(h, server)


class _Via:
    """What ``Worker`` needs of a server (its address), for a fault proxy's address."""

    def __init__(self, url: str):
        self.url = url


def test_a_lost_commit_store_is_committed_again_once_the_server_answers(server):
    """A COMMIT_STORE that never reached the server leaves the chunks write-reserved (LMCache
    cannot cancel a reservation; its write TTL is 600 s). The heartbeat commits it again:
    the write locks go and the objects, with the bytes we copied, become loadable."""
    from tests.helpers.fault_proxy import Fault, FaultProxy

    with FaultProxy((server.host, server.port), seed=3) as proxy:
        w = Worker(_Via(proxy.url), **{"kvconn.transfer_timeout": 2})
        try:
            toks, blocks = _tokens(2 * CHUNK, 12), range(2 * CHUNK // BLOCK)
            w.fill(blocks, seed=12)
            expected = w.blocks_bytes(blocks)
            proxy.arm([Fault("drop_request", at_msg=0, op="COMMIT_STORE")])
            w.store(_spec("lost-commit", toks, blocks))
            log = proxy.heal()
            assert [e["op"] for e in log if e["kind"] == "dropped"] == ["COMMIT_STORE"]
            # Without the retry the write locks would stay for the server's 600 s TTL.
            _wait_for(lambda: server_lock_counts(server) == (0, 0), 15,
                      f"the write reservation to be committed (now {server_lock_counts(server)})")
            dst = range(32, 32 + len(blocks))
            w.poison(dst)
            assert _lookup(server, "lost-commit-load", toks) == 2
            _, errors = w.load(_spec("lost-commit-load", toks, dst))
            assert errors == set()
            w.assert_holds(dst, expected)
        finally:
            w.close()


def test_a_lost_commit_retrieve_is_sent_again_once_the_server_answers(server):
    """A COMMIT_RETRIEVE that never reached the server leaves the load's chunks read-locked
    for the server's 300 s read TTL (chaos episode 1028). The heartbeat sends it again; a
    second COMMIT after one that did arrive releases nothing, since the server pops the
    load's parked keys under (instance, key)."""
    from tests.helpers.fault_proxy import Fault, FaultProxy

    with FaultProxy((server.host, server.port), seed=4) as proxy:
        w = Worker(_Via(proxy.url), **{"kvconn.transfer_timeout": 2})
        try:
            toks, blocks = _tokens(2 * CHUNK, 14), range(2 * CHUNK // BLOCK)
            w.fill(blocks, seed=14)
            w.store(_spec("lost-commit-retrieve", toks, blocks))
            assert server_lock_counts(server) == (0, 0)
            assert _lookup(server, "lost-commit-retrieve-load", toks) == 2  # read-locks both
            proxy.arm([Fault("drop_request", at_msg=0, op="COMMIT_RETRIEVE")])
            _, errors = w.load(_spec("lost-commit-retrieve-load", toks, range(32, 64)))
            assert errors == set()  # the copy itself worked
            _wait_for(lambda: server_lock_counts(server) == (0, 0), 15,
                      f"the read locks to be released (now {server_lock_counts(server)})")
            log = proxy.heal()
            assert [e["op"] for e in log if e["kind"] == "dropped"] == ["COMMIT_RETRIEVE"]
        finally:
            w.close()


def _twin_loads(w: Worker, server, name: str, seed: int, *, arm=None,
                later_step: bool = False) -> None:
    """Store two chunks, look them up for two requests, then load both requests' copies
    (in one step, or the second in the next step once the first is reported; ``arm`` runs
    just before the loads). Both loads must work and give the stored bytes back."""
    toks, blocks = _tokens(2 * CHUNK, seed), range(2 * CHUNK // BLOCK)
    w.fill(blocks, seed=seed)
    expected = w.blocks_bytes(blocks)
    w.store(_spec(name, toks, blocks))
    a, b = f"{name}-a", f"{name}-b"
    assert _lookup(server, a, toks) == 2 and _lookup(server, b, toks) == 2
    dst_a, dst_b = range(32, 64), range(32)
    w.poison(dst_a)
    w.poison(dst_b)
    if arm is not None:
        arm()
    done: set[str] = set()

    def reported(ids: set[str]) -> bool:
        done.update(w.adapter.get_finished(set())[1] or ())
        return ids <= done

    if later_step:
        w.adapter.start_load_kv(KVConnMetadata(loads=[_spec(a, toks, dst_a)]))
        _wait_for(lambda: reported({a}), 20, "the first load to be reported")
        w.adapter.start_load_kv(KVConnMetadata(loads=[_spec(b, toks, dst_b)]))
    else:
        w.adapter.start_load_kv(KVConnMetadata(loads=[_spec(a, toks, dst_a),
                                                      _spec(b, toks, dst_b)]))
    _wait_for(lambda: reported({a, b}), 20, "both loads to be reported")
    assert w.adapter.get_block_ids_with_load_errors() == set()
    for dst in (dst_a, dst_b):
        w.assert_holds(dst, expected)


def test_two_loads_of_the_same_chunks_in_one_step_release_every_lock(server):
    """Two requests with the same prompt, each with its own lookup, load the same chunks in
    one step. LMCache parks a retrieve's locks under (instance, key) and leaves the request
    id out of the key's identity, so two PREPAREs in flight at once shared one entry and
    the second request's read locks stayed for the 300 s TTL (chaos episodes 1020, 1028,
    1053: read locks left without any fault). Both loads must work and free every lock."""
    w = Worker(server)
    try:
        _twin_loads(w, server, "twin", 16)
        _wait_for(lambda: server_lock_counts(server) == (0, 0), 15,
                  f"every read lock to be released (now {server_lock_counts(server)})")
    finally:
        w.close()


@pytest.mark.parametrize("later_step", [False, True], ids=["same-step", "next-step"])
def test_a_twin_load_waits_for_a_lost_commit_retrieve_to_be_settled(server, later_step):
    """Chaos episode 1106: the first of two loads of the same chunks loses its
    COMMIT_RETRIEVE. A PREPARE of the twin before that COMMIT is applied takes over the
    server's parked entry (the request id is not part of the key's identity), the twin's
    COMMIT releases one read lock per chunk, and the retried COMMIT finds nothing: one
    lookup's locks stay for the 300 s TTL. The twin must wait until the lost COMMIT is
    settled, in the same step or in a later one sent before the heartbeat's retry."""
    from tests.helpers.fault_proxy import Fault, FaultProxy

    with FaultProxy((server.host, server.port), seed=5) as proxy:
        w = Worker(_Via(proxy.url), **{"kvconn.transfer_timeout": 2,
                                       "lmcache.mp.heartbeat_interval": 2})
        try:
            _twin_loads(w, server, "lost-twin", 17, later_step=later_step,
                        arm=lambda: proxy.arm([Fault("drop_request", at_msg=0,
                                                     op="COMMIT_RETRIEVE")]))
            _wait_for(lambda: server_lock_counts(server) == (0, 0), 20,
                      f"every read lock to be released (now {server_lock_counts(server)})")
            log = proxy.heal()
            assert [e["op"] for e in log if e["kind"] == "dropped"] == ["COMMIT_RETRIEVE"]
        finally:
            w.close()


def test_wait_for_save_never_waits_on_a_frozen_server(server):
    """The engine thread's part of a store is the copy out of vLLM's blocks: with the
    server frozen and every network deadline long (30 s heartbeat, 120 s transfers),
    wait_for_save still returns at once (staged copy), and the store settles later."""
    w = Worker(server, **{"lmcache.mp.heartbeat_interval": 30})
    try:
        toks, blocks = _tokens(2 * CHUNK, 9), range(2 * CHUNK // BLOCK)
        w.fill(blocks, seed=9)
        expected = w.blocks_bytes(blocks)
        server.freeze()
        meta = KVConnMetadata(stores=[_spec("g-store", toks, blocks)])
        w.adapter.start_transfers(meta)
        t0 = time.monotonic()
        w.adapter.wait_for_save(meta)
        assert time.monotonic() - t0 < 10, "wait_for_save waited on the frozen server"
        assert w.adapter.stores.in_flight == 1  # staged, waiting for its slots
        w.poison(blocks)  # vLLM reuses the blocks: the staged copy must not care
        os.killpg(server.process.pid, signal.SIGCONT)
        assert w.adapter.wait_stores_idle(60)
        assert w.adapter.stats.data.get("stored_chunks") == 2
        dst = range(32, 32 + len(blocks))
        assert _lookup(server, "g-load", toks) == 2
        _, errors = w.load(_spec("g-load", toks, dst))
        assert errors == set()
        w.assert_holds(dst, expected)
    finally:
        if server.process is not None:
            os.killpg(server.process.pid, signal.SIGCONT)
        w.close()


def test_a_late_slot_is_filled_after_vllm_mapped_the_pool_under_inference_mode(server):
    """vLLM binds the step's metadata and calls wait_for_save under torch.inference_mode():
    a store whose slots were lent in time maps the SHM pool there. A later store whose
    PREPARE_STORE reply comes after wait_for_save is staged, and its slots are filled on
    the store thread, outside inference mode; it must still be stored, with the bytes its
    blocks held at wait_for_save, and leave no write lock behind (it used to fail in the
    finisher, after the server had reserved its slots)."""
    w = Worker(server, **{"lmcache.mp.heartbeat_interval": 30})
    try:
        direct, d_blocks = _tokens(CHUNK, 21), range(CHUNK // BLOCK)
        w.fill(d_blocks, seed=21)
        meta = KVConnMetadata(stores=[_spec("im-direct", direct, d_blocks)])
        with torch.inference_mode():
            w.adapter.start_transfers(meta)
            _wait_for(lambda: all(p.prepared.done() for p in w.adapter._begun), 10,
                      "the PREPARE_STORE reply")
            w.adapter.wait_for_save(meta)  # the slots are lent: the direct path
        assert w.adapter.wait_stores_idle(30)
        assert w.adapter.stats.data.get("stores_staged", 0) == 0
        toks, blocks = _tokens(CHUNK, 22), range(16, 16 + CHUNK // BLOCK)
        w.fill(blocks, seed=22)
        expected = w.blocks_bytes(blocks)
        server.freeze()
        meta = KVConnMetadata(stores=[_spec("im-staged", toks, blocks)])
        with torch.inference_mode():
            w.adapter.start_transfers(meta)
            w.adapter.wait_for_save(meta)
        assert w.adapter.stores.in_flight == 1  # staged, waiting for its slots
        w.poison(blocks)
        os.killpg(server.process.pid, signal.SIGCONT)
        assert w.adapter.wait_stores_idle(60)
        assert w.adapter.stats.data.get("stores_staged") == 1
        assert w.adapter.stats.data.get("store_failures", 0) == 0
        assert w.adapter.stats.data.get("stored_chunks") == 2
        _wait_for(lambda: server_lock_counts(server)[1] == 0, 10, "no write lock left")
        dst = range(32, 32 + len(blocks))
        assert _lookup(server, "im-load", toks) == 1
        _, errors = w.load(_spec("im-load", toks, dst))
        assert errors == set()
        w.assert_holds(dst, expected)
    finally:
        if server.process is not None:
            os.killpg(server.process.pid, signal.SIGCONT)
        w.close()
