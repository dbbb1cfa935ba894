"""An ``fs`` L2 tier on a directory keeps the cache across a server restart: our worker
adapter stores into a real LMCache server started with ``--l2-adapter '{"type": "fs", ...}'``,
the server is killed (``kill -9``) and started again with an empty L1, and a lookup and a
load then give back the very bytes stored, from the directory. (Redis L2 with real engines
is tests/e2e/test_l2_redis.py.)"""

from __future__ import annotations

import json
import time

import pytest

from tests.helpers.seed import server_lock_counts
from tests.integration.test_server_failures import (
    BLOCK,
    CHUNK,
    Worker,
    _lookup,
    _spec,
    _tokens,
)

pytestmark = pytest.mark.lmcache_server


def _files(path) -> int:
    """Objects the fs tier has finished writing: LMCache 0.5.6 writes ``<key>.tmp`` and
    renames it to ``<key>.data``; a ``.tmp`` left by ``kill -9`` is not an object."""
    return sum(1 for p in path.rglob("*.data") if p.is_file()) if path.exists() else 0


def test_an_fs_l2_tier_serves_our_objects_after_a_server_restart(lmcache_server_factory,
                                                                  tmp_path):
    l2 = tmp_path / "l2"
    l2.mkdir()
    server = lmcache_server_factory(extra_args=(
        "--l2-adapter", json.dumps({"type": "fs", "base_path": str(l2)})))
    toks, blocks = _tokens(2 * CHUNK, 31), range(2 * CHUNK // BLOCK)
    w = Worker(server)
    try:
        w.fill(blocks, seed=31)
        expected = w.blocks_bytes(blocks)
        w.store(_spec("fs-store", toks, blocks))
    finally:
        w.close()
    # Copies to L2 run in the background: wait for the two chunks' files.
    deadline = time.monotonic() + 30
    while _files(l2) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _files(l2) >= 2, f"no L2 objects under {l2}"
    server.kill_hard()
    server.start(new_ports=False)  # same address, empty L1, same L2 directory
    w = Worker(server)
    try:
        assert _lookup(server, "fs-load", toks) == 2  # from L2, into L1, read-locked
        dst = range(32, 32 + len(blocks))
        w.poison(dst)
        _, errors = w.load(_spec("fs-load", toks, dst))
        assert errors == set()
        w.assert_holds(dst, expected)
        deadline = time.monotonic() + 15
        while server_lock_counts(server) != (0, 0) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert server_lock_counts(server) == (0, 0)
    finally:
        w.close()
