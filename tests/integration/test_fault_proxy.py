"""The chaos harness's fault proxy (``tests/helpers/fault_proxy.py``) against a real LMCache
server and our wire client, no engine: every fault kind observably happens, pass-through is
byte-exact, and the proxy itself stays bounded and cleans up."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Iterator

import pytest
import zmq

from kvconn_plugin.client import CacheKey, LMCacheClient
from kvconn_plugin.errors import KVConnInFlightLost, KVConnTimeout
from tests.helpers.fault_proxy import Fault, FaultProxy
from tests.helpers.seed import seed_server, server_lock_counts

pytestmark = pytest.mark.lmcache_server

CHUNK = 256
MODEL = "kvconn-test/fault-proxy"
# A ZMTP 3.1 greeting with the NULL mechanism, as a client sends it.
ZMTP_GREETING = b"\xff" + b"\x00" * 8 + b"\x7f" + b"\x03\x01" + b"NULL".ljust(20, b"\x00") + \
    b"\x00" + b"\x00" * 31


def _upstream(server) -> tuple[str, int]:
    return server.host, server.port


@pytest.fixture
def proxy(lmcache_server) -> Iterator[FaultProxy]:
    with FaultProxy(_upstream(lmcache_server), seed=1, capture=True) as p:
        yield p
        assert p.held() == (0, 0)


@pytest.fixture
def client(proxy) -> Iterator[LMCacheClient]:
    with LMCacheClient(proxy.url, control_timeout=5.0) as c:
        yield c


def _events(log: list[dict], kind: str) -> list[dict]:
    return [e for e in log if e["kind"] == kind]


def _tokens(seed: int, n: int = 2 * CHUNK) -> list[int]:
    import random

    rng = random.Random(seed)
    return [rng.randrange(10, 30000) for _ in range(n)]


def _key(tokens: list[int], rid: str) -> CacheKey:
    return CacheKey(model_name=MODEL, world_size=1, worker_id=None, token_ids=tokens, start=0,
                    end=len(tokens) // CHUNK * CHUNK, request_id=rid)


def test_pass_through_is_byte_exact(lmcache_server, proxy, client):
    tokens = _tokens(1)
    seed_server(proxy.url, MODEL, tokens)  # register, prepare/commit store through the proxy
    assert client.ping(None) is True
    assert client.get_chunk_size() == CHUNK
    key = _key(tokens, f"pt-{uuid.uuid4().hex}")
    assert client.lookup(key, timeout=10) == 2
    client.free_lookup_locks(key)
    with LMCacheClient(lmcache_server.url) as direct:
        key = _key(tokens, f"pt-{uuid.uuid4().hex}")
        assert direct.lookup(key, timeout=10) == 2
        direct.free_lookup_locks(key)
    assert server_lock_counts(lmcache_server) == (0, 0)
    client.close()
    _wait(lambda: proxy.live_connections() == 0, 5, "connections closed")
    assert len(proxy.closed_conns) >= 2  # the seeding client and ours
    for conn in proxy.closed_conns:
        for d in ("c2s", "s2c"):
            assert conn["in"][d] == conn["out"][d], f"conn {conn['id']} {d} altered"
            assert len(conn["in"][d]) > 64
    assert proxy.stats["messages"]["c2s"] >= 8 and proxy.stats["commands"] >= 4


def test_oversized_frames_fall_back_to_a_byte_exact_raw_relay(lmcache_server):
    with FaultProxy(_upstream(lmcache_server), max_frame=16, capture=True) as p:
        with LMCacheClient(p.url) as c:
            assert c.lookup(_key(_tokens(2), f"raw-{uuid.uuid4().hex}"), timeout=10) == 0
        _wait(lambda: p.live_connections() == 0, 5, "connections closed")
        log = p.snapshot_log()
    assert _events(log, "raw_relay")
    conn = p.closed_conns[0]
    assert all(conn["in"][d] == conn["out"][d] for d in ("c2s", "s2c"))


@pytest.mark.parametrize("kind", ["drop_request", "drop_reply"])
def test_dropped_message_times_out_and_only_a_dropped_reply_took_the_lock(
        lmcache_server, proxy, client, kind):
    tokens = _tokens(3)
    seed_server(lmcache_server.url, MODEL, tokens)
    assert server_lock_counts(lmcache_server) == (0, 0)
    key = _key(tokens, f"drop-{uuid.uuid4().hex}")
    proxy.arm([Fault(kind, at_msg=0, op="LOOKUP")])
    with pytest.raises(KVConnTimeout):
        client.lookup(key, timeout=1.0)
    log = proxy.heal()
    dropped = _events(log, "dropped")
    assert [(e["op"], e["dir"]) for e in dropped] == [
        ("LOOKUP", "c2s" if kind == "drop_request" else "s2c")]
    # The server acted on the request only when the reply was the one lost.
    read_locks = server_lock_counts(lmcache_server)[0]
    assert (read_locks > 0) == (kind == "drop_reply")
    client.free_lookup_locks(key)
    _wait(lambda: server_lock_counts(lmcache_server) == (0, 0), 10, "locks released")
    assert client.ping(None) is True  # the connection itself is fine


def test_delayed_reply_arrives_late(proxy, client):
    proxy.arm([Fault("delay_reply", at_msg=0, op="PING", duration_s=1.5)])
    with pytest.raises(KVConnTimeout):
        client.ping(None, timeout=0.3)   # its reply comes 1.5 s late, to a forgotten uid
    proxy.arm([Fault("delay_reply", at_msg=0, op="PING", duration_s=0.5)])
    assert client.ping(None, timeout=10) is True
    log = proxy.heal()
    assert [e["op"] for e in _events(log, "delayed")] == ["PING"]
    assert [e["op"] for e in _events(log, "released")] == ["PING"]


def test_jittered_delays_are_seeded_draws_within_the_range(proxy, client):
    def delays(seed: int) -> list[float]:
        proxy.arm([Fault("delay_reply", at_msg=0, op="PING", count=1000, duration_s=0.05,
                         duration_max_s=0.3)], seed=seed)
        futures = [client.ping_async(None) for _ in range(8)]
        assert [f.result(10) for f in futures] == [True] * 8
        return [e["seconds"] for e in _events(proxy.heal(), "delayed")]

    first = delays(7)
    assert len(first) == 8 and all(0.05 <= s <= 0.3 for s in first)
    assert len(set(first)) > 1          # each reply its own delay
    assert delays(7) == first           # the same seed, the same delays


def test_reordered_replies_still_reach_their_callers(proxy, client):
    proxy.arm([Fault("reorder_replies", at_msg=0, op="PING", count=6)])
    futures = [client.ping_async(None) for _ in range(6)]
    assert [f.result(10) for f in futures] == [True] * 6
    (event,) = _events(proxy.heal(), "reordered")
    assert sorted(event["released"]) == sorted(event["arrival"])
    assert event["released"] != event["arrival"]


def test_reorder_is_deterministic_per_seed(lmcache_server):
    orders = []
    for _ in range(2):
        with FaultProxy(_upstream(lmcache_server), seed=7) as p, \
                LMCacheClient(p.url) as c:
            assert c.ping(None)
            p.arm([Fault("reorder_replies", at_msg=0, op="PING", count=5)])
            futures = [c.ping_async(None) for _ in range(5)]
            assert all(f.result(10) for f in futures)
            (event,) = _events(p.heal(), "reordered")
            orders.append([int(x.split(":")[0]) - int(event["arrival"][0].split(":")[0])
                           for x in event["released"]])
    assert orders[0] == orders[1]


@pytest.mark.parametrize("kind", ["reset", "close"])
def test_connection_fault_loses_the_call_in_flight(proxy, client, kind):
    assert client.ping(None) is True
    proxy.arm([Fault(kind, at_msg=0, op="PING", after=True)])  # the ping reached the server
    with pytest.raises(KVConnInFlightLost):
        client.ping(None, timeout=10)
    log = proxy.heal()
    assert len(_events(log, kind)) == 1
    _wait(lambda: _ping_ok(client), 10, "reconnect through the proxy")


@pytest.mark.parametrize("kind", ["reset", "close"])
def test_reset_sends_rst_and_close_sends_fin(proxy, kind):
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
        s.sendall(ZMTP_GREETING)
        _recv_at_least(s, 64)  # the server's greeting came back through the proxy
        proxy.arm([Fault(kind, at_s=0.0)])
        _wait(lambda: _events(proxy.snapshot_log(), kind), 5, kind)
        if kind == "reset":
            with pytest.raises(ConnectionResetError):
                while s.recv(4096):
                    pass
        else:
            while True:  # what was in flight, then EOF
                if s.recv(4096) == b"":
                    break
    proxy.heal()


def test_freeze_holds_commands_too_so_zmtp_heartbeats_fail(proxy):
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.HEARTBEAT_IVL, 100)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 600)
    mon = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    try:
        sock.connect(proxy.url)
        sock.send_multipart([b"\x00", b"\x16", b"\xc0"])  # ping(None), uid 0
        assert sock.poll(10000) and sock.recv_multipart() == [b"\x00", b"\x16", b"\xc3"]
        before = proxy.stats["commands"]
        _wait(lambda: proxy.stats["commands"] >= before + 4, 5, "heartbeats relayed")
        proxy.arm([Fault("freeze", at_s=0.0, duration_s=30.0)])
        sock.send_multipart([b"\x01", b"\x16", b"\xc0"])
        # No PONG comes back while frozen: the DEALER drops the connection by itself.
        assert mon.poll(10000), "heartbeat timeout did not drop the frozen connection"
        log = proxy.heal()
        assert _events(log, "freeze") and _events(log, "thaw")
        sock.send_multipart([b"\x02", b"\x16", b"\xc0"])
        deadline = time.monotonic() + 10
        replies = []
        while time.monotonic() < deadline and [b"\x02", b"\x16", b"\xc3"] not in replies:
            if sock.poll(500):
                replies.append(sock.recv_multipart())
        assert [b"\x02", b"\x16", b"\xc3"] in replies  # reconnected after the thaw
    finally:
        sock.disable_monitor()
        mon.close(linger=0)
        sock.close(linger=0)
        ctx.term()


def test_freeze_then_thaw_delivers_what_was_held(proxy, client):
    proxy.arm([Fault("freeze", at_s=0.0, duration_s=1.0)])
    _wait(lambda: _events(proxy.snapshot_log(), "freeze"), 5, "freeze")
    assert client.ping(None, timeout=10) is True  # waits out the freeze, no reconnect
    log = proxy.heal()
    assert _events(log, "thaw")[0]["released_bytes"] > 0


@pytest.mark.parametrize("on", ["c2s", "s2c"])
def test_truncated_frame_ends_the_connection_and_server_survives(lmcache_server, proxy,
                                                                 client, on):
    assert client.ping(None) is True
    proxy.arm([Fault("truncate", at_msg=0, op="PING", on=on)])
    with pytest.raises(KVConnInFlightLost):
        client.ping(None, timeout=10)
    (event,) = _events(proxy.heal(), "truncated")
    assert 0 < event["sent"] < event["of"]
    _wait(lambda: _ping_ok(client), 10, "reconnect through the proxy")
    with LMCacheClient(lmcache_server.url) as direct:
        assert direct.ping(None) is True


def test_hook_kills_the_server_with_a_call_in_flight_and_proxy_follows_restart(
        lmcache_server_factory):
    server = lmcache_server_factory()
    with FaultProxy(_upstream(server)) as p, LMCacheClient(p.url) as c:
        assert c.ping(None) is True
        pid = server.process.pid
        # Killed before the proxy passes the PING on (after=False): killed just after it, a
        # server could still answer it while the proxy's thread waits for a core (seen on a
        # loaded 2-core CI box). Either way the client has sent the call and gets no reply.
        p.arm([Fault("hook", at_msg=0, op="PING", label="kill -9", after=False,
                     action=lambda: os.killpg(pid, signal.SIGKILL))])
        try:
            c.ping(None, timeout=10)
        except (KVConnInFlightLost, KVConnTimeout):
            pass
        else:
            pytest.fail(f"the ping was answered; proxy log: {p.snapshot_log()}")
        server.kill()  # reap and unlink the pool
        _wait(lambda: _events(p.snapshot_log(), "upstream_unavailable"), 10,
              "reconnects refused while the server is down")
        log = p.heal()
        assert [e["what"] for e in _events(log, "hook_ran")] == ["kill -9"]
        server.restart()  # same port
        _wait(lambda: _ping_ok(c), 20, "ping through the proxy after the restart")


def test_sigstop_hook_with_undo_and_heal_runs_pending_undos(lmcache_server_factory):
    server = lmcache_server_factory()
    pid = server.process.pid
    with FaultProxy(_upstream(server)) as p, LMCacheClient(p.url) as c:
        assert c.ping(None) is True
        p.arm([Fault("hook", at_s=0.0, duration_s=60.0, label="SIGSTOP",
                     action=lambda: os.killpg(pid, signal.SIGSTOP),
                     undo=lambda: os.killpg(pid, signal.SIGCONT))])
        _wait(lambda: _events(p.snapshot_log(), "hook_ran"), 5, "SIGSTOP")
        _wait(lambda: _state(pid) == "T", 10, "the server stopped")
        with pytest.raises(KVConnTimeout):
            c.ping(None, timeout=0.5)
        log = p.heal()  # runs the SIGCONT long before its 60 s
        assert [e["what"] for e in _events(log, "hook_ran")] == ["SIGSTOP", "undo"]
        assert c.ping(None, timeout=10) is True


def test_held_messages_are_bounded(lmcache_server):
    with FaultProxy(_upstream(lmcache_server), max_held=3) as p, LMCacheClient(p.url) as c:
        assert c.ping(None)
        p.arm([Fault("delay_reply", at_msg=0, op="PING", count=10, duration_s=600.0)])
        futures = [c.ping_async(None, timeout=20) for _ in range(10)]
        _wait(lambda: sum(f.done() for f in futures) >= 7, 10, "early releases")
        assert p.held()[0] <= 3
        p.heal()
        assert p.held() == (0, 0)
        assert all(f.result(10) for f in futures)


def test_proxy_closes_everything(lmcache_server):
    fds_before = len(os.listdir("/proc/self/fd"))
    threads_before = set(threading.enumerate())
    p = FaultProxy(_upstream(lmcache_server)).start()
    with LMCacheClient(p.url) as c:
        assert c.ping(None)
        p.arm([Fault("delay_reply", at_msg=0, op="PING", duration_s=600.0),
               Fault("freeze", at_s=300.0, duration_s=5.0)])
        c.ping_async(None, timeout=30)
        p.close()  # with a connection up, a held reply and a pending timer
        port = p.port
    assert set(threading.enumerate()) <= threads_before
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    assert len(os.listdir("/proc/self/fd")) <= fds_before


# ---------------------------------------------------------------------------- helpers


def _ping_ok(client: LMCacheClient) -> bool:
    try:
        return client.ping(None, timeout=1.0)
    except Exception:
        return False


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rpartition(")")[2].split()[0]


def _recv_at_least(s: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = s.recv(4096)
        if not chunk:
            raise AssertionError(f"EOF after {len(data)} bytes")
        data += chunk
    return data


def _wait(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
