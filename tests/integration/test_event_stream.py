"""The server's cache-event stream, followed by ServerEventStream against real servers:
evictions arrive under the chunk hashes we compute, restarts and deaths ask for a resync."""

from __future__ import annotations

import random
import threading
import time

import pytest

from kvconn_plugin.client.api import LMCacheClient
from kvconn_plugin.client.chunk_hash import chunk_hashes
from kvconn_plugin.client.event_stream import ServerEventStream
from tests.helpers.seed import CHUNK, seed_server

pytestmark = pytest.mark.lmcache_server

MODEL = "stream-model"


class Sink:
    def __init__(self) -> None:
        self.removed: list[bytes] = []
        self.stored: list[bytes] = []
        self.resyncs: list[str] = []
        self.changed = threading.Condition()

    def on_records(self, records, received_at) -> None:
        with self.changed:
            for r in records:
                (self.removed if r.kind == "removed" else self.stored).extend(r.block_hashes)
            self.changed.notify_all()

    def on_resync(self, reason: str) -> None:
        with self.changed:
            self.resyncs.append(reason)
            self.changed.notify_all()

    def wait(self, pred, timeout: float) -> bool:
        with self.changed:
            return self.changed.wait_for(pred, timeout)


def _tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(10, 30000) for _ in range(n)]


def _wait_live(stream: ServerEventStream, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not stream.live and time.monotonic() < deadline:
        time.sleep(0.05)
    return stream.live


def test_clear_reports_our_chunk_hashes(lmcache_server_factory):
    server = lmcache_server_factory()
    sink = Sink()
    stream = ServerEventStream(server.url, MODEL, sink, interval=0.5, control_timeout=2)
    stream.start()
    try:
        assert _wait_live(stream, 20)
        toks = _tokens(3 * CHUNK + 10, 1)
        seed_server(server.url, MODEL, toks)
        seed_server(server.url, "another-model", toks)  # filtered out by model name
        with LMCacheClient(server.url) as c:
            c.clear(force=False)
        ours = chunk_hashes(toks, CHUNK, [])
        assert sink.wait(lambda: set(ours) <= set(sink.removed), 20), sink.removed
        assert len(sink.removed) == len(ours)  # the other model's evictions are not ours
        assert not sink.resyncs
        # Idle for several ping periods: the subscription stays (pings keep it alive).
        time.sleep(2)
        assert stream.live and not sink.resyncs
    finally:
        stream.close()


def test_restart_and_death_ask_for_resync(lmcache_server_factory):
    server = lmcache_server_factory()
    sink = Sink()
    stream = ServerEventStream(server.url, MODEL, sink, interval=0.5, control_timeout=2)
    stream.start()
    try:
        assert _wait_live(stream, 20)
        server.restart()
        assert sink.wait(lambda: sink.resyncs, 30)
        assert _wait_live(stream, 60)  # resubscribed to the new server
        toks = _tokens(CHUNK + 1, 2)
        seed_server(server.url, MODEL, toks)
        with LMCacheClient(server.url) as c:
            c.clear(force=False)
        ours = chunk_hashes(toks, CHUNK, [])
        assert sink.wait(lambda: set(ours) <= set(sink.removed), 20)
        n = len(sink.resyncs)
        server.kill_hard()
        assert sink.wait(lambda: len(sink.resyncs) > n, 30)  # a dead server: withdraw
        assert not stream.live
    finally:
        t0 = time.monotonic()
        stream.close()
        assert time.monotonic() - t0 < 10  # closing never hangs on a dead server


def test_server_without_event_log_is_never_live(lmcache_server_factory):
    server = lmcache_server_factory(extra_args=("--kv-event-log-size", "0"))
    with LMCacheClient(server.url) as c:
        assert "kv_event_stream" not in c.get_experimental()
    sink = Sink()
    stream = ServerEventStream(server.url, MODEL, sink, interval=0.2, control_timeout=2)
    stream.start()
    try:
        time.sleep(1.5)
        assert not stream.live and not sink.resyncs
    finally:
        stream.close()


def test_an_eviction_on_any_of_two_servers_withdraws_the_chunk(lmcache_server_factory):
    """With two servers each holds its rank block's share of a chunk, so an eviction on
    either one ends the hit: OffloadEvents follows both logs, withdraws what the second
    server evicted, and withdraws everything when one of them is lost."""
    from vllm.distributed.kv_events import BlockRemoved, BlockStored

    from kvconn_plugin.metadata import TransferSpec
    from kvconn_plugin.scheduler.events import OffloadEvents
    from kvconn_plugin.store_acks import StoreAckBatch
    from tests.helpers.sched_harness import make_request

    servers = [lmcache_server_factory(), lmcache_server_factory()]
    bs = 16
    ev = OffloadEvents(block_size=bs, writers=2)
    ev.start_streams([s.url for s in servers], MODEL, interval=0.5, control_timeout=2)
    try:
        deadline = time.monotonic() + 20
        while not ev.live and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ev.live and len(ev.streams) == 2
        toks = _tokens(2 * CHUNK, 7)
        req = make_request("r", toks, block_size=bs)
        ev.watch(req)
        spec = TransferSpec(request_id="r", token_ids=tuple(toks), start=0, end=2 * CHUNK,
                            block_ids=tuple(range(2 * CHUNK // bs)))
        ev.on_stores_planned([spec], CHUNK)
        ev.on_worker_events(StoreAckBatch([("r", 0, 2 * CHUNK, (0, 1))] * 2))
        assert [type(e) for e in ev.take()] == [BlockStored, BlockStored]
        # The second server evicts the chunks (its CLEAR): both are withdrawn.
        seed_server(servers[1].url, MODEL, toks)
        with LMCacheClient(servers[1].url) as c:
            c.clear(force=False)
        removed: list = []
        deadline = time.monotonic() + 20
        while ev.announced_chunks and time.monotonic() < deadline:
            removed += [e for e in ev.take() if isinstance(e, BlockRemoved)]
            time.sleep(0.05)
        assert ev.announced_chunks == 0
        assert len({h for e in removed for h in e.block_hashes}) == 2 * CHUNK // bs
        # Announced again, then the first server dies: its log is lost, all is withdrawn.
        ev.on_stores_planned([spec], CHUNK)
        ev.on_worker_events(StoreAckBatch([("r", 0, 2 * CHUNK, (0, 1))] * 2))
        assert ev.announced_chunks == 2
        servers[0].kill_hard()
        deadline = time.monotonic() + 30
        while ev.announced_chunks and time.monotonic() < deadline:
            ev.take()
            time.sleep(0.1)
        assert ev.announced_chunks == 0 and not ev.live
    finally:
        ev.close()
