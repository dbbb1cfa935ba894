"""The transport against a scripted ROUTER peer that misbehaves in every way we can think of.

Every call must end with the right typed error (or a timeout) within its deadline, the
I/O thread must survive, and the next well-formed reply must be delivered normally.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import msgspec
import pytest
import zmq

from kvconn_plugin.client import LMCacheClient
from kvconn_plugin.client.protocol import Op, SlotDescriptor
from kvconn_plugin.client.shm_pool import ShmPool
from kvconn_plugin.client.transport import MQTransport
from kvconn_plugin.errors import (
    KVConnClosed,
    KVConnProtocolError,
    KVConnTimeout,
    KVConnUnavailable,
)

enc = msgspec.msgpack.encode
CALL_TIMEOUT = 0.5
BOUND = CALL_TIMEOUT + 2.0  # "fails within its timeout", with slack for a loaded CI host

Reply = Callable[[list[bytes]], list[list[bytes]]]


def honest(frames: list[bytes]) -> list[list[bytes]]:
    """What a real server answers to the ops these tests use."""
    uid, op = frames[0], frames[1]
    body = {Op.PING: b"\xc3", Op.GET_CHUNK_SIZE: b"\xcd\x01\x00"}.get(Op(frames[1][0]))
    return [[uid, op] if body is None else [uid, op, body]]


class FakePeer:
    """A ROUTER socket on a random loopback port, answering with ``self.reply``."""

    def __init__(self) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.url = f"tcp://127.0.0.1:{self.port}"
        self.reply: Reply = honest
        self.received: list[list[bytes]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="fake-router", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            while not self._stop.is_set():
                if not self.sock.poll(20):
                    continue
                identity, *frames = self.sock.recv_multipart()
                self.received.append(frames)
                for out in self.reply(frames):
                    self.sock.send_multipart([identity, *out])
        finally:
            self.sock.close(linger=0)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.ctx.term()


@pytest.fixture
def peer() -> Iterator[FakePeer]:
    p = FakePeer()
    yield p
    p.close()


@pytest.fixture
def client(peer: FakePeer) -> Iterator[LMCacheClient]:
    with LMCacheClient(peer.url, control_timeout=CALL_TIMEOUT, transfer_timeout=CALL_TIMEOUT) as c:
        assert c.ping() is True  # connected and answering before the misbehaviour starts
        yield c
        # The client survived whatever the test did: a clean call still works.
        assert c.transport._thread.is_alive()


def still_usable(peer: FakePeer, client: LMCacheClient) -> None:
    peer.reply = honest
    assert client.ping() is True
    assert client.get_chunk_size() == 256


def expect(client_call: Callable[[], object], error: type[BaseException]) -> BaseException:
    t0 = time.monotonic()
    with pytest.raises(error) as info:
        client_call()
    assert time.monotonic() - t0 < BOUND
    return info.value


# ---------------------------------------------------------------------------- frames


def test_single_garbage_frame_is_dropped_and_the_call_times_out(peer, client):
    peer.reply = lambda f: [[b"\xde\xad\xbe\xef"]]
    expect(client.ping, KVConnTimeout)
    still_usable(peer, client)


def test_unknown_uid_is_ignored(peer, client):
    peer.reply = lambda f: [[b"\xcd\x30\x39", f[1], b"\xc3"]]
    expect(client.ping, KVConnTimeout)
    still_usable(peer, client)


def test_reply_echoing_another_op_fails_the_call(peer, client):
    peer.reply = lambda f: [[f[0], enc(int(Op.NOOP)), b"\xc3"]]
    expect(client.ping, KVConnProtocolError)
    still_usable(peer, client)


def test_uid_only_reply_is_dropped(peer, client):
    peer.reply = lambda f: [[f[0]]]
    expect(client.ping, KVConnTimeout)
    still_usable(peer, client)


def test_extra_frames_fail_the_call(peer, client):
    peer.reply = lambda f: [[f[0], f[1], b"\xc3", b"surprise"]]
    expect(client.ping, KVConnProtocolError)
    still_usable(peer, client)


def test_empty_frames_fail_the_call(peer, client):
    peer.reply = lambda f: [[f[0], f[1], b""]]
    expect(client.ping, KVConnProtocolError)
    still_usable(peer, client)


@pytest.mark.parametrize(
    "body",
    [b"\xc1", b"\xcd\x01", b"\x92\xc3", b"\xa3ab", b"\xc4\x10short", b"\xff" * 64],
    ids=["never-used-byte", "truncated-uint16", "truncated-array", "truncated-str",
         "truncated-bin", "junk"],
)
def test_invalid_msgpack_fails_the_call(peer, client, body):
    peer.reply = lambda f: [[f[0], f[1], body]]
    expect(client.get_chunk_size, KVConnProtocolError)
    still_usable(peer, client)


@pytest.mark.parametrize(
    ("call", "body"),
    [
        ("ping", enc(1)),
        ("ping", enc("True")),
        ("get_chunk_size", enc(-256)),
        ("get_chunk_size", enc(0)),
        ("get_chunk_size", enc([256])),
        ("get_experimental", enc({"kv_event_stream": True})),
    ],
)
def test_wrong_types_fail_the_call(peer, client, call, body):
    peer.reply = lambda f: [[f[0], f[1], body]]
    expect(getattr(client, call), KVConnProtocolError)
    still_usable(peer, client)


def test_missing_body_for_a_typed_op_fails_the_call(peer, client):
    peer.reply = lambda f: [[f[0], f[1]]]
    expect(client.get_chunk_size, KVConnProtocolError)
    still_usable(peer, client)


@pytest.mark.parametrize(
    "body",
    [b"\xc6\xff\xff\xff\xff", b"\xdb\xff\xff\xff\xffabc", b"\xdd\xff\xff\xff\xff\xc3",
     b"\xdf\xff\xff\xff\xff", b"\x91" * 200_000 + b"\xc3"],
    ids=["bin32-4GiB", "str32-4GiB", "array32-4G", "map32-4G", "nested-200k"],
)
def test_huge_lengths_fail_the_call(peer, client, body):
    peer.reply = lambda f: [[f[0], f[1], body]]
    expect(client.get_experimental, KVConnProtocolError)
    still_usable(peer, client)


def test_deeply_nested_unknown_field_does_not_kill_the_io_thread(peer, client):
    body = b"\x82\xa8shm_name\xa1x\xa1z" + b"\x91" * 200_000 + b"\xc0"
    peer.reply = lambda f: [[f[0], f[1], body]]
    from kvconn_plugin.client.protocol import RegisterEngineDrivenPayload

    payload = RegisterEngineDrivenPayload(
        instance_id=1, model_name="m", world_size=1, block_size=16, num_layers=1,
        hidden_dim_size=8, dtype_str="float16", use_mla=False)
    expect(lambda: client.register_engine_driven(payload), KVConnProtocolError)
    still_usable(peer, client)


# ---------------------------------------------------------------------------- timing


def test_silence_is_a_timeout_naming_the_op(peer, client):
    peer.reply = lambda f: []
    err = expect(client.get_chunk_size, KVConnTimeout)
    assert "GET_CHUNK_SIZE" in str(err)
    assert not client.transport._pending
    still_usable(peer, client)


def test_late_reply_after_the_deadline_is_ignored(peer, client):
    held: list[list[bytes]] = []
    peer.reply = lambda f: (held.append(f), [])[1]
    expect(client.ping, KVConnTimeout)
    peer.reply = lambda f: [[held[0][0], held[0][1], b"\xc2"], *honest(f)]  # stale False first
    assert client.ping() is True


def test_out_of_order_replies_are_matched_by_uid(peer, client):
    batch: list[list[bytes]] = []

    def reverse(frames: list[bytes]) -> list[list[bytes]]:
        batch.append(frames)
        if len(batch) < 3:
            return []
        return [out for f in reversed(batch) for out in honest(f)]

    peer.reply = reverse
    futs = [client.ping_async(), client.transport.submit(Op.GET_CHUNK_SIZE), client.ping_async()]
    assert [f.result(timeout=BOUND) for f in futs] == [True, 256, True]


def test_duplicate_replies_resolve_once(peer, client):
    peer.reply = lambda f: honest(f) * 3
    for _ in range(5):
        assert client.get_chunk_size() == 256
    assert not client.transport._pending


def test_close_fails_pending_calls(peer):
    peer.reply = lambda f: []
    transport = MQTransport(peer.url, timeout=30.0)
    fut = transport.submit(Op.PING, None)
    deadline = time.monotonic() + BOUND
    while not peer.received and time.monotonic() < deadline:
        time.sleep(0.01)
    transport.close()
    with pytest.raises(KVConnClosed):
        fut.result(timeout=BOUND)
    with pytest.raises(KVConnClosed):
        transport.submit(Op.PING, None)
    assert not transport._thread.is_alive()


def test_nothing_listening_is_unavailable_not_timeout(peer):
    url = peer.url
    peer.close()  # the port is released; nothing listens there any more
    with MQTransport(url, timeout=CALL_TIMEOUT) as transport:
        t0 = time.monotonic()
        with pytest.raises(KVConnUnavailable) as info:
            transport.call(Op.PING, None)
        assert time.monotonic() - t0 < BOUND
        assert url in str(info.value)
    peer.ctx = zmq.Context()  # the fixture closes it again


def test_no_request_ever_has_fewer_than_two_frames(peer, client):
    for _ in range(3):
        client.ping()
        client.get_chunk_size()
    assert peer.received and all(len(f) >= 2 for f in peer.received)


# ---------------------------------------------------------------------------- SHM slots


@pytest.fixture
def small_pool() -> Iterator[ShmPool]:
    name = f"kvt-fake-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    path = f"/dev/shm/{name}"
    with open(path, "wb") as f:
        f.truncate(1 << 20)
    try:
        with ShmPool(name, 1 << 20) as pool:
            yield pool
    finally:
        os.unlink(path)


SHAPE = (2, 2, 16, 8)  # 512 elements; 1024 bytes in float16


def prepare_store_reply(slot: dict) -> bytes:
    return enc({"context": {"slots": [slot], "chunk_indices": [0]}})


@pytest.mark.parametrize(
    "slot",
    [
        {"offset": (1 << 20) - 512, "length": 1024, "shape": list(SHAPE), "dtype": "float16"},
        {"offset": 1 << 40, "length": 1024, "shape": list(SHAPE), "dtype": "float16"},
        {"offset": 4097, "length": 1024, "shape": list(SHAPE), "dtype": "float16"},
        {"offset": 4096, "length": 4096, "shape": list(SHAPE), "dtype": "float16"},
        {"offset": 4096, "length": 1024, "shape": [2, 2, 16, 4, 2], "dtype": "float16"},
        {"offset": 4096, "length": 2048, "shape": list(SHAPE), "dtype": "float32"},
        {"offset": 4096, "length": 1024, "shape": list(SHAPE), "dtype": "complex32"},
    ],
    ids=["past-end", "far-out", "misaligned", "wrong-length", "wrong-shape", "wrong-dtype",
         "unknown-dtype"],
)
def test_bad_slots_are_rejected_before_any_write(peer, client, small_pool, slot):
    peer.reply = lambda f: [[f[0], f[1], prepare_store_reply(slot)]]
    from kvconn_plugin.client.protocol import CacheKey

    key = CacheKey(model_name="m", world_size=1, worker_id=0, token_ids=[1] * 256, start=0,
                   end=256, request_id="r")
    reply = client.prepare_store(key, 1)
    with pytest.raises(KVConnProtocolError):
        small_pool.slot_view(reply.context.slots[0], SHAPE, "float16")
    still_usable(peer, client)


def test_good_slot_gives_a_view_of_exactly_the_slot(small_pool):
    view = small_pool.slot_view(SlotDescriptor(4096, 1024, list(SHAPE), "float16"), SHAPE,
                                "float16")
    view.fill_(0xAB)
    assert view.numel() == 1024 and view.data_ptr() == small_pool.address + 4096
    assert int(small_pool.tensor[4095]) == 0 and int(small_pool.tensor[4096 + 1024]) == 0
    del view


@pytest.mark.parametrize("url", ["tcp://127.0.0.1:notaport", "tcp://has space:5", "udp://x:1"])
def test_malformed_urls_fail_typed_without_leaking(url):
    from kvconn_plugin.errors import KVConnConfigError

    before = threading.active_count()
    with pytest.raises(KVConnConfigError, match="URL"):
        MQTransport(url)
    assert threading.active_count() == before


def test_blocking_lookup_honours_its_own_timeout(peer, client):
    """A lookup ack slower than the control timeout still counts within lookup(timeout)."""
    from kvconn_plugin.client.protocol import CacheKey

    acked = threading.Event()

    def slow_ack(frames: list[bytes]) -> list[list[bytes]]:
        if Op(frames[1][0]) is Op.LOOKUP:
            time.sleep(2 * CALL_TIMEOUT)
            acked.set()
            return [[frames[0], frames[1]]]
        return [[frames[0], frames[1], enc(2)]]

    peer.reply = slow_ack
    key = CacheKey(model_name="m", world_size=1, worker_id=None, token_ids=[1] * 512, start=0,
                   end=512, request_id="r")
    assert client.lookup(key, timeout=4 * CALL_TIMEOUT) == 2
    acked.clear()
    expect(lambda: client.lookup(key), KVConnTimeout)  # the default budget is too short
    assert acked.wait(BOUND)  # the peer is single-threaded: let it finish the slow ack
    still_usable(peer, client)


def test_lost_connection_fails_calls_in_flight_at_once(peer):
    """A reply to a request sent before a disconnect can never arrive: fail it now,
    not at the (long) transfer deadline."""
    with MQTransport(peer.url, timeout=30.0) as transport:
        assert transport.call(Op.PING, None) is True  # connected
        peer.reply = lambda f: []
        fut = transport.submit(Op.GET_CHUNK_SIZE)
        deadline = time.monotonic() + BOUND
        while len(peer.received) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        peer.close()  # the server goes away with the request unanswered
        with pytest.raises(KVConnUnavailable, match="lost"):
            fut.result(timeout=BOUND)
        assert not transport._pending
    peer.ctx = zmq.Context()  # the fixture closes it again


def test_a_pool_mapped_under_inference_mode_takes_writes_from_any_thread(small_pool):
    """vLLM calls ``wait_for_save`` (and binds the step's metadata) under
    ``torch.inference_mode()``, so that is where a worker first touches the pool. The store
    finisher thread, outside inference mode, must still be able to copy a staged chunk into
    a slot; an inference-mode pool tensor refused that, so every staged store failed after
    the server had reserved its slots (dropped, and its write locks left until their TTL)."""
    import torch

    slot = SlotDescriptor(offset=4096, length=1024, shape=list(SHAPE), dtype="float16")
    with torch.inference_mode():
        small_pool.slot_view(slot, SHAPE, "float16").zero_()  # first use maps the pool
        staged = torch.arange(1024, dtype=torch.int64).to(torch.uint8)
    errors: list[BaseException] = []

    def finisher() -> None:
        try:
            small_pool.slot_view(slot, SHAPE, "float16").copy_(staged)
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=finisher, name="kvconn-test-finisher")
    t.start()
    t.join(10)
    assert errors == []
    assert torch.equal(small_pool.slot_view(slot, SHAPE, "float16"), staged)
