"""Follow an LMCache server's cache-event stream (``subscribe_kv_events``, protocol §2.8).

Engine-driven stores produce no ``stored`` records on the server, but its L1 evictions (LRU,
``CLEAR``) are all reported as ``removed`` records carrying the server's chunk hashes. This
thread keeps one subscription open, hands each batch to a sink, and tells the sink to
withdraw everything it announced when it can no longer follow the log exactly (server
restarted, records lost, stream or server gone).

The stream has its own DEALER socket and thread so the request client's I/O loop stays
unchanged: one immediate batch, then one batch per credit (``[uid, b"", b"ack"]``); PINGs
carrying our instance id keep the subscription from being reaped as a dead worker and tell
a silent server from an idle one. Nothing from the server is trusted: batches are decoded
with typed, bounded decoders and anything else ends the subscription (then resubscribes).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from typing import Protocol

import msgspec
import zmq

from kvconn_plugin.client.api import new_instance_id
from kvconn_plugin.client.protocol import Op, decode_reply, encode_request
from kvconn_plugin.errors import KVConnError
from kvconn_plugin.utils import RateLimitedLog

logger = logging.getLogger(__name__)
_warn = RateLimitedLog(logger, interval=300.0)

CAPABILITY = "kv_event_stream"
SUBSCRIBE_OP = "subscribe_kv_events"
MAX_EVENTS = 1024  # the server's upper bound per batch
MAX_MESSAGE_BYTES = 64 << 20  # one batch of 1024 records of 256 tokens is ~1.3 MiB


class KVEventRecord(msgspec.Struct):
    seq: int
    kind: str
    medium: str
    model_name: str
    block_hashes: list[bytes]
    parent_block_hash: bytes | None = None
    token_ids: list[int] = []


class KVEventBatch(msgspec.Struct):
    enabled: bool
    incarnation: int
    next_cursor: int
    lost: bool
    events: list[KVEventRecord]


_batch_decoder = msgspec.msgpack.Decoder(KVEventBatch)
_encode = msgspec.msgpack.encode


class EventSink(Protocol):
    """Called on the stream's thread; implementations must only queue."""

    def on_records(self, records: list[KVEventRecord], received_at: float) -> None: ...

    def on_resync(self, reason: str) -> None: ...


class _Lost(Exception):
    """The subscription cannot continue; resubscribe after a pause."""


