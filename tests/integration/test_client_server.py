"""Our wire client against a real LMCache 0.5.6 server process (engine-driven mode)."""

from __future__ import annotations

import math
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

torch = pytest.importorskip("torch")

from kvconn_plugin.client import (  # noqa: E402
    CacheKey,
    LMCacheClient,
    RegisterEngineDrivenPayload,
    new_instance_id,
)
from kvconn_plugin.client.pickle_codec import decode_chunks, encode_chunks  # noqa: E402
from kvconn_plugin.client.shm_pool import ShmPool  # noqa: E402
from kvconn_plugin.errors import KVConnUnavailable  # noqa: E402

pytestmark = pytest.mark.lmcache_server

BLOCK_SIZE = 16
DTYPES = ["bfloat16", "float16", "float32"]


@pytest.fixture
def client(lmcache_server) -> Iterator[LMCacheClient]:
    with LMCacheClient(lmcache_server.url, control_timeout=10.0, transfer_timeout=30.0) as c:
        yield c


@dataclass
class Worker:
    """One registered engine-driven KV rank."""

    client: LMCacheClient
    instance_id: int
    model: str
    world_size: int
    rank: int
    shape: tuple[int, ...]  # slot shape of one chunk
    dtype: str
    pool: ShmPool | None

    @property
    def nbytes(self) -> int:
        itemsize = torch.empty((), dtype=getattr(torch, self.dtype)).element_size()
        return math.prod(self.shape) * itemsize

    def key(self, tokens: list[int], end: int, request_id: str, *, salt: str = "",
            worker: bool = True) -> CacheKey:
        return CacheKey(model_name=self.model, world_size=self.world_size,
                        worker_id=self.rank if worker else None, token_ids=tokens, start=0,
                        end=end, request_id=request_id, cache_salt=salt)

    def store(self, tokens: list[int], n_chunks: int, *, salt: str = "",
              expect_new: list[int] | None = None) -> list[torch.Tensor]:
        """Store ``n_chunks`` random chunks through the SHM slots; returns what was written.

        ``expect_new``: the chunk indices the server must ask for (default: all of them).
        """
        chunk = self.client.get_chunk_size()
        key = self.key(tokens, n_chunks * chunk, f"store-{uuid.uuid4().hex}", salt=salt)
        data = [torch.randint(0, 256, (self.nbytes,), dtype=torch.uint8) for _ in range(n_chunks)]
        reply = self.client.prepare_store(key, self.instance_id)
        expected = list(range(n_chunks)) if expect_new is None else expect_new
        assert sorted(reply.context.chunk_indices) == expected
        assert self.pool is not None
        for slot, ci in zip(reply.context.slots, reply.context.chunk_indices, strict=True):
            self.pool.slot_view(slot, self.shape, self.dtype).copy_(data[ci])
        assert self.client.commit_store(key, self.instance_id) is True
        return data

    def close(self) -> None:
        self.client.unregister_engine_driven(self.instance_id)
        if self.pool is not None:
            self.pool.close()


def register(client: LMCacheClient, *, model: str, dtype: str, num_layers: int = 4,
             hidden: int = 64, mla: bool = False, world_size: int = 1, rank: int = 0,
             expect_shm: bool = True) -> Worker:
    chunk = client.get_chunk_size()
    iid = new_instance_id()
    reply = client.register_engine_driven(RegisterEngineDrivenPayload(
        instance_id=iid, model_name=model, world_size=world_size, block_size=BLOCK_SIZE,
        num_layers=num_layers, hidden_dim_size=hidden, dtype_str=dtype, use_mla=mla,
        num_physical_slots=chunk))
    shape = (num_layers, chunk, hidden) if mla else (2, num_layers, chunk, hidden)
    if expect_shm:
        assert reply.shm_name and reply.pool_size > 0
        pool = ShmPool(reply.shm_name, reply.pool_size)
    else:
        assert reply.shm_name == ""
        pool = None
    return Worker(client, iid, model, world_size, rank, shape, dtype, pool)


def tokens_for(n_chunks: int, chunk: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 50_000, (n_chunks * chunk,), generator=g).tolist()


def lookup(client: LMCacheClient, w: Worker, tokens: list[int], end: int, *, salt: str = "",
           release: bool = True) -> tuple[int, CacheKey]:
    """LOOKUP + QUERY; frees the read locks and the session unless ``release`` is false."""
    key = w.key(tokens, end, f"lookup-{uuid.uuid4().hex}", salt=salt, worker=False)
    hits = client.lookup(key)
    if release:
        client.free_lookup_locks(key)
        client.end_session(key.request_id)
    return hits, key


