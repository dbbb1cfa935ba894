"""Put chunks on a real LMCache server the way an engine-driven worker stores them, so that
scheduler-side tests and benchmarks get hits without running workers."""

from __future__ import annotations

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