class ServerEventStream:
    """Args:
        url: the server address (normalized, as ``LMCacheClient.url``).
        model_name: only records of this cache namespace are delivered.
        sink: receives records and resync requests.
        interval: ping period and the deadline of each ping.
        control_timeout: deadline of the capability query and of the first batch.
    """

    def __init__(self, url: str, model_name: str, sink: EventSink, *, interval: float,
                 control_timeout: float):
        self.url = url
        self.model_name = model_name
        self._sink = sink
        self._interval = max(0.05, float(interval))
        self._control_timeout = max(0.05, float(control_timeout))
        self._instance_id = new_instance_id()
        self._uids = itertools.count(1)
        self._stop = threading.Event()
        self._live = threading.Event()
        self._cursor = 0
        self._incarnation: int | None = None
        self._thread = threading.Thread(target=self._run, name="kvconn-events", daemon=True)

    @property
    def live(self) -> bool:
        """Subscribed and answering: evictions reach the sink."""
        return self._live.is_set()

    def start(self) -> None:
        self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=timeout)

    # ------------------------------------------------------------------ stream thread

    def _run(self) -> None:
        pause = 0.2
        ctx = zmq.Context(io_threads=1)
        try:
            while not self._stop.is_set():
                try:
                    if self._session(ctx):
                        pause = 0.2
                except _Lost as exc:
                    logger.debug("kvconn: event stream from %s: %s", self.url, exc)
                    self._lose(str(exc))
                    pause = min(pause * 2, self._interval)
                except Exception:  # this thread must never die silently
                    logger.exception("kvconn: event stream from %s failed", self.url)
                    self._lose("event stream error")
                    pause = self._interval
                self._stop.wait(pause)
        finally:
            ctx.term()

    def _lose(self, reason: str) -> None:
        """What we announced can no longer be kept exact: the sink withdraws it."""
        if self._live.is_set():
            self._live.clear()
            self._sink.on_resync(reason)

    def _session(self, ctx: zmq.Context) -> bool:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        stream_uid: bytes | None = None
        try:
            sock.connect(self.url)
            caps = self._call(sock, Op.GET_EXPERIMENTAL)
            if not isinstance(caps, list) or CAPABILITY not in caps:
                _warn.warning("no-events", "kvconn: the LMCache server at %s does not offer its "
                              "cache-event stream; routers learn our stores but not its "
                              "evictions", self.url)
                self._stop.wait(self._interval * 6)
                return False
            uid = next(self._uids)
            stream_uid = _encode(uid)
            sock.send_multipart([stream_uid, _encode(SUBSCRIBE_OP), _encode(self._instance_id),
                                 _encode(self.model_name), _encode(self._cursor),
                                 _encode(MAX_EVENTS)])
            self._follow(sock, stream_uid)
            return True
        finally:
            if stream_uid is not None:
                # Best effort: frees the server's subscription slot at once.
                with contextlib.suppress(zmq.ZMQError):
                    sock.send_multipart([stream_uid, b"", b"cancel"], zmq.NOBLOCK)
            sock.close(linger=0)

    def _call(self, sock: zmq.Socket, op: Op, *args: object) -> object:
        uid = _encode(next(self._uids))
        frames = encode_request(0, op, args)
        sock.send_multipart([uid, *frames[1:]])
        deadline = time.monotonic() + self._control_timeout
        while not self._stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                raise _Lost(f"no reply to {op.name}")
            if sock.poll(int(min(left, 0.25) * 1000) + 1, zmq.POLLIN):
                reply = sock.recv_multipart()
                if len(reply) >= 2 and reply[0] == uid:
                    try:
                        return decode_reply(op, reply[2] if len(reply) > 2 else None)
                    except KVConnError as exc:
                        raise _Lost(str(exc)) from None
        raise _Lost("closing")

    def _follow(self, sock: zmq.Socket, stream_uid: bytes) -> None:
        first_by = time.monotonic() + self._control_timeout
        got_first = False
        ping_uid: bytes | None = None
        ping_due = time.monotonic() + self._interval
        while not self._stop.is_set():
            now = time.monotonic()
            if not got_first and now > first_by:
                raise _Lost("no first event batch")
            if now >= ping_due:
                if ping_uid is not None:
                    raise _Lost("server stopped answering")
                ping_uid = _encode(next(self._uids))
                frames = encode_request(0, Op.PING, (self._instance_id,))
                sock.send_multipart([ping_uid, *frames[1:]])
                ping_due = now + self._interval
            if not sock.poll(250, zmq.POLLIN):
                continue
            frames = sock.recv_multipart()
            if len(frames) < 2:
                continue
            if frames[0] == ping_uid:
                ping_uid = None
                continue
            if frames[0] != stream_uid:
                continue  # a late reply to an earlier call
            if len(frames) != 3:
                raise _Lost("the server ended the event stream")
            batch = self._decode(frames[2])
            if not batch.enabled:
                _warn.warning("events-off", "kvconn: the LMCache server at %s records no cache "
                              "events (--kv-event-log-size 0?); evictions stay unknown", self.url)
                self._stop.wait(self._interval * 6)
                raise _Lost("server records no events")
            got_first = True
            self._accept(batch)
            sock.send_multipart([stream_uid, b"", b"ack"])  # credit for the next batch

    def _decode(self, body: bytes) -> KVEventBatch:
        try:
            batch = _batch_decoder.decode(body)
        except (msgspec.DecodeError, msgspec.ValidationError, RecursionError, ValueError,
                TypeError, OverflowError) as exc:
            raise _Lost(f"malformed event batch: {exc}") from None
        if len(batch.events) > MAX_EVENTS or batch.next_cursor < 0:
            raise _Lost("event batch out of bounds")
        return batch

    def _accept(self, batch: KVEventBatch) -> None:
        if self._incarnation is not None and batch.incarnation != self._incarnation:
            self._incarnation = batch.incarnation
            self._sink.on_resync("LMCache server restarted")
            if self._cursor:
                # Our cursor counts the old server's log: start the new one from its top.
                self._cursor = 0
                raise _Lost("resubscribing to the restarted server's log")
        elif batch.lost and self._incarnation is not None:
            self._sink.on_resync("LMCache server dropped cache events")
        self._incarnation = batch.incarnation
        self._cursor = batch.next_cursor
        self._live.set()
        records = [r for r in batch.events if r.model_name == self.model_name]
        if records:
            self._sink.on_records(records, time.monotonic())
