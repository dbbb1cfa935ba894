"""One ZeroMQ DEALER connection to an LMCache server, driven by a private I/O thread.

Why a thread: the scheduler must never block on the network, and ZeroMQ sockets may not be
used from two threads at once. Callers enqueue requests and get a ``ReplyFuture``; the I/O thread
owns the socket, sends, matches replies by uid (the server answers out of order) and
expires deadlines so that an unanswered request never leaks.

Sends use ``ZMQ_IMMEDIATE``: while no connection is up, a request is held locally instead of
being queued inside libzmq and delivered to whatever server comes up later (a restarted
server has no registrations and a new SHM pool). Only calls made with ``wait_for_peer`` are
held (until their deadline): the start-up probes, heartbeats and lock releases. Everything
something is waiting on (lookups, transfers) fails at once while no connection is up, and
when a connection drops every call already sent fails too: a dead server never costs a
request its whole deadline.

Peer loss is seen by the transport itself: ZMTP heartbeats (``HEARTBEAT_IVL`` /
``HEARTBEAT_TIMEOUT``) make libzmq drop a connection whose peer stopped answering at the
protocol level (a frozen process, a dead host, a silent network), and a socket monitor turns
every drop into failed calls. "Connected" means a completed ZMTP handshake, not an accepted
TCP connection (a stopped process still accepts those).
"""

from __future__ import annotations

import collections
import contextlib
import heapq
import itertools
import logging
import os
import threading
import time
from typing import Any

import zmq
import zmq.utils.monitor

from kvconn_plugin.client.protocol import Op, decode_reply, encode_request
from kvconn_plugin.client.reply_future import ReplyFuture
from kvconn_plugin.errors import (
    KVConnClosed,
    KVConnConfigError,
    KVConnError,
    KVConnInFlightLost,
    KVConnProtocolError,
    KVConnTimeout,
    KVConnUnavailable,
)

logger = logging.getLogger(__name__)

DEFAULT_MAX_PENDING = 65536
# Plain ints: pyzmq's flag enums cost an enum construction per operation in the hot loop.
_NOBLOCK = int(zmq.NOBLOCK)
_SEND_MORE = int(zmq.NOBLOCK) | int(zmq.SNDMORE)
_POLLIN = int(zmq.POLLIN)
_EVENTS = int(zmq.EVENTS)
ZERO_COPY_MIN = 65536  # pyzmq's own copy threshold


class _Pending:
    """One request from submit to its reply (slotted: built once per call on hot paths)."""

    __slots__ = ("deadline", "frames", "future", "op", "sent", "uid_frame", "wait_for_peer",
                 "zero_copy")

    def __init__(self, uid_frame: bytes, op: Op, frames: list[bytes], deadline: float,
                 zero_copy: bool = False, wait_for_peer: bool = True):
        self.uid_frame = uid_frame
        self.op = op
        self.frames = frames
        self.deadline = deadline
        self.future = ReplyFuture()
        self.sent = False
        self.zero_copy = zero_copy
        self.wait_for_peer = wait_for_peer


def heartbeat_options(interval: float) -> tuple[int, int]:
    """(HEARTBEAT_IVL, HEARTBEAT_TIMEOUT) in ms for an application heartbeat of ``interval`` s.

    A ZMTP PING at most every second (cheap: a few bytes, answered by the peer's libzmq I/O
    thread, never by its Python code, so a busy server is not mistaken for a dead one) and a
    connection given up after one application interval of silence (at least 2 pings).
    """
    ivl = max(0.1, min(1.0, interval / 2))
    timeout = max(interval, 2 * ivl)
    return int(ivl * 1000), int(timeout * 1000)


