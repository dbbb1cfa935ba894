"""A TCP relay between our ZeroMQ DEALER sockets and a real LMCache server that injects
faults per ZMTP message, where no test author placed them.

It speaks just enough ZMTP 3.x: the 64-byte greeting each way is relayed byte by byte as it
arrives (each peer waits for part of the other's greeting), then frames are parsed (flags:
bit0 MORE, bit1 LONG size, bit2 COMMAND; size 1 byte or 8 bytes big-endian; body). Command
frames (READY, heartbeat PING/PONG) are relayed as they come unless the path is frozen;
message frames are grouped into messages, ``[uid, op, args...]`` client->server and
``[uid, op, (result)]`` back, and each message goes through the armed faults.

Faults (:class:`Fault`): drop a request or a reply, delay replies, reorder a batch of
replies, reset a connection (RST: SO_LINGER 0), close it cleanly (FIN), freeze everything
(commands too) for a while, truncate a frame and close, and ``hook``: call a function
(e.g. ``kill -9`` of the server) when a chosen message passes. Each is triggered by a
message count (the Nth message matching its op filter since :meth:`FaultProxy.arm`) or by
time. Every action is written to the fault log.

Robustness: the relay runs on its own event loop thread and never waits on anything but
its sockets; held messages are bounded (count and bytes; the oldest are released early),
reads stop while a frozen path's buffer is full, a frame larger than ``max_frame`` turns
the connection into a raw byte relay, and :meth:`FaultProxy.close` aborts every connection
and task. Pass-through is byte-exact (``capture=True`` records both sides to prove it).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import random
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

import msgspec

GREETING_LEN = 64
FLAG_MORE, FLAG_LONG, FLAG_COMMAND = 0x01, 0x02, 0x04
C2S, S2C = "c2s", "s2c"  # client -> server (requests), server -> client (replies)

# LMCache 0.5.6 op ids (frozen); newer ops travel as strings and are logged as such.
OP_NAMES = {6: "STORE", 7: "RETRIEVE", 8: "LOOKUP", 9: "QUERY_PREFETCH_STATUS",
            12: "FREE_LOOKUP_LOCKS", 13: "END_SESSION", 14: "REGISTER_ENGINE_DRIVEN",
            15: "UNREGISTER_ENGINE_DRIVEN", 16: "PREPARE_STORE", 17: "COMMIT_STORE",
            18: "PREPARE_RETRIEVE", 19: "COMMIT_RETRIEVE", 20: "CLEAR", 21: "GET_CHUNK_SIZE",
            22: "PING", 23: "REPORT_BLOCK_ALLOCATION", 24: "NOOP", 32: "GET_EXPERIMENTAL"}

MESSAGE_KINDS = ("drop_request", "drop_reply", "delay_reply", "reorder_replies", "truncate")
CONNECTION_KINDS = ("reset", "close", "freeze", "hook")
KINDS = MESSAGE_KINDS + CONNECTION_KINDS
_DEFAULT_ON = {"drop_request": C2S, "drop_reply": S2C, "delay_reply": S2C,
               "reorder_replies": S2C}


@dataclasses.dataclass
class Fault:
    """One fault. Trigger: ``at_msg`` (the Nth message, from 0, on direction ``on`` whose op
    matches ``op`` since arm) or ``at_s`` (seconds since arm; then it hits the next matching
    message, or for connection kinds every live connection at once).

    ``count``: messages affected (drop/delay/truncate) or batch size (reorder).
    ``duration_s``: freeze length, reply delay, or time until ``undo`` (hook).
    ``duration_max_s``: delay only; when larger than ``duration_s``, each delayed message
    is held for its own uniform draw from ``[duration_s, duration_max_s]`` (the proxy's
    seeded generator), so the replies also overtake each other.
    ``after``: reset/close/hook act after forwarding the trigger message (it is in flight),
    otherwise before (it is lost with the connection).
    """

    kind: str
    at_msg: int | None = None
    at_s: float | None = None
    op: str | None = None
    on: str | None = None
    count: int = 1
    duration_s: float = 0.0
    duration_max_s: float = 0.0
    after: bool = True
    action: Callable[[], Any] | None = dataclasses.field(default=None, repr=False)
    undo: Callable[[], Any] | None = dataclasses.field(default=None, repr=False)
    label: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}")
        if self.on is None:
            self.on = _DEFAULT_ON.get(self.kind, C2S)
        if (self.at_msg is None) == (self.at_s is None):
            raise ValueError("a fault needs exactly one of at_msg and at_s")


class _Armed:
    """A fault's run-time state."""

    def __init__(self, fault: Fault, index: int):
        self.f = fault
        self.index = index
        self.seen = 0          # matching messages counted towards at_msg
        self.active = False    # triggered and still affecting messages
        self.done = False
        self.left = fault.count
        self.batch: list[tuple[_Conn, bytes, str]] = []   # reorder: held replies
        self.flush_handle: asyncio.TimerHandle | None = None


