"""Wire conformance of the client's frame codec (byte examples from lmcache-mp-protocol.md)."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvconn_plugin.client.protocol import (
    OP_SPECS,
    CacheKey,
    Op,
    PrepareRetrieveReply,
    PrepareStoreReply,
    RegisterEngineDrivenPayload,
    RegisterEngineDrivenReply,
    decode_reply,
    encode_request,
    validate_key,
)
from kvconn_plugin.errors import KVConnProtocolError

enc = msgspec.msgpack.encode

# The 10-entry key map of §3.2, spelled out byte by byte (fixmap 0x8a, fields in order).
KEY_BYTES = (
    b"\x8a"
    b"\xaamodel_name\xa1m"
    b"\xaaworld_size\x02"
    b"\xa9worker_id\x01"
    b"\xa9token_ids\x93\x01\x02\x03"
    b"\xa5start\x00"
    b"\xa3end\x00"
    b"\xaarequest_id\xa1r"
    b"\xaacache_salt\xa0"
    b"\xafrequest_configs\xc0"
    b"\xaenum_kv_readers\x01"
)


def doc_key(**overrides: object) -> CacheKey:
    fields = {"model_name": "m", "world_size": 2, "worker_id": 1, "token_ids": [1, 2, 3],
              "start": 0, "end": 0, "request_id": "r", "cache_salt": "", "request_configs": None,
              "num_kv_readers": 1}
    fields.update(overrides)
    return CacheKey(**fields)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- requests


def test_op_ids_are_the_frozen_0_5_6_values():
    assert {op.name: int(op) for op in Op} == {
        "STORE": 6, "RETRIEVE": 7, "LOOKUP": 8, "QUERY_PREFETCH_STATUS": 9,
        "FREE_LOOKUP_LOCKS": 12, "END_SESSION": 13, "REGISTER_ENGINE_DRIVEN": 14,
        "UNREGISTER_ENGINE_DRIVEN": 15, "PREPARE_STORE": 16, "COMMIT_STORE": 17,
        "PREPARE_RETRIEVE": 18, "COMMIT_RETRIEVE": 19, "CLEAR": 20, "GET_CHUNK_SIZE": 21,
        "PING": 22, "REPORT_BLOCK_ALLOCATION": 23, "NOOP": 24, "GET_EXPERIMENTAL": 32,
    }


def test_get_chunk_size_request_frames():
    assert encode_request(0, Op.GET_CHUNK_SIZE, ()) == [b"\x00", b"\x15"]


def test_ping_none_request_frames():
    assert encode_request(1, Op.PING, (None,)) == [b"\x01", b"\x16", b"\xc0"]


def test_ping_instance_id_is_a_plain_msgpack_int():
    iid = 2510632170158912161
    assert encode_request(3, Op.PING, (iid,)) == [b"\x03", b"\x16",
                                                  b"\xcf" + iid.to_bytes(8, "big")]


def test_key_map_has_ten_fields_in_declaration_order():
    assert enc(doc_key()) == KEY_BYTES


def test_lookup_request_frames():
    assert encode_request(2, Op.LOOKUP, (doc_key(), 1)) == [b"\x02", b"\x08", KEY_BYTES, b"\x01"]


def test_commit_store_sends_data_as_bin():
    frames = encode_request(5, Op.COMMIT_STORE, (doc_key(), 7, b""))
    assert frames[:2] == [b"\x05", b"\x11"] and frames[3:] == [b"\x07", b"\xc4\x00"]


def test_register_payload_is_a_nine_field_map():
    payload = RegisterEngineDrivenPayload(
        instance_id=7, model_name="test/cpu-model", world_size=1, block_size=16, num_layers=4,
        hidden_dim_size=128, dtype_str="float16", use_mla=False, num_physical_slots=64)
    raw = enc(payload)
    assert raw[0] == 0x89
    assert list(msgspec.msgpack.decode(raw)) == [
        "instance_id", "model_name", "world_size", "block_size", "num_layers",
        "hidden_dim_size", "dtype_str", "use_mla", "num_physical_slots"]


def test_every_declared_argument_is_required():
    with pytest.raises(ValueError):
        encode_request(0, Op.PING, ())  # the server would drop it silently
    with pytest.raises(ValueError):
        encode_request(0, Op.COMMIT_STORE, (doc_key(), 1))


def test_large_uids_still_encode_as_one_frame():
    frames = encode_request(2**40, Op.GET_CHUNK_SIZE, ())
    assert len(frames) == 2 and msgspec.msgpack.decode(frames[0]) == 2**40


@pytest.mark.parametrize(
    "change",
    [{"start": 1}, {"end": 255}, {"start": 512, "end": 256}, {"num_kv_readers": 0},
     {"cache_salt": "a/b"}, {"cache_salt": "a@b"}, {"cache_salt": "x" * 129},
     {"cache_salt": "nul\x00"}],
)
def test_validate_key_rejects_what_the_server_would_drop(change):
    with pytest.raises(ValueError):
        validate_key(doc_key(**change), 256)


def test_validate_key_accepts_aligned_keys():
    validate_key(doc_key(start=256, end=512, cache_salt="tenant-1"), 256)


# ---------------------------------------------------------------------------- replies


def test_doc_reply_examples():
    assert decode_reply(Op.GET_CHUNK_SIZE, b"\xcd\x01\x00") == 256
    assert decode_reply(Op.PING, b"\xc3") is True
    assert decode_reply(Op.LOOKUP, None) is None  # the 2-frame None reply
    assert decode_reply(Op.QUERY_PREFETCH_STATUS, None) is None  # still prefetching
    assert decode_reply(Op.QUERY_PREFETCH_STATUS, b"\x03") == 3
    assert decode_reply(Op.GET_EXPERIMENTAL, enc(["kv_event_stream"])) == ["kv_event_stream"]
    assert decode_reply(Op.NOOP, enc("OK")) == "OK"


def test_register_reply_from_appendix_a():
    body = enc({"shm_name": "lmcache_l1_pool_lmctest", "pool_size": 1073741824})
    assert decode_reply(Op.REGISTER_ENGINE_DRIVEN, body) == RegisterEngineDrivenReply(
        "lmcache_l1_pool_lmctest", 1073741824)


def test_prepare_store_reply_from_appendix_a():
    slot = {"offset": 393216, "length": 131072, "shape": [2, 4, 64, 128], "dtype": "float16"}
    body = enc({"context": {"slots": [slot, slot, slot], "chunk_indices": [0, 1, 2]}})
    reply = decode_reply(Op.PREPARE_STORE, body)
    assert isinstance(reply, PrepareStoreReply)
    assert reply.context.chunk_indices == [0, 1, 2]
    assert reply.context.slots[0].offset == 393216
    assert reply.context.slots[0].shape == [2, 4, 64, 128]


def test_prepare_retrieve_pickle_mode_reply():
    reply = decode_reply(Op.PREPARE_RETRIEVE,
                         enc({"success": True, "data": b"\x80\x04", "context": {}}))
    assert isinstance(reply, PrepareRetrieveReply)
    assert reply.success and reply.data == b"\x80\x04" and reply.context.slots == []


def test_unknown_reply_fields_are_ignored():
    body = enc({"shm_name": "x", "pool_size": 1, "added_in_0_6": [1, {"a": None}]})
    assert decode_reply(Op.REGISTER_ENGINE_DRIVEN, body) == RegisterEngineDrivenReply("x", 1)


@pytest.mark.parametrize(
    ("op", "body"),
    [
        (Op.PING, b"\x01"),                    # int is not bool
        (Op.PING, None),                       # a body is required
        (Op.GET_CHUNK_SIZE, b"\x00"),          # chunk size must be positive
        (Op.GET_CHUNK_SIZE, b"\xff"),          # negative
        (Op.GET_CHUNK_SIZE, enc("256")),
        (Op.GET_CHUNK_SIZE, b"\xcd\x01"),      # truncated uint16
        (Op.GET_CHUNK_SIZE, b"\xcd\x01\x00\x00"),  # trailing byte
        (Op.QUERY_PREFETCH_STATUS, b"\xff"),   # negative hit count
        (Op.LOOKUP, b"\xc3"),                  # body-less op with a real body
        (Op.COMMIT_STORE, enc(1)),
        (Op.GET_EXPERIMENTAL, enc([1])),
        (Op.PREPARE_RETRIEVE, enc({"data": b"", "context": {}})),  # success missing
        (Op.PREPARE_STORE, enc({"context": {"slots": [], "chunk_indices": [0]}})),
        (Op.PREPARE_STORE, enc({"context": {
            "slots": [{"offset": 0, "length": 2, "shape": [1], "dtype": "float16"}] * 2,
            "chunk_indices": [0, 0]}})),       # the same chunk twice
        (Op.PREPARE_STORE, enc({"context": {
            "slots": [{"offset": -1, "length": 2, "shape": [1], "dtype": "float16"}],
            "chunk_indices": [0]}})),
        (Op.PREPARE_STORE, enc({"context": {
            "slots": [{"offset": 0, "length": 2, "shape": [0], "dtype": "float16"}],
            "chunk_indices": [0]}})),
        (Op.REGISTER_ENGINE_DRIVEN, enc({"shm_name": 5})),
        (Op.REGISTER_ENGINE_DRIVEN, b"\x81\xa1x" + b"\x91" * 100_000 + b"\xc0"),  # deep nesting
        (Op.PREPARE_STORE, b"\xc6\xff\xff\xff\xff"),   # bin32 claiming 4 GiB
        (Op.GET_EXPERIMENTAL, b"\xdd\xff\xff\xff\xff"),  # array32 claiming 4G items
        (Op.PING, b"\xc1"),                    # the never-used msgpack byte
    ],
)
def test_decode_is_strict(op: Op, body: bytes | None):
    with pytest.raises(KVConnProtocolError):
        decode_reply(op, body)


# ---------------------------------------------------------------------------- fuzz


def _is_valid(op: Op, value: object) -> bool:
    reply = OP_SPECS[op].reply
    if reply is None:
        return value is None
    if value is None:
        return op is Op.QUERY_PREFETCH_STATUS
    if op is Op.GET_CHUNK_SIZE:
        return type(value) is int and value > 0
    if op is Op.QUERY_PREFETCH_STATUS:
        return type(value) is int and value >= 0
    if op in (Op.PING, Op.COMMIT_STORE, Op.COMMIT_RETRIEVE):
        return type(value) is bool
    if op is Op.NOOP:
        return type(value) is str
    if op is Op.GET_EXPERIMENTAL:
        return isinstance(value, list) and all(type(v) is str for v in value)
    if op is Op.PREPARE_STORE:
        ctx = value.context  # type: ignore[attr-defined]
        return isinstance(value, PrepareStoreReply) and len(ctx.slots) == len(ctx.chunk_indices)
    if op is Op.PREPARE_RETRIEVE:
        return isinstance(value, PrepareRetrieveReply) and type(value.success) is bool
    if op is Op.REGISTER_ENGINE_DRIVEN:
        return isinstance(value, RegisterEngineDrivenReply) and value.pool_size >= 0
    return False


OPS = sorted(OP_SPECS)
FUZZ_EXAMPLES_PER_OP = 300  # x 18 ops x 2 strategies = 10,800 byte strings

_msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
    | st.text(max_size=8) | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["context", "slots", "chunk_indices", "offset", "length", "shape",
                         "dtype", "success", "data", "shm_name", "pool_size", "x"]),
        inner, max_size=5),
    max_leaves=12,
)

_fuzz = settings(max_examples=FUZZ_EXAMPLES_PER_OP, deadline=None, database=None,
                 suppress_health_check=list(HealthCheck))


def _check(op: Op, body: bytes | None) -> None:
    try:
        value = decode_reply(op, body)
    except KVConnProtocolError:
        return
    assert _is_valid(op, value), (op, body, value)


@pytest.mark.parametrize("op", OPS, ids=[op.name for op in OPS])
@_fuzz
@given(body=st.one_of(st.none(), st.binary(max_size=48)))
def test_fuzz_random_bytes(op: Op, body: bytes | None):
    _check(op, body)


@pytest.mark.parametrize("op", OPS, ids=[op.name for op in OPS])
@_fuzz
@given(value=_msgpack_values, cut=st.integers(0, 3))
def test_fuzz_msgpack_shaped_bytes(op: Op, value: object, cut: int):
    body = enc(value)
    _check(op, body[: len(body) - cut] if cut < len(body) else body)


# ---------------------------------------------------------------------------- pickle fallback


class TestPickleCodec:
    """The engine-driven pickle payloads: what the server expects, and a safe decoder."""

    SHAPE = (2, 2, 4, 8)

    @pytest.fixture(autouse=True)
    def _torch(self):
        self.torch = pytest.importorskip("torch")
        from kvconn_plugin.client import pickle_codec

        self.codec = pickle_codec

    @pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
    def test_round_trip_is_byte_exact(self, dtype):
        torch = self.torch
        chunks = [torch.randn(self.SHAPE).to(getattr(torch, dtype)) for _ in range(3)]
        data = self.codec.encode_chunks(chunks, self.SHAPE, dtype)
        images = self.codec.decode_chunks(data, 3, self.SHAPE, dtype)
        for chunk, image in zip(chunks, images, strict=True):
            assert image.dtype == torch.uint8 and image.dim() == 1
            assert torch.equal(chunk.view(-1).view(torch.uint8), image)

    def test_encoding_is_what_the_server_unpickles(self):
        import pickle

        torch = self.torch
        image = torch.arange(2 * 2 * 4 * 8 * 2, dtype=torch.int64).to(torch.uint8)
        data = self.codec.encode_chunks([image], self.SHAPE, "float16")
        (chunk,) = pickle.loads(data)  # this is exactly what the server does
        assert chunk.dtype == torch.float16 and tuple(chunk.shape) == self.SHAPE
        assert torch.equal(chunk.view(-1).view(torch.uint8), image)

    def test_views_are_compacted_before_pickling(self):
        torch = self.torch
        big = torch.zeros((100, *self.SHAPE), dtype=torch.float16)
        data = self.codec.encode_chunks([big[3]], self.SHAPE, "float16")
        assert len(data) < big[3].numel() * 2 + 1024  # one chunk, not the 100-chunk buffer

    @pytest.mark.parametrize(
        "bad",
        ["shape", "dtype", "image-size", "not-a-tensor"],
    )
    def test_encode_rejects_wrong_chunks(self, bad):
        torch = self.torch
        chunk = {
            "shape": torch.zeros((2, 2, 4, 4), dtype=torch.float16),
            "dtype": torch.zeros(self.SHAPE, dtype=torch.float32),
            "image-size": torch.zeros(7, dtype=torch.uint8),
            "not-a-tensor": b"\x00" * 256,
        }[bad]
        with pytest.raises(ValueError):
            self.codec.encode_chunks([chunk], self.SHAPE, "float16")

    def test_foreign_globals_are_refused(self):
        import pickle

        class Evil:
            def __reduce__(self):
                return (os.system, ("echo owned",))

        import os

        for payload in (pickle.dumps([Evil()]), pickle.dumps(OSError("x")),
                        pickle.dumps([self.torch.nn.Linear(1, 1)])):
            with pytest.raises(KVConnProtocolError, match="not allowed"):
                self.codec.decode_chunks(payload, 1, self.SHAPE, "float16")

    @pytest.mark.parametrize("what", ["count", "shape", "dtype", "not-list", "truncated",
                                      "garbage", "numpy"])
    def test_decode_rejects_unexpected_payloads(self, what):
        import pickle

        torch = self.torch
        good = [torch.zeros(self.SHAPE, dtype=torch.float16)]
        payload = {
            "count": pickle.dumps(good * 2),
            "shape": pickle.dumps([torch.zeros((2, 2, 4, 4), dtype=torch.float16)]),
            "dtype": pickle.dumps([torch.zeros(self.SHAPE, dtype=torch.float32)]),
            "not-list": pickle.dumps(good[0]),
            "truncated": pickle.dumps(good)[:-20],
            "garbage": b"\x80\x05junk",
            "numpy": pickle.dumps([good[0].numpy()]),
        }[what]
        with pytest.raises(KVConnProtocolError):
            self.codec.decode_chunks(payload, 1, self.SHAPE, "float16")
