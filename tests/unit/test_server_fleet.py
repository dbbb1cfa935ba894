"""``ServerFleet``'s fan-out with scripted clients: the minimum hit, the surplus locks freed
on the servers that had more, partial failures, and calls that reach every server."""

from __future__ import annotations

import pytest

from kvconn_plugin.client.protocol import CacheKey
from kvconn_plugin.client.reply_future import ReplyFuture
from kvconn_plugin.errors import (
    KVConnChunkSizeMismatch,
    KVConnTimeout,
    KVConnUnavailable,
)
from kvconn_plugin.scheduler.fleet import ServerFleet

CHUNK = 256


class FakeClient:
    """Records every call; each returns a future the test settles (``reply``)."""

    def __init__(self, url: str, *, up: bool = True):
        self.url = url
        self.up = up
        self.calls: list[tuple] = []
        self.futures: list[ReplyFuture] = []

    @property
    def connected(self) -> bool:
        return self.up

    def _fut(self, *call) -> ReplyFuture:
        if not self.up:
            raise KVConnUnavailable(f"{self.url} down")
        self.calls.append(call)
        fut = ReplyFuture()
        self.futures.append(fut)
        return fut

    def lookup_async(self, key, tp_size=1, timeout=None, wait_for_peer=False):
        return self._fut("lookup", key.start, key.end)

    def query_prefetch_status_async(self, rid, timeout=None, wait_for_peer=False, wake=None):
        return self._fut("query", rid)

    def free_lookup_locks_async(self, key, tp_size=1):
        return self._fut("free", key.start, key.end)

    def end_session_async(self, rid):
        return self._fut("end", rid)

    def clear_async(self, force=False):
        return self._fut("clear", force)

    def flush(self):
        pass

    def close(self):
        pass

    def last(self) -> ReplyFuture:
        return self.futures[-1]

    def named(self, name: str) -> list[tuple]:
        return [c for c in self.calls if c[0] == name]


def _fleet(*clients: FakeClient) -> ServerFleet:
    fleet = ServerFleet([c.url for c in clients], clients=clients)
    fleet.chunk_size = CHUNK
    return fleet


def _key(end: int = 4 * CHUNK, rid: str = "r") -> CacheKey:
    return CacheKey(model_name="m", world_size=1, worker_id=None, token_ids=list(range(end + 1)),
                    start=0, end=end, request_id=rid)


def _ack(fleet: ServerFleet, *clients: FakeClient, rid: str = "r") -> ReplyFuture:
    ack = fleet.lookup_async(_key(rid=rid))
    for c in clients:
        c.last().set_result(None)
    assert ack.done() and ack.exception() is None
    return fleet.query_prefetch_status_async(rid)


def test_min_hit_and_surplus_freed_on_the_others():
    a, b = FakeClient("tcp://a:1"), FakeClient("tcp://b:2")
    fleet = _fleet(a, b)
    q = _ack(fleet, a, b)
    a.last().set_result(3)
    assert not q.done()  # b has not answered
    b.last().set_result(1)
    assert q.result() == 1
    assert a.named("free") == [("free", CHUNK, 3 * CHUNK)]  # [min, a's hit)
    assert b.named("free") == []


def test_equal_hits_free_nothing_and_still_prefetching_asks_again():
    a, b = FakeClient("tcp://a:1"), FakeClient("tcp://b:2")
    fleet = _fleet(a, b)
    q = _ack(fleet, a, b)
    a.last().set_result(2)
    b.last().set_result(None)  # b still prefetching
    assert q.result() is None
    q2 = fleet.query_prefetch_status_async("r")
    assert len(a.named("query")) == 1 and len(b.named("query")) == 2  # only b again
    b.last().set_result(2)
    assert q2.result() == 2
    assert not a.named("free") and not b.named("free")


def test_a_failed_server_counts_as_zero_and_frees_the_rest():
    a, b = FakeClient("tcp://a:1"), FakeClient("tcp://b:2")
    fleet = _fleet(a, b)
    q = _ack(fleet, a, b)
    a.last().set_result(3)
    b.last().set_exception(KVConnTimeout("slow"))
    assert q.result() == 0
    assert a.named("free") == [("free", 0, 3 * CHUNK)]
    assert b.named("free") == [("free", 0, 4 * CHUNK)]  # it may have locked: best effort


def test_a_server_down_at_lookup_is_a_miss_without_waiting():
    a, b = FakeClient("tcp://a:1"), FakeClient("tcp://b:2", up=False)
    fleet = _fleet(a, b)
    assert not fleet.connected
    ack = fleet.lookup_async(_key())
    a.last().set_result(None)
    assert ack.done() and ack.exception() is None
    q = fleet.query_prefetch_status_async("r")
    a.last().set_result(2)
    assert q.result() == 0
    assert a.named("free") == [("free", 0, 2 * CHUNK)]


def test_every_server_down_fails_like_one_client():
    a, b = FakeClient("tcp://a:1", up=False), FakeClient("tcp://b:2", up=False)
    with pytest.raises(KVConnUnavailable):
        _fleet(a, b).lookup_async(_key())


def test_all_lookups_timed_out_leave_recovery_to_the_tracker():
    a, b = FakeClient("tcp://a:1"), FakeClient("tcp://b:2")
    fleet = _fleet(a, b)
    ack = fleet.lookup_async(_key())
    a.last().set_exception(KVConnTimeout("slow"))
    b.last().set_exception(KVConnTimeout("slow"))
    assert isinstance(ack.exception(), KVConnTimeout)
    q = fleet.query_prefetch_status_async("r")  # the tracker's recovery query: both again
    a.last().set_result(2)
    b.last().set_result(1)
    assert q.result() == 1
    assert not a.named("free") and not b.named("free")  # the tracker frees the whole range


def test_frees_sessions_and_clears_reach_every_server():
    a, b, c = FakeClient("tcp://a:1"), FakeClient("tcp://b:2", up=False), FakeClient("tcp://c:3")
    fleet = _fleet(a, b, c)
    with pytest.raises(KVConnUnavailable):  # reported, after the others were asked
        fleet.free_lookup_locks_async(_key(2 * CHUNK))
    with pytest.raises(KVConnUnavailable):
        fleet.end_session_async("r")
    fleet.clear_async(False)
    for cl in (a, c):
        assert [x[0] for x in cl.calls] == ["free", "end", "clear"]


class _Transport:
    def __init__(self, reply):
        self.reply = reply

    def submit(self, op, *args, timeout=None, **kw):
        fut = ReplyFuture()
        if isinstance(self.reply, BaseException):
            fut.set_exception(self.reply)
        else:
            fut.set_result(self.reply)
        return fut


def test_chunk_size_mismatch_and_ping_name_the_servers():
    a, b = FakeClient("tcp://a:1"), FakeClient("tcp://b:2")
    a.transport, b.transport = _Transport(256), _Transport(512)
    fleet = ServerFleet([a.url, b.url], clients=[a, b])
    with pytest.raises(KVConnChunkSizeMismatch, match="tcp://b:2"):
        fleet.get_chunk_size(timeout=1)
    a.transport, b.transport = _Transport(True), _Transport(KVConnTimeout("no reply"))
    with pytest.raises(KVConnUnavailable, match="tcp://b:2: no reply"):
        fleet.ping(None, timeout=1)
    assert fleet.down == {"tcp://b:2"}
    b.transport = _Transport(True)
    assert fleet.ping(None, timeout=1) and not fleet.down