class MQTransport:
    """Thread-safe request/reply client over one DEALER socket.

    Args:
        url: ``tcp://host:port`` (a bare ``host:port`` means TCP) or ``ipc://path``.
        timeout: default per-call deadline in seconds.
        max_pending: bound on requests in flight; beyond it submissions fail fast.
        heartbeat: seconds of protocol-level silence after which the connection is dropped
            (ZMTP heartbeats); ``None`` disables them.
    """

    def __init__(self, url: str, *, timeout: float = 5.0, max_pending: int = DEFAULT_MAX_PENDING,
                 heartbeat: float | None = 10.0):
        self.url = normalize_url(url)
        self.timeout = float(timeout)
        self._max_pending = max_pending
        self._uids = itertools.count()
        self._lock = threading.Lock()
        self._outbox: collections.deque[_Pending] = collections.deque()
        self._pending: dict[bytes, _Pending] = {}
        self._deadlines: list[tuple[float, int, _Pending]] = []
        self._closed = False
        self._wake_pending = False
        self._connected = threading.Event()
        self._ever_connected = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._ctx = zmq.Context(io_threads=1)
        self._sock = self._ctx.socket(zmq.DEALER)
        monitor: zmq.Socket | None = None
        try:
            self._sock.setsockopt(zmq.LINGER, 0)
            self._sock.setsockopt(zmq.IMMEDIATE, 1)
            self._sock.setsockopt(zmq.RECONNECT_IVL, 100)
            self._sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
            self._sock.setsockopt(zmq.CONNECT_TIMEOUT, 2000)
            if heartbeat:
                ivl, hb_timeout = heartbeat_options(heartbeat)
                self._sock.setsockopt(zmq.HEARTBEAT_IVL, ivl)
                self._sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, hb_timeout)
                # A handshake that never completes (a stopped process accepts TCP) is
                # abandoned as fast as a silent connection.
                self._sock.setsockopt(zmq.HANDSHAKE_IVL, hb_timeout)
            monitor = self._sock.get_monitor_socket(
                zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED
            )
            self._sock.connect(self.url)
        except zmq.ZMQError as exc:
            # e.g. an unresolvable host or a malformed port: release everything
            # (sockets, context, pipe) instead of leaking them, and say which URL.
            if monitor is not None:
                monitor.close(linger=0)
            self._sock.close(linger=0)
            self._ctx.term()
            os.close(self._wake_r)
            os.close(self._wake_w)
            raise KVConnConfigError(
                f"cannot connect to LMCache server URL {self.url!r}: {exc}"
            ) from exc
        self._monitor: zmq.Socket = monitor
        self._thread = threading.Thread(target=self._run, name="kvconn-mq-io", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ caller side

    @property
    def connected(self) -> bool:
        """Whether a ZMTP connection to the server is up right now (handshake completed)."""
        return self._connected.is_set()

    def submit(
        self, op: Op, *args: Any, timeout: float | None = None, wake: bool = True,
        wait_for_peer: bool = True,
    ) -> ReplyFuture:
        """Queue one request; the future resolves to the decoded reply or a typed error.

        ``wake=False`` leaves the request queued until the next :meth:`flush` (or any
        waking submit): a caller issuing a burst, like the scheduler step, pays for one
        I/O-thread wake-up instead of one per request (each wake-up hands the GIL over).

        ``wait_for_peer=False``: fail with ``KVConnUnavailable`` instead of waiting while no
        connection is up (now, or when it drops before the request went out). For calls
        someone is waiting on: a dead server must not cost them their deadline.
        """
        frames_args = args
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        if not wait_for_peer and not self._connected.is_set():
            fut = ReplyFuture()
            fut.set_exception(KVConnUnavailable(
                f"no connection to the LMCache server at {self.url} ({op.name})"))
            return fut
        with self._lock:
            if self._closed:
                raise KVConnClosed(f"client for {self.url} is closed")
            if len(self._pending) >= self._max_pending:
                raise KVConnUnavailable(
                    f"{len(self._pending)} requests already pending on {self.url}"
                )
            uid = next(self._uids)
            frames = encode_request(uid, op, frames_args)
            pend = _Pending(frames[0], op, frames, deadline,
                            zero_copy=any(len(f) >= ZERO_COPY_MIN for f in frames),
                            wait_for_peer=wait_for_peer)
            self._pending[pend.uid_frame] = pend
            self._outbox.append(pend)
            heapq.heappush(self._deadlines, (deadline, uid, pend))
            # Under the lock: close() closes the pipe under it too, so this can never
            # write into a recycled file descriptor.
            if wake and not self._wake_pending:
                self._wake_pending = True
                self._wake()
        return pend.future

    def flush(self) -> None:
        """Wake the I/O thread for requests queued with ``wake=False``."""
        with self._lock:
            if self._outbox and not self._wake_pending and not self._closed:
                self._wake_pending = True
                self._wake()

    def call(self, op: Op, *args: Any, timeout: float | None = None) -> Any:
        """Submit and wait.

        Raises ``KVConnTimeout``, ``KVConnUnavailable`` or ``KVConnProtocolError``.
        """
        fut = self.submit(op, *args, timeout=timeout)
        return wait(fut, op, self.timeout if timeout is None else timeout)

    def close(self) -> None:
        """Fail whatever is pending, close the socket (linger 0) and join the I/O thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._wake()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)

    def __enter__(self) -> MQTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _wake(self) -> None:
        # pipe full means a wake-up is already pending; closed means shutting down
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"\x01")

    # ------------------------------------------------------------------ I/O thread

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, _POLLIN)
        poller.register(self._monitor, _POLLIN)
        poller.register(self._wake_r, _POLLIN)
        try:
            while not self._closed:
                events = dict(poller.poll(self._poll_timeout_ms()))
                if self._wake_r in events:
                    self._drain_wake()
                if self._monitor in events:
                    self._drain_monitor()
                if self._sock in events:
                    self._drain_replies()
                self._flush_outbox()
                self._expire(time.monotonic())
        except Exception:  # the I/O thread must never die silently
            logger.exception("kvconn I/O thread for %s failed", self.url)
        finally:
            self._shutdown_io()

    def _poll_timeout_ms(self) -> int:
        with self._lock:
            waiting = bool(self._outbox)
            next_deadline = self._deadlines[0][0] if self._deadlines else None
        if waiting:
            return 5  # retry sends held back by ZMQ_IMMEDIATE while no connection is up
        if next_deadline is None:
            return 1000
        return max(1, min(1000, int((next_deadline - time.monotonic()) * 1000) + 1))

    def _drain_wake(self) -> None:
        # Clear the flag before reading: a submit racing with us writes a new byte,
        # which makes the next poll return at once.
        self._wake_pending = False
        # One read: anything left over just makes the next poll return at once.
        with contextlib.suppress(BlockingIOError, OSError):
            os.read(self._wake_r, 65536)

    def _drain_monitor(self) -> None:
        while True:
            try:
                msg = zmq.utils.monitor.recv_monitor_message(self._monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            if msg["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._ever_connected = True
                self._connected.set()
            elif msg["event"] == zmq.EVENT_DISCONNECTED:
                self._connected.clear()
                self._fail_in_flight()

    def _fail_in_flight(self) -> None:
        """Fail every sent request now: its reply can never come.

        A reconnected DEALER gets a new routing id, so the server (ROUTER_MANDATORY) drops
        replies addressed to the old connection; waiting for the deadline (30 s for a
        transfer) would only stall the caller. Requests not sent yet fail too unless they
        were made to wait for a peer.
        """
        self._drain_replies()  # replies that made it before the connection broke still count
        reason = f"connection to {self.url} lost"
        self.abort_in_flight(reason)
        with self._lock:
            dropped = [p for p in self._outbox if not p.wait_for_peer]
            if dropped:
                self._outbox = collections.deque(p for p in self._outbox if p.wait_for_peer)
                for p in dropped:
                    self._pending.pop(p.uid_frame, None)
        for p in dropped:
            _fail(p.future, KVConnUnavailable(f"{reason} before {p.op.name} was sent"))

    def abort_in_flight(self, reason: str) -> int:
        """Fail every request already sent and still unanswered; returns how many.

        Safe from any thread. For a server that is connected but has stopped answering
        (frozen, wedged): once the heartbeat gives up on it, a caller waiting on a transfer
        should not sit out its own, longer deadline. A late reply finds no pending entry
        and is dropped; requests not sent yet stay queued.
        """
        with self._lock:
            lost = [p for p in self._pending.values() if p.sent]
            for p in lost:
                del self._pending[p.uid_frame]
        for p in lost:
            _fail(p.future,
                  KVConnInFlightLost(f"{reason} with {p.op.name} in flight; outcome unknown"))
        return len(lost)

    def _flush_outbox(self) -> None:
        while True:
            with self._lock:
                if not self._outbox:
                    return
                p = self._outbox.popleft()
            if p.future.done():
                continue
            try:
                self._send(p)
            except zmq.Again:
                # No connection yet (ZMQ_IMMEDIATE): keep the order, retry next round.
                # Only this thread pops, so putting it back in front is safe.
                with self._lock:
                    self._outbox.appendleft(p)
                return
            p.sent = True

    def _send(self, p: _Pending) -> None:
        """Send one request; raises ``zmq.Again`` (nothing sent) while no peer is up.

        A multipart message is queued atomically once its first frame is accepted, so
        only the first send can raise. Zero-copy only pays off for big frames (pickled
        chunks); for small ones pyzmq's Frame objects cost more than the memcpy.
        """
        sock, copy, frames = self._sock, not p.zero_copy, p.frames
        last = len(frames) - 1
        for i, frame in enumerate(frames):
            sock.send(frame, _SEND_MORE if i < last else _NOBLOCK, copy=copy)

    def _drain_replies(self) -> None:
        # Ask for readiness instead of catching zmq.Again: raising costs more than a
        # round trip's worth of Python work on every wake-up.
        sock = self._sock
        while sock.getsockopt(_EVENTS) & _POLLIN:
            self._dispatch(sock.recv_multipart(_NOBLOCK))

    def _dispatch(self, frames: list[bytes]) -> None:
        if len(frames) < 2:
            # Without an op frame this is not a reply at all; nothing to match it to.
            logger.debug("dropping reply with %d frames from %s", len(frames), self.url)
            return
        with self._lock:
            pend = self._pending.pop(frames[0], None)
        if pend is None:
            logger.debug("dropping reply with unknown uid from %s", self.url)
            return
        if pend.future.done():
            return
        if frames[1] != pend.frames[1]:
            _fail(pend.future, KVConnProtocolError(f"{pend.op.name}: reply echoes another op"))
            return
        if len(frames) > 3:
            # The uid matched, so fail this call now instead of letting it time out.
            _fail(pend.future, KVConnProtocolError(
                f"{pend.op.name}: reply has {len(frames)} frames, expected 2 or 3"))
            return
        try:
            result = decode_reply(pend.op, frames[2] if len(frames) == 3 else None)
        except KVConnProtocolError as exc:
            _fail(pend.future, exc)
            return
        except Exception as exc:  # one bad reply must not kill the I/O thread
            _fail(pend.future, KVConnProtocolError(f"{pend.op.name}: undecodable reply: {exc!r}"))
            return
        _resolve(pend.future, result)

    def _expire(self, now: float) -> None:
        expired: list[_Pending] = []
        with self._lock:
            while self._deadlines and self._deadlines[0][0] <= now:
                _, _, p = heapq.heappop(self._deadlines)
                if self._pending.get(p.uid_frame) is p:
                    del self._pending[p.uid_frame]
                    expired.append(p)
            if expired and self._outbox:
                self._outbox = collections.deque(q for q in self._outbox if not q.future.done()
                                                 and q.uid_frame in self._pending)
        for p in expired:
            _fail(p.future, self._timeout_error(p))

    def _timeout_error(self, p: _Pending) -> KVConnError:
        if not p.sent:
            return KVConnUnavailable(f"no LMCache server reachable at {self.url} ({p.op.name})")
        if not self._connected.is_set():
            # Sent before the connection dropped: the server may have acted on it.
            return KVConnInFlightLost(f"connection to {self.url} lost with {p.op.name} in "
                                      "flight; outcome unknown")
        return KVConnTimeout(f"{p.op.name} to {self.url} got no reply in time")

    def _shutdown_io(self) -> None:
        with self._lock:
            self._closed = True
            leftovers = list(self._pending.values())
            self._pending.clear()
            self._outbox.clear()
            self._deadlines.clear()
        for p in leftovers:
            _fail(p.future, KVConnClosed(f"client for {self.url} closed"))
        with contextlib.suppress(zmq.ZMQError):
            self._sock.disable_monitor()
        self._monitor.close(linger=0)
        self._sock.close(linger=0)
        self._ctx.term()
        # The wake pipe is closed here, by its only reader, and under the lock that
        # submit() holds while writing to it, so no write can hit a recycled descriptor.
        with self._lock:
            fds = (self._wake_r, self._wake_w)
            self._wake_r = self._wake_w = -1
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)


def wait(fut: ReplyFuture, op: Op, timeout: float) -> Any:
    """Wait for a future from :meth:`MQTransport.submit`, mapping a local wait timeout too."""
    try:
        # The I/O thread fails the future at its deadline; the extra margin only guards
        # against a stalled I/O thread.
        return fut.result(timeout=timeout + 1.0)
    except TimeoutError as exc:  # concurrent.futures.TimeoutError is TimeoutError on 3.11+
        if isinstance(exc, KVConnError):
            raise
        raise KVConnTimeout(f"{op.name}: no reply within {timeout:.1f}s") from None


def _resolve(fut: ReplyFuture, value: Any) -> None:
    fut.set_result(value)


def _fail(fut: ReplyFuture, exc: BaseException) -> None:
    fut.set_exception(exc)


def normalize_url(url: str) -> str:
    """Accept ``tcp://h:p``, ``ipc://path`` or a bare ``h:p`` (TCP), as LMCache does."""
    url = url.strip()
    if "://" not in url:
        url = "tcp://" + url
    scheme = url.split("://", 1)[0]
    if scheme not in ("tcp", "ipc", "inproc"):
        raise KVConnConfigError(f"unsupported server URL scheme {scheme!r} in {url!r} (tcp, ipc)")
    return url