class _Conn:
    def __init__(self, cid: int, client_w: asyncio.StreamWriter):
        self.id = cid
        self.writers: dict[str, asyncio.StreamWriter | None] = {C2S: None, S2C: client_w}
        self.tasks: list[asyncio.Task] = []
        self.closed = False
        self.frozen_buf: dict[str, list[bytes]] = {C2S: [], S2C: []}
        self.frozen_bytes = 0
        self.capture_in: dict[str, bytearray] = {C2S: bytearray(), S2C: bytearray()}
        self.capture_out: dict[str, bytearray] = {C2S: bytearray(), S2C: bytearray()}


def _op_name(frame_body: bytes) -> str:
    try:
        op = msgspec.msgpack.decode(frame_body)
    except Exception:
        return "?"
    if isinstance(op, int):
        return OP_NAMES.get(op, str(op))
    return str(op).upper() if isinstance(op, str) and op else "?"


def _uid(frame_body: bytes) -> Any:
    try:
        return msgspec.msgpack.decode(frame_body)
    except Exception:
        return frame_body[:16].hex()


def _set_rst(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class FaultProxy:
    """Relay ``127.0.0.1:<port>`` -> ``upstream``; start with :meth:`start`, point clients at
    :attr:`url`. Public methods are thread-safe (they run on the proxy's loop).

    Args:
        upstream: ``(host, port)`` of the real server.
        seed: seeds reorder permutations.
        max_held: bound on messages held by delay/reorder (and ``max_held_bytes`` on their
            bytes); beyond it the oldest are released at once.
        max_frozen_bytes: per connection; reads pause while a frozen path holds this much.
        max_frame: a larger frame makes that connection a raw byte relay (no parsing).
        capture: record every byte in and out per direction (tests of byte-exactness).
    """

    def __init__(self, upstream: tuple[str, int], *, host: str = "127.0.0.1", port: int = 0,
                 seed: int = 0, max_held: int = 256, max_held_bytes: int = 64 << 20,
                 max_frozen_bytes: int = 16 << 20, max_frame: int = 256 << 20,
                 capture: bool = False, connect_timeout: float = 2.0):
        self.upstream = upstream
        self.host, self.port = host, port
        self.rng = random.Random(seed)
        self.max_held, self.max_held_bytes = max_held, max_held_bytes
        self.max_frozen_bytes, self.max_frame = max_frozen_bytes, max_frame
        self.capture = capture
        self.connect_timeout = connect_timeout
        self.log: list[dict[str, Any]] = []
        self.stats = {"connections": 0, "messages": {C2S: 0, S2C: 0}, "commands": 0,
                      "upstream_refused": 0}
        self.op_counts: dict[str, int] = {}  # "c2s:LOOKUP" -> messages since arm
        self._conns: dict[int, _Conn] = {}
        self._ids = itertools.count(1)
        self._armed: list[_Armed] = []
        self._t0 = time.monotonic()
        self._timers: list[asyncio.TimerHandle] = []
        self._held: list[tuple[asyncio.TimerHandle, Callable[[], None]]] = []  # delayed
        self._held_msgs = 0
        self._held_bytes = 0
        self._frozen_until = 0.0
        self._thaw: asyncio.Event | None = None
        self._undos: list[tuple[asyncio.TimerHandle | None, Callable[[], Any]]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self.closed_conns: list[dict[str, Any]] = []   # captures of finished connections

    # ------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        return f"tcp://{self.host}:{self.port}"

    def start(self) -> FaultProxy:
        ready = threading.Event()
        self._loop = asyncio.new_event_loop()

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(self._serve(ready))
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="fault-proxy", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("fault proxy did not start")
        return self

    async def _serve(self, ready: threading.Event) -> None:
        self._thaw = asyncio.Event()
        self._thaw.set()
        self._server = await asyncio.start_server(self._handle, self.host, self.port,
                                                  reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]
        ready.set()

    def close(self) -> None:
        """Abort every connection, stop the listener and the loop, join the thread."""
        if self._loop is None:
            return
        with contextlib.suppress(Exception):
            self._call(self._shutdown(), timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=10)
        if not self._loop.is_running():
            self._loop.close()
        self._loop = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def _shutdown(self) -> None:
        self._heal_now()
        if self._server is not None:
            self._server.close()
        for conn in list(self._conns.values()):
            self._drop_conn(conn, reset=True, why="proxy closing")
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)
        await self._loop.shutdown_default_executor()

    def _call(self, coro_or_fn: Any, timeout: float = 10.0) -> Any:
        """Run on the loop thread and wait (bounded) for the result."""
        loop = self._loop
        if loop is None:
            raise RuntimeError("fault proxy is not running")
        if asyncio.iscoroutine(coro_or_fn):
            return asyncio.run_coroutine_threadsafe(coro_or_fn, loop).result(timeout)

        async def wrap() -> Any:
            return coro_or_fn()

        return asyncio.run_coroutine_threadsafe(wrap(), loop).result(timeout)

    # ------------------------------------------------------------------ control (any thread)

    def arm(self, faults: list[Fault], seed: int | None = None) -> None:
        """Replace the fault set (after healing the old one); counts and time start now.
        ``seed`` reseeds the reorder permutations."""
        self._call(lambda: self._arm_now(faults, seed))

    def heal(self) -> list[dict[str, Any]]:
        """Back to pass-through: disarm, release held messages, thaw, run pending undos.
        Returns the fault log since :meth:`arm`."""
        return self._call(self._heal_now)

    def live_connections(self) -> int:
        return self._call(lambda: sum(1 for c in self._conns.values() if not c.closed))

    def snapshot_log(self) -> list[dict[str, Any]]:
        return self._call(lambda: list(self.log))

    @property
    def armed_at(self) -> float:
        """``time.monotonic()`` of the last :meth:`arm`: the fault log's ``t`` counts from
        it."""
        return self._t0

    def held(self) -> tuple[int, int]:
        """(messages, bytes) currently held by delay/reorder faults."""
        return self._call(lambda: (self._held_msgs, self._held_bytes))

    # ------------------------------------------------------------------ loop-side control

    def _now(self) -> float:
        return time.monotonic() - self._t0

    def _record(self, kind: str, conn: _Conn | None = None, **detail: Any) -> None:
        entry = {"t": round(self._now(), 3), "kind": kind}
        if conn is not None:
            entry["conn"] = conn.id
        entry.update(detail)
        if len(self.log) < 10000:  # bounded: a runaway fault must not eat memory
            self.log.append(entry)

    def _arm_now(self, faults: list[Fault], seed: int | None = None) -> None:
        self._heal_now()
        if seed is not None:
            self.rng.seed(seed)
        self.log = []
        self.op_counts = {}
        self._t0 = time.monotonic()
        self._armed = [_Armed(f, i) for i, f in enumerate(faults)]
        for a in self._armed:
            self._record("armed", fault=a.index, spec=_describe(a.f))
            if a.f.at_s is not None:
                self._timers.append(self._loop.call_later(a.f.at_s, self._fire_timed, a))

    def _heal_now(self) -> list[dict[str, Any]]:
        for h in self._timers:
            h.cancel()
        self._timers.clear()
        for a in self._armed:
            if a.f.kind == "reorder_replies" and a.batch:
                self._flush_batch(a, why="heal")
        self._armed = []
        while self._held:  # delayed messages go out now, in their order
            self._release_oldest()
        if self._frozen_until:
            self._unfreeze()
        for h, undo in self._undos:
            if h is not None:
                h.cancel()
            self._run_hook(undo, "undo")
        self._undos.clear()
        self._record("healed", op_counts=dict(self.op_counts))
        return list(self.log)

    def _fire_timed(self, a: _Armed) -> None:
        if a.done or a not in self._armed:
            return
        self._record("triggered", fault=a.index, by="time", spec=_describe(a.f))
        if a.f.kind in CONNECTION_KINDS:
            self._connection_fault(a, conns=[c for c in self._conns.values() if not c.closed])
            a.done = True
        else:
            a.active = True

    def _connection_fault(self, a: _Armed, conns: list[_Conn]) -> None:
        kind = a.f.kind
        if kind == "freeze":
            self._freeze(a.f.duration_s)
        elif kind == "hook":
            if a.f.action is not None:
                self._run_hook(a.f.action, a.f.label or "hook")
            if a.f.undo is not None:
                h = (self._loop.call_later(a.f.duration_s, self._undo_due, a.f.undo)
                     if a.f.duration_s > 0 else None)
                self._undos.append((h, a.f.undo))
        else:
            for c in conns:
                self._drop_conn(c, reset=kind == "reset", why=f"fault {a.index}")

    def _undo_due(self, undo: Callable[[], Any]) -> None:
        self._undos = [(h, u) for h, u in self._undos if u is not undo]
        self._run_hook(undo, "undo")

    def _run_hook(self, fn: Callable[[], Any], what: str) -> None:
        try:
            fn()
            self._record("hook_ran", what=what)
        except Exception as exc:  # a failing hook must not kill the relay
            self._record("hook_failed", what=what, error=repr(exc))

    def _freeze(self, seconds: float) -> None:
        self._frozen_until = max(self._frozen_until, time.monotonic() + seconds)
        self._thaw.clear()
        self._record("freeze", seconds=seconds)
        self._timers.append(self._loop.call_later(seconds, self._maybe_unfreeze))

    def _maybe_unfreeze(self) -> None:
        if self._frozen_until and time.monotonic() >= self._frozen_until - 0.001:
            self._unfreeze()

    def _unfreeze(self) -> None:
        self._frozen_until = 0.0
        self._thaw.set()
        released = 0
        for conn in list(self._conns.values()):
            for d in (C2S, S2C):
                buf, conn.frozen_buf[d] = conn.frozen_buf[d], []
                for data in buf:
                    self._write(conn, d, data)
                    released += len(data)
            conn.frozen_bytes = 0
        self._record("thaw", released_bytes=released)

    # ------------------------------------------------------------------ connections

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Cancelled at shutdown: end quietly (asyncio's server logs a cancelled handler).
        with contextlib.suppress(asyncio.CancelledError):
            await self._serve_conn(reader, writer)

    async def _serve_conn(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        conn = _Conn(next(self._ids), writer)
        self._conns[conn.id] = conn
        self.stats["connections"] += 1
        try:
            ureader, uwriter = await asyncio.wait_for(
                asyncio.open_connection(*self.upstream), self.connect_timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            self.stats["upstream_refused"] += 1
            self._record("upstream_unavailable", conn, error=type(exc).__name__)
            self._drop_conn(conn, reset=True, why="upstream unavailable", quiet=True)
            return
        if conn.closed:  # healed/closed while connecting
            _set_rst(uwriter)
            uwriter.transport.abort()
            return
        conn.writers[C2S] = uwriter
        self._record("connected", conn)
        conn.tasks = [asyncio.ensure_future(self._pump(conn, C2S, reader)),
                      asyncio.ensure_future(self._pump(conn, S2C, ureader))]
        await asyncio.gather(*conn.tasks, return_exceptions=True)
        self._conns.pop(conn.id, None)

    def _drop_conn(self, conn: _Conn, *, reset: bool, why: str, quiet: bool = False) -> None:
        if conn.closed:
            return
        conn.closed = True
        if not quiet:
            self._record("reset" if reset else "close", conn, why=why)
        for w in conn.writers.values():
            if w is None:
                continue
            if reset:
                _set_rst(w)
                w.transport.abort()
            else:
                w.close()
        for t in conn.tasks:
            if t is not asyncio.current_task():
                t.cancel()
        if self.capture:
            self.closed_conns.append({"id": conn.id, "in": conn.capture_in,
                                      "out": conn.capture_out})
        if not conn.tasks:
            self._conns.pop(conn.id, None)

    def _write(self, conn: _Conn, d: str, data: bytes) -> None:
        """Deliver bytes on direction ``d`` now, or park them while frozen."""
        if conn.closed:
            return
        if self._frozen_until:
            conn.frozen_buf[d].append(data)
            conn.frozen_bytes += len(data)
            return
        w = conn.writers[d]
        if w is None or w.is_closing():
            return
        w.write(data)
        if self.capture:
            conn.capture_out[d] += data

    async def _pump(self, conn: _Conn, d: str, reader: asyncio.StreamReader) -> None:
        """Read direction ``d`` of ``conn``, frame by frame, until EOF or an error; then
        end the connection the same way (EOF -> FIN, reset -> RST) on the other side."""
        reset = False
        why = f"{d} EOF"
        try:
            await self._relay(conn, d, reader)
        except asyncio.IncompleteReadError as exc:
            why = f"{d} EOF" + (" mid-frame" if exc.partial else "")
        except (ConnectionResetError, BrokenPipeError) as exc:
            reset, why = True, f"{d} {type(exc).__name__}"
        except asyncio.CancelledError:
            return
        except OSError as exc:
            reset, why = True, f"{d} {exc!r}"
        self._drop_conn(conn, reset=reset, why=why)

    async def _read(self, conn: _Conn, d: str, reader: asyncio.StreamReader, n: int) -> bytes:
        data = await reader.readexactly(n)
        if self.capture:
            conn.capture_in[d] += data
        return data

    async def _relay(self, conn: _Conn, d: str, reader: asyncio.StreamReader) -> None:
        got = 0
        while got < GREETING_LEN:  # relay greeting bytes as they come (peers wait on parts)
            data = await reader.read(GREETING_LEN - got)
            if not data:
                raise asyncio.IncompleteReadError(b"", GREETING_LEN)
            if self.capture:
                conn.capture_in[d] += data
            got += len(data)
            self._write(conn, d, data)
        frames: list[bytes] = []
        bodies: list[bytes] = []
        while not conn.closed:
            head = await self._read(conn, d, reader, 1)
            flags = head[0]
            size_raw = await self._read(conn, d, reader, 8 if flags & FLAG_LONG else 1)
            size = int.from_bytes(size_raw, "big")
            if size > self.max_frame:
                self._record("raw_relay", conn, dir=d, frame_size=size)
                for f in frames:
                    self._write(conn, d, f)
                self._write(conn, d, head + size_raw)
                await self._raw(conn, d, reader)
                return
            body = await self._read(conn, d, reader, size)
            raw = head + size_raw + body
            if flags & FLAG_COMMAND:
                self.stats["commands"] += 1
                self._write(conn, d, raw)
            else:
                frames.append(raw)
                bodies.append(body)
                if not flags & FLAG_MORE:
                    self.stats["messages"][d] += 1
                    self._on_message(conn, d, frames, bodies)
                    frames, bodies = [], []
            await self._backpressure(conn, d)

    async def _raw(self, conn: _Conn, d: str, reader: asyncio.StreamReader) -> None:
        while not conn.closed:
            data = await reader.read(1 << 16)
            if not data:
                raise asyncio.IncompleteReadError(b"", None)
            if self.capture:
                conn.capture_in[d] += data
            self._write(conn, d, data)
            await self._backpressure(conn, d)

    async def _backpressure(self, conn: _Conn, d: str) -> None:
        while self._frozen_until and conn.frozen_bytes >= self.max_frozen_bytes:
            await self._thaw.wait()
        w = conn.writers[d]
        if w is not None and not w.is_closing() and not self._frozen_until:
            with contextlib.suppress(ConnectionError):
                await w.drain()

    # ------------------------------------------------------------------ faults per message

    def _on_message(self, conn: _Conn, d: str, frames: list[bytes], bodies: list[bytes]) -> None:
        op = _op_name(bodies[1]) if len(bodies) >= 2 else "?"
        uid = _uid(bodies[0]) if bodies else None
        key = f"{d}:{op}"
        if key in self.op_counts or len(self.op_counts) < 256:
            self.op_counts[key] = self.op_counts.get(key, 0) + 1
        data = b"".join(frames)
        forward = True
        after: list[_Armed] = []
        for a in self._armed:
            if a.done or a.f.on != d or (a.f.op is not None and a.f.op != op):
                continue
            if not a.active:
                if a.f.at_msg is None or a.seen != a.f.at_msg:
                    a.seen += 1
                    continue
                a.seen += 1
                self._record("triggered", conn, fault=a.index, by="message", dir=d, uid=uid,
                             op=op)
                if a.f.kind in CONNECTION_KINDS:
                    a.done = True
                    if a.f.after:
                        after.append(a)
                    else:
                        self._connection_fault(a, [conn])
                        forward = forward and a.f.kind in ("freeze", "hook")
                    continue
                a.active = True
            if not forward:
                break
            forward = self._message_fault(a, conn, d, data, frames, uid, op)
            if not forward:
                break
        if forward:
            self._write(conn, d, data)
        for a in after:
            self._connection_fault(a, [conn])

    def _message_fault(self, a: _Armed, conn: _Conn, d: str, data: bytes, frames: list[bytes],
                       uid: Any, op: str) -> bool:
        """Apply an active message fault; returns whether the message still goes out now."""
        kind = a.f.kind
        if kind == "reorder_replies":
            a.batch.append((conn, data, f"{uid}:{op}"))
            self._held_msgs += 1
            self._held_bytes += len(data)
            self._record("held", conn, fault=a.index, dir=d, uid=uid, op=op)
            if len(a.batch) >= a.f.count:
                self._flush_batch(a, why="batch full")
            elif a.flush_handle is None:  # never hold a partial batch for long
                a.flush_handle = self._loop.call_later(1.0, self._flush_batch, a, "timeout")
            self._bound_held()
            return False
        a.left -= 1
        if a.left <= 0:
            a.active, a.done = False, True
        if kind in ("drop_request", "drop_reply"):
            self._record("dropped", conn, fault=a.index, dir=d, uid=uid, op=op)
            return False
        if kind == "delay_reply":
            seconds = a.f.duration_s
            if a.f.duration_max_s > seconds:
                seconds = self.rng.uniform(seconds, a.f.duration_max_s)
            self._record("delayed", conn, fault=a.index, dir=d, uid=uid, op=op,
                         seconds=round(seconds, 3))
            self._hold(conn, d, data, seconds, uid, op)
            return False
        if kind == "truncate":
            body_frame = frames[-1]
            cut = max(1, len(body_frame) // 2)
            self._write(conn, d, b"".join(frames[:-1]) + body_frame[:cut])
            self._record("truncated", conn, fault=a.index, dir=d, uid=uid, op=op,
                         sent=len(data) - len(body_frame) + cut, of=len(data))
            self._drop_conn(conn, reset=False, why=f"fault {a.index} truncate")
            return False
        return True

    def _hold(self, conn: _Conn, d: str, data: bytes, seconds: float, uid: Any, op: str) -> None:
        self._held_msgs += 1
        self._held_bytes += len(data)
        entry: list[Any] = []

        def release() -> None:
            if entry and entry[0] in self._held:
                self._held.remove(entry[0])
            self._held_msgs -= 1
            self._held_bytes -= len(data)
            self._record("released", conn, dir=d, uid=uid, op=op)
            self._write(conn, d, data)

        entry.append((self._loop.call_later(seconds, release), release))
        self._held.append(entry[0])
        self._bound_held()

    def _release_oldest(self) -> None:
        handle, release = self._held[0]
        handle.cancel()
        release()  # removes itself from the list

    def _bound_held(self) -> None:
        """Release the oldest held messages while over the count or byte bound."""
        while self._held_msgs > self.max_held or self._held_bytes > self.max_held_bytes:
            if self._held:
                self._release_oldest()
                continue
            batch = next((a for a in self._armed if a.batch), None)
            if batch is None:
                return
            self._flush_batch(batch, why="bound")

    def _flush_batch(self, a: _Armed, why: str) -> None:
        if a.flush_handle is not None:
            a.flush_handle.cancel()
            a.flush_handle = None
        batch, a.batch = a.batch, []
        if not batch:
            return
        order = list(range(len(batch)))
        if len(order) > 1:
            while order == sorted(order):  # a real reorder whenever there are two
                self.rng.shuffle(order)
        self._record("reordered", fault=a.index, why=why,
                     arrival=[batch[i][2] for i in range(len(batch))],
                     released=[batch[i][2] for i in order])
        for i in order:
            conn, data, _ = batch[i]
            self._held_msgs -= 1
            self._held_bytes -= len(data)
            self._write(conn, S2C, data)
        a.active, a.done = False, True


def _describe(f: Fault) -> dict[str, Any]:
    """The fault as plain data for the log (callables left out)."""
    out: dict[str, Any] = {"kind": f.kind}
    for fld in dataclasses.fields(f):
        v = getattr(f, fld.name)
        if fld.name in ("kind", "action", "undo") or v is None or v == "":
            continue
        if type(v) is float and v == 0.0:
            continue
        out[fld.name] = v
    return out
