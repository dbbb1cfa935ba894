"""Store reports for KV events, from a real worker's store pipeline to a real LMCache server.

A worker reports each store once, when it settles, with the chunks whose COMMIT_STORE the
server confirmed: all of them for new chunks, none for chunks the server already had or a
store that was dropped. ``OffloadEvents`` then announces only what every writer committed.
"""

from __future__ import annotations

import pytest
import torch

from kvconn_plugin.config import parse_config
from kvconn_plugin.metadata import KVConnMetadata, TransferSpec
from kvconn_plugin.parallel import kv_ranks
from kvconn_plugin.scheduler.events import OffloadEvents
from kvconn_plugin.store_acks import StoreAckRecorder
from kvconn_plugin.worker.adapter import WorkerAdapter
from tests.helpers.connector_config import server_extra_config
from tests.helpers.sched_harness import make_request

pytestmark = pytest.mark.lmcache_server

CHUNK, BLOCK, LAYERS, HEADS, HEAD, NUM_BLOCKS = 256, 16, 2, 2, 64, 64
MODEL = "kvconn-test/store-acks"


def _worker(server) -> WorkerAdapter:
    adapter = WorkerAdapter(
        parse_config(server_extra_config(server.url)), model_name=MODEL,
        ranks=kv_ranks(mla=False, world_size=1, rank=0, tp_size=1), block_size=BLOCK,
        head_size=HEAD)
    adapter.acks = StoreAckRecorder()  # what the connector does when KV events are on
    g = torch.Generator().manual_seed(3)
    kv = {f"layer{i}": torch.randn(NUM_BLOCKS, HEADS, BLOCK, 2 * HEAD,
                                   generator=g).to(torch.bfloat16) for i in range(LAYERS)}
    adapter.register_kv_caches(kv)
    assert adapter.session is not None and adapter.session.healthy
    return adapter


def _store(adapter: WorkerAdapter, spec: TransferSpec) -> None:
    meta = KVConnMetadata(stores=[spec])
    adapter.start_transfers(meta)
    adapter.wait_for_save(meta)
    assert adapter.wait_stores_idle(30)


def test_reports_carry_only_the_chunks_the_server_committed(lmcache_server_factory):
    server = lmcache_server_factory()
    adapter = _worker(server)
    try:
        req = make_request("new", [11 + i % 400 for i in range(2 * CHUNK + 10)],
                           block_size=BLOCK)
        toks = tuple(req.all_token_ids[:2 * CHUNK])
        blocks = tuple(range(2 * CHUNK // BLOCK))

        def spec(rid: str, end: int = 2 * CHUNK) -> TransferSpec:
            return TransferSpec(request_id=rid, token_ids=toks, start=0, end=end,
                                block_ids=blocks[:end // BLOCK])

        _store(adapter, spec("new"))
        _store(adapter, spec("again"))  # the server has both chunks: nothing committed
        _store(adapter, spec("bad", end=CHUNK + BLOCK))  # not whole chunks: dropped at once
        batch = adapter.acks.take()
        assert batch is not None
        assert sorted(batch.get_all_events()) == [
            ("again", 0, 2 * CHUNK, ()), ("bad", 0, CHUNK + BLOCK, ()),
            ("new", 0, 2 * CHUNK, (0, 1))]
        assert adapter.acks.take() is None  # each report once

        # The scheduler side announces what was committed, and nothing for the repeat.
        ev = OffloadEvents(block_size=BLOCK, writers=1)
        again = make_request("again", list(req.all_token_ids), block_size=BLOCK)
        for r in (req, again):
            ev.watch(r)
        ev.on_stores_planned([spec("new"), spec("again")], CHUNK)
        ev.on_worker_events(batch)
        stored = ev.take()
        assert len(stored) == 2 and ev.announced_chunks == 2
        assert stored[0].token_ids == list(toks[:CHUNK])
    finally:
        adapter.shutdown()