def model_name(tag: str) -> str:
    return f"kvt/{tag}-{uuid.uuid4().hex[:8]}"


# ---------------------------------------------------------------------------- SHM round trip


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mla", [False, True], ids=["mha", "mla"])
def test_store_lookup_retrieve_shm_byte_exact(client: LMCacheClient, dtype: str, mla: bool):
    w = register(client, model=model_name("rt"), dtype=dtype, mla=mla,
                 hidden=576 if mla else 64, num_layers=2 if mla else 4)
    try:
        chunk = client.get_chunk_size()
        assert w.shape == ((2, chunk, 576) if mla else (2, 4, chunk, 64))
        tokens = tokens_for(3, chunk, seed=1)
        written = w.store(tokens, 3)

        hits, key = lookup(client, w, tokens, 3 * chunk, release=False)
        assert hits == 3
        rkey = w.key(tokens, 3 * chunk, key.request_id)
        reply = client.prepare_retrieve(rkey, w.instance_id)
        assert reply.success is True and len(reply.context.slots) == 3
        for slot, expected in zip(reply.context.slots, written, strict=True):
            got = w.pool.slot_view(slot, w.shape, dtype)
            assert torch.equal(got, expected)
            typed = w.pool.typed_view(slot, w.shape, dtype)
            assert typed.dtype == getattr(torch, dtype) and typed.shape == w.shape
            assert typed.data_ptr() == got.data_ptr()
        assert client.commit_retrieve(rkey, w.instance_id) is True
        client.end_session(key.request_id)
    finally:
        w.close()


def test_prepare_store_skips_cached_chunks(client: LMCacheClient):
    w = register(client, model=model_name("skip"), dtype="float16")
    try:
        chunk = client.get_chunk_size()
        tokens = tokens_for(3, chunk, seed=2)
        w.store(tokens[: 2 * chunk], 2)
        key = w.key(tokens, 3 * chunk, "store-more")
        reply = client.prepare_store(key, w.instance_id)
        assert reply.context.chunk_indices == [2]  # the first two are already cached
        w.pool.slot_view(reply.context.slots[0], w.shape, w.dtype).fill_(7)
        assert client.commit_store(key, w.instance_id) is True
        assert lookup(client, w, tokens, 3 * chunk)[0] == 3
    finally:
        w.close()


def test_prepare_retrieve_without_lookup_fails_softly(client: LMCacheClient):
    w = register(client, model=model_name("nolock"), dtype="float16")
    try:
        chunk = client.get_chunk_size()
        tokens = tokens_for(1, chunk, seed=3)
        w.store(tokens, 1)
        # RETRIEVE only sees chunks a LOOKUP read-locked: an answer, but success=False.
        reply = client.prepare_retrieve(w.key(tokens, chunk, "never-looked-up"), w.instance_id)
        assert reply.success is False
    finally:
        w.close()


# ---------------------------------------------------------------------------- pickle fallback


@pytest.fixture(scope="module")
def pickle_server(lmcache_server_factory):
    """A server without ``--shm-name`` (engine-driven transfers use the pickle fallback),
    and with a non-default chunk size, which the client must pick up from the server."""
    return lmcache_server_factory(shm=False, chunk_size=64)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_pickle_fallback_round_trip(pickle_server, dtype: str):
    with LMCacheClient(pickle_server.url, control_timeout=10.0) as client:
        w = register(client, model=model_name("pkl"), dtype=dtype, expect_shm=False)
        try:
            chunk = client.get_chunk_size()
            assert chunk == 64 and w.shape == (2, 4, 64, 64)
            tokens = tokens_for(2, chunk, seed=4)
            tdtype = getattr(torch, dtype)
            chunks = [torch.randn(w.shape).to(tdtype) for _ in range(2)]
            key = w.key(tokens, 2 * chunk, "store-pkl")
            reply = client.prepare_store(key, w.instance_id)
            assert reply.context.slots == []  # no SHM: the data travels in COMMIT_STORE
            # One typed chunk and one flat uint8 slot image (what the gather kernel writes).
            payload = encode_chunks([chunks[0], chunks[1].view(-1).view(torch.uint8)],
                                    w.shape, dtype)
            assert client.commit_store(key, w.instance_id, payload) is True

            hits, lkey = lookup(client, w, tokens, 2 * chunk, release=False)
            assert hits == 2
            rkey = w.key(tokens, 2 * chunk, lkey.request_id)
            got = client.prepare_retrieve(rkey, w.instance_id)
            assert got.success is True and got.context.slots == []
            out = decode_chunks(got.data, 2, w.shape, dtype)
            for a, b in zip(chunks, out, strict=True):
                assert b.dtype == torch.uint8 and torch.equal(a.view(-1).view(torch.uint8), b)
            assert client.commit_retrieve(rkey, w.instance_id) is True
            client.end_session(lkey.request_id)
        finally:
            w.close()


