"""OffloadEvents on its own: vLLM Requests hashed as the engine hashes them, store
reports ``(request_id, start, end, committed chunk indices)`` and server eviction records
fed by hand (no stream thread)."""

from __future__ import annotations

import time

from vllm.distributed.kv_events import BlockRemoved, BlockStored
from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash

from kvconn_plugin.client.chunk_hash import chunk_hashes
from kvconn_plugin.client.event_stream import KVEventRecord
from kvconn_plugin.metadata import TransferSpec
from kvconn_plugin.scheduler.events import OffloadEvents
from kvconn_plugin.store_acks import StoreAckBatch
from tests.helpers.sched_harness import make_request

BS = 16
CHUNK = 64


def _h(req, a: int, b: int) -> list:
    """vLLM's external form of block hashes [a, b), as its GPU events publish them."""
    return [maybe_convert_block_hash(h) for h in req.block_hashes[a:b]]


def _spec(req, start: int, end: int) -> TransferSpec:
    return TransferSpec(request_id=req.request_id, token_ids=tuple(req.all_token_ids[:end]),
                        start=start, end=end, block_ids=tuple(range((end - start) // BS)))


def _removed(hashes: list[bytes]) -> KVEventRecord:
    return KVEventRecord(seq=1, kind="removed", medium="CPU", model_name="m",
                         block_hashes=hashes)


def _setup(writers: int = 1, salt: str | None = None):
    ev = OffloadEvents(block_size=BS, writers=writers)
    req = make_request("r1", list(range(100, 300)), salt, block_size=BS)
    ev.watch(req)
    return ev, req


def test_announced_after_every_writer_confirmed_with_vllm_block_hashes():
    ev, req = _setup(writers=2)
    spec = _spec(req, 0, 128)
    ev.on_stores_planned([spec], CHUNK)
    assert ev.take() == []  # planned, not confirmed
    ev.on_worker_events(StoreAckBatch([("r1", 0, 128, (0, 1))]))
    assert ev.take() == []  # one of two writers
    ev.on_worker_events(StoreAckBatch([("r1", 0, 128, (0, 1)), ("other", 0, 64, (0,)),
                                       ("bogus",), ("r1", 0, 128)]))
    events = ev.take()
    assert [type(e) for e in events] == [BlockStored, BlockStored]
    first, second = events
    # The hashes of vLLM's own GPU events for these blocks, parent-linked, medium CPU.
    assert first.block_hashes == _h(req, 0, 4)
    assert first.parent_block_hash is None
    assert second.block_hashes == _h(req, 4, 8)
    assert second.parent_block_hash == _h(req, 3, 4)[0]
    assert first.token_ids == list(range(100, 164))
    assert first.block_size == BS and first.medium == "CPU" and first.group_idx == 0
    assert ev.announced_chunks == 2
    # Confirmed again (a later duplicate): nothing new.
    ev.on_stores_planned([spec], CHUNK)
    ev.on_worker_events(StoreAckBatch([("r1", 0, 128, (0, 1))] * 2))
    assert ev.take() == []


def test_cache_salt_goes_into_extra_keys_like_gpu_events():
    ev, req = _setup(salt="tenant")
    ev.on_stores_planned([_spec(req, 0, 64)], CHUNK)
    ev.on_worker_events(StoreAckBatch([("r1", 0, 64, (0,))]))
    (stored,) = ev.take()
    assert stored.extra_keys == [("tenant",), None, None, None]


def test_server_eviction_withdraws_the_vllm_hashes():
    ev, req = _setup()
    ev.on_stores_planned([_spec(req, 0, 128)], CHUNK)
    ev.on_worker_events(StoreAckBatch([("r1", 0, 128, (0, 1))]))
    ev.take()
    server = chunk_hashes(req.all_token_ids[:128], CHUNK, [])
    ev.on_records([_removed([server[1], b"not-ours"])], time.monotonic())
    (removed,) = ev.take()
    assert isinstance(removed, BlockRemoved)
    assert removed.block_hashes == _h(req, 4, 8) and removed.medium == "CPU"
    assert ev.announced_chunks == 1
    ev.on_records([_removed([server[1]])], time.monotonic())
    assert ev.take() == []  # withdrawn once only


def test_eviction_before_confirmation_vetoes_the_announcement():
    ev, req = _setup()
    ev.on_stores_planned([_spec(req, 0, 128)], CHUNK)
    server = chunk_hashes(req.all_token_ids[:128], CHUNK, [])
    ev.on_records([_removed([server[0]])], time.monotonic())
    ev.on_worker_events(StoreAckBatch([("r1", 0, 128, (0, 1))]))
    events = ev.take()
    assert [e.block_hashes for e in events] == [_h(req, 4, 8)]


def test_resync_and_reset_withdraw_everything():
    ev, req = _setup()
    ev.on_stores_planned([_spec(req, 0, 128)], CHUNK)
    ev.on_worker_events(StoreAckBatch([("r1", 0, 128, (0, 1))]))
    ev.take()
    ev.on_resync("LMCache server restarted")
    (removed,) = ev.take()
    assert removed.block_hashes == _h(req, 0, 8)
    assert ev.announced_chunks == 0
    # Reset without a live stream: withdraw what was announced, drop what was pending.
    ev.on_stores_planned([_spec(req, 128, 192)], CHUNK)
    ev.on_stores_planned([_spec(req, 0, 64)], CHUNK)
    ev.on_worker_events(StoreAckBatch([("r1", 0, 64, (0,))]))
    ev.take()
    ev.on_reset(cleared=True)
    ev.on_worker_events(StoreAckBatch([("r1", 128, 192, (0,))]))
    events = ev.take()
    assert [type(e) for e in events] == [BlockRemoved]
    ev.on_reset(cleared=False)
    assert ev.take() == []


def test_unknown_requests_and_short_hashes_emit_nothing():
    ev, req = _setup()
    ev.forget("r1")
    ev.on_stores_planned([_spec(req, 0, 64)], CHUNK)
    ev.on_worker_events(StoreAckBatch([("r1", 0, 64, (0,))]))
    assert ev.take() == []
    ev.watch(req)
    ev.on_stores_planned([_spec(req, 0, 64)], None)  # no server chunk size known
    ev.on_worker_events(StoreAckBatch([("r1", 0, 64, (0,))]))
    ev.on_worker_events(object())  # someone else's event container
    assert ev.take() == []


def test_lmcache_hash_mode_emits_what_lmcaches_connector_emits():
    ev = OffloadEvents(block_size=BS, writers=1, hashes="lmcache")
    req = make_request("r1", list(range(100, 300)), block_size=BS)
    ev.watch(req)
    ev.on_stores_planned([_spec(req, 0, 128)], CHUNK)
    ev.on_worker_events(StoreAckBatch([("r1", 0, 128, (0, 1))]))
    first, second = ev.take()
    server = chunk_hashes(req.all_token_ids[:128], CHUNK, [])
    conv = [maybe_convert_block_hash(h) for h in server]
    # One hash per chunk (the server's), block_size = chunk size, chained by parent.
    assert first.block_hashes == [conv[0]] and first.parent_block_hash is None
    assert second.block_hashes == [conv[1]] and second.parent_block_hash == conv[0]
    assert first.block_size == CHUNK and first.medium == "CPU"
    ev.on_records([_removed([server[0]])], time.monotonic())
    (removed,) = ev.take()
    assert removed.block_hashes == [conv[0]]


def test_only_chunks_every_writer_committed_are_announced():
    ev, req = _setup(writers=2)
    ev.on_stores_planned([_spec(req, 0, 192)], CHUNK)
    # Writer 1 committed chunks 0 and 2; writer 2 only chunk 0 (the server had chunk 2, or
    # had no room for it): only chunk 0 is known to be whole on the server.
    ev.on_worker_events(StoreAckBatch([("r1", 0, 192, (0, 2)), ("r1", 0, 192, [0, 0, 7])]))
    (stored,) = ev.take()
    assert stored.block_hashes == _h(req, 0, 4)
    # A store every writer reported dropped (nothing committed) announces nothing and is
    # no longer pending.
    ev.on_stores_planned([_spec(req, 64, 128)], CHUNK)
    ev.on_worker_events(StoreAckBatch([("r1", 64, 128, ()), ("r1", 64, 128, ())]))
    assert ev.take() == []
    ev.on_worker_events(StoreAckBatch([("r1", 64, 128, (0,)), ("r1", 64, 128, (0,))]))
    assert ev.take() == []  # a report for a store no longer pending
    assert ev.announced_chunks == 1
