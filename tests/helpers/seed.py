"""Put chunks on a real LMCache server the way an engine-driven worker stores them, so that
scheduler-side tests and benchmarks get hits without running workers."""

from __future__ import annotations

import json
import urllib.request

import pytest

from kvconn_plugin.client.api import LMCacheClient, new_instance_id
from kvconn_plugin.client.protocol import CacheKey, RegisterEngineDrivenPayload
from kvconn_plugin.client.shm_pool import ShmPool

CHUNK = 256  # the server's default chunk size


def seed_server(url: str, model: str, tokens: list[int], salt: str = "") -> int:
    """Store the whole chunks of ``tokens`` under ``model`` (world size 1, filler bytes).

    Returns the instance id the chunks were stored by.
    """
    with LMCacheClient(url) as c:
        iid = new_instance_id()
        reply = c.register_engine_driven(RegisterEngineDrivenPayload(
            instance_id=iid, model_name=model, world_size=1, block_size=16, num_layers=2,
            hidden_dim_size=128, dtype_str="bfloat16", use_mla=False, num_physical_slots=CHUNK))
        end = len(tokens) // CHUNK * CHUNK
        key = CacheKey(model_name=model, world_size=1, worker_id=0, token_ids=tokens, start=0,
                       end=end, request_id=f"seed-{iid}", cache_salt=salt)
        ctx = c.prepare_store(key, iid).context
        if not ctx.slots:  # already cached: nothing lent, no commit expected
            c.end_session(f"seed-{iid}")
            return iid
        with ShmPool(reply.shm_name, reply.pool_size) as pool:
            for slot in ctx.slots:
                pool.slot_view(slot, (2, 2, CHUNK, 128), "bfloat16").fill_(7)
            if not c.commit_store(key, iid, b""):
                raise RuntimeError("the server refused the seeding commit")
        c.end_session(f"seed-{iid}")
    return iid


def server_lock_counts(server) -> tuple[int, int]:
    """(read_locked, write_locked) objects from the server's HTTP /status."""
    with urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/status", timeout=10) as r:
        status = json.loads(r.read())
    found: dict[str, int] = {}

    def walk(node):
        if isinstance(node, dict):
            for k, v in node.items():
                if k in ("read_locked_count", "write_locked_count") and isinstance(v, int):
                    found[k] = found.get(k, 0) + v
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(status)
    if not found:
        pytest.skip("server /status has no lock counts")
    return found.get("read_locked_count", 0), found.get("write_locked_count", 0)
