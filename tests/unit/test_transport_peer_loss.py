"""The transport notices a lost peer by itself, and nothing waits on a peer it cannot reach.

The peer is a ROUTER in a child process, so it can be frozen (SIGSTOP: the TCP connection
stays up, only ZMTP heartbeats can tell) and killed like a real server. Bounds below are
hang bounds, far under the calls' own deadlines (60 s), not timings.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator

import pytest

from kvconn_plugin.client.protocol import Op
from kvconn_plugin.client.transport import MQTransport, heartbeat_options
from kvconn_plugin.errors import KVConnInFlightLost, KVConnUnavailable
from tests.conftest import free_port

DEADLINE = 60.0  # every call's own deadline: a failure long before it came from the transport
HANG_BOUND = 15.0

PEER = textwrap.dedent("""
    import sys, zmq
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.bind(sys.argv[1])
    mute = sys.argv[2] == "mute"
    print("ready", flush=True)
    while True:
        ident, uid, op, *rest = sock.recv_multipart()
        if not mute:
            sock.send_multipart([ident, uid, op, b"\\xc3"])  # True, like ping
""")


class Peer:
    def __init__(self, url: str, mute: bool = False):
        self.proc = subprocess.Popen([sys.executable, "-c", PEER, url, "mute" if mute else "x"],
                                     stdout=subprocess.PIPE, start_new_session=True)
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == b"ready"

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def url() -> str:
    return f"tcp://127.0.0.1:{free_port()}"


@pytest.fixture
def transport(url: str) -> Iterator[MQTransport]:
    t = MQTransport(url, timeout=DEADLINE, heartbeat=1.0)
    yield t
    t.close()


def _wait(pred, what: str, bound: float = HANG_BOUND) -> float:
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > bound:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)
    return time.monotonic() - t0


def test_heartbeat_options_follow_the_interval():
    assert heartbeat_options(10.0) == (1000, 10000)
    assert heartbeat_options(1.0) == (500, 1000)
    ivl, timeout = heartbeat_options(0.05)
    assert ivl == 100 and timeout >= 2 * ivl


def test_calls_waited_on_fail_at_once_without_a_peer(transport):
    t0 = time.monotonic()
    fut = transport.submit(Op.PING, None, wait_for_peer=False)
    with pytest.raises(KVConnUnavailable):
        fut.result(timeout=HANG_BOUND)
    assert time.monotonic() - t0 < HANG_BOUND


def test_calls_that_wait_for_a_peer_are_held_until_it_comes(transport, url):
    fut = transport.submit(Op.PING, None)  # a start-up probe: held, not failed
    time.sleep(0.3)
    assert not fut.done()
    peer = Peer(url)
    try:
        assert fut.result(timeout=HANG_BOUND) is True
        assert transport.connected
    finally:
        peer.kill()


def test_a_frozen_peer_is_dropped_by_zmtp_heartbeats_and_in_flight_calls_fail(transport, url):
    """SIGSTOP keeps TCP up and the application sends nothing: only the transport's own
    heartbeat can end the call, long before its 60 s deadline."""
    peer = Peer(url, mute=True)
    try:
        _wait(lambda: transport.connected, "the handshake")
        fut = transport.submit(Op.PING, None, wait_for_peer=False)
        _wait(lambda: any(p.sent for p in list(transport._pending.values())), "the send")
        peer.signal(signal.SIGSTOP)
        t0 = time.monotonic()
        with pytest.raises(KVConnInFlightLost):
            fut.result(timeout=HANG_BOUND)
        assert time.monotonic() - t0 < HANG_BOUND
        assert not transport.connected
        # Nothing new goes to a peer known to be unreachable.
        with pytest.raises(KVConnUnavailable):
            transport.submit(Op.PING, None, wait_for_peer=False).result(timeout=HANG_BOUND)
        # A stopped process still accepts TCP, but no handshake: not "connected".
        time.sleep(2.5)
        assert not transport.connected
    finally:
        peer.kill()


def test_a_killed_peer_fails_in_flight_calls_and_a_new_one_is_picked_up(transport, url):
    peer = Peer(url, mute=True)
    try:
        _wait(lambda: transport.connected, "the handshake")
        fut = transport.submit(Op.PING, None, wait_for_peer=False)
        _wait(lambda: any(p.sent for p in list(transport._pending.values())), "the send")
        peer.kill()
        with pytest.raises(KVConnInFlightLost):
            fut.result(timeout=HANG_BOUND)
        _wait(lambda: not transport.connected, "the drop")
        peer = Peer(url)  # the server comes back on the same address
        _wait(lambda: transport.connected, "the reconnection")
        assert transport.submit(Op.PING, None, wait_for_peer=False).result(HANG_BOUND) is True
    finally:
        peer.kill()