# ---------------------------------------------------------------------------- cache identity


def test_cache_salt_isolates(client: LMCacheClient):
    w = register(client, model=model_name("salt"), dtype="float16")
    try:
        chunk = client.get_chunk_size()
        tokens = tokens_for(2, chunk, seed=5)
        w.store(tokens, 2, salt="tenant-a")
        assert lookup(client, w, tokens, 2 * chunk, salt="tenant-a")[0] == 2
        assert lookup(client, w, tokens, 2 * chunk, salt="tenant-b")[0] == 0
        assert lookup(client, w, tokens, 2 * chunk, salt="")[0] == 0
    finally:
        w.close()


def test_two_kv_ranks_hit_only_when_both_stored(client: LMCacheClient):
    model = model_name("tp2")
    ranks = [register(client, model=model, dtype="bfloat16", world_size=2, rank=r)
             for r in (0, 1)]
    try:
        chunk = client.get_chunk_size()
        tokens = tokens_for(2, chunk, seed=6)
        ranks[0].store(tokens, 2)
        assert lookup(client, ranks[0], tokens, 2 * chunk)[0] == 0
        ranks[1].store(tokens[:chunk], 1)
        assert lookup(client, ranks[0], tokens, 2 * chunk)[0] == 1
        ranks[1].store(tokens, 2, expect_new=[1])  # chunk 0 of rank 1 is cached already
        assert lookup(client, ranks[0], tokens, 2 * chunk)[0] == 2
    finally:
        for w in ranks:
            w.close()


def test_lookup_prefix_semantics(client: LMCacheClient):
    w = register(client, model=model_name("prefix"), dtype="float16")
    try:
        chunk = client.get_chunk_size()
        tokens = tokens_for(3, chunk, seed=7)
        w.store(tokens, 3)
        assert lookup(client, w, tokens, 3 * chunk)[0] == 3
        for k in range(3):
            changed = list(tokens)
            changed[k * chunk + 5] = (changed[k * chunk + 5] + 1) % 50_000
            assert lookup(client, w, changed, 3 * chunk)[0] == k
        # A partial trailing chunk never counts; the lookup end is clamped to the tokens.
        assert lookup(client, w, tokens[: 2 * chunk + 10], 3 * chunk)[0] == 2
    finally:
        w.close()


# ---------------------------------------------------------------------------- failures


def test_no_server_fails_typed_within_timeout():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        url = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    with LMCacheClient(url, control_timeout=1.0) as client:
        t0 = time.monotonic()
        with pytest.raises(KVConnUnavailable) as info:
            client.ping()
        assert time.monotonic() - t0 < 1.0 + 2.0
        assert url in str(info.value)
        with pytest.raises(KVConnUnavailable):
            client.get_chunk_size(timeout=0.3)
        assert not client.transport._pending


def test_restarted_server_answers_again(lmcache_server_factory):
    server = lmcache_server_factory()
    with LMCacheClient(server.url, control_timeout=2.0) as client:
        assert client.ping() is True
        server.kill()
        with pytest.raises(KVConnUnavailable):
            client.ping(timeout=1.0)
        server.restart()
        assert client.ping(timeout=10.0) is True
    server.kill()


# ---------------------------------------------------------------------------- concurrency


def test_concurrent_calls_on_one_client(lmcache_server):
    n_threads, n_calls = 8, 200
    client = LMCacheClient(lmcache_server.url, control_timeout=30.0)
    chunk = client.get_chunk_size()
    results: list[list[object]] = [[] for _ in range(n_threads)]
    errors: list[BaseException] = []
    start = threading.Barrier(n_threads)

    def work(i: int) -> None:
        try:
            start.wait(timeout=10)
            for j in range(n_calls):
                if j % 2:
                    results[i].append(client.ping(None))
                else:
                    results[i].append(client.get_chunk_size())
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,), name=f"test-caller-{i}")
               for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors[:3]
    assert all(not t.is_alive() for t in threads)
    for r in results:
        assert r == [chunk if j % 2 == 0 else True for j in range(n_calls)]
    transport = client.transport
    assert not transport._pending and not transport._outbox
    client.close()
    assert not transport._thread.is_alive()
