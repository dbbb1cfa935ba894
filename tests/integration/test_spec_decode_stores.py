"""Store accounting under speculative decoding, on vLLM's real Scheduler and a real server.

With drafts, ``num_scheduled_tokens`` counts draft tokens that may be rejected, and the
workers' ``wait_for_save`` runs after the drafter (Model Runner V2 defers it past the draft
forward). Stores are planned from ``min(num_computed + scheduled, num_tokens)``: only tokens
the scheduler already accepted, whose KV the target forward of this step or an earlier one
wrote. Here drafts are accepted or rejected at random and every planned store is checked.
"""

from __future__ import annotations

import random

import pytest
from vllm.config import SpeculativeConfig, VllmConfig
from vllm.v1.outputs import DraftTokenIds, KVConnectorOutput, ModelRunnerOutput

from tests.helpers.connector_config import CONNECTOR, MODULE_PATH, server_extra_config
from tests.helpers.sched_harness import make_request, make_scheduler, make_vllm_config

pytestmark = pytest.mark.lmcache_server
CHUNK, K = 256, 3


def _config(url: str) -> VllmConfig:
    base = make_vllm_config(connector=CONNECTOR, module_path=MODULE_PATH,
                            extra_config=server_extra_config(url),
                            max_model_len=4096, max_num_batched_tokens=2048)
    spec = SpeculativeConfig(method="ngram", num_speculative_tokens=K, prompt_lookup_max=3,
                             prompt_lookup_min=2, target_model_config=base.model_config,
                             target_parallel_config=base.parallel_config)
    return VllmConfig(model_config=base.model_config, scheduler_config=base.scheduler_config,
                      cache_config=base.cache_config, kv_transfer_config=base.kv_transfer_config,
                      device_config=base.device_config, speculative_config=spec)


@pytest.mark.parametrize("seed", [1, 2])
def test_stores_cover_only_accepted_tokens_whatever_the_drafter_does(lmcache_server, seed):
    rng = random.Random(seed)
    sched = make_scheduler(_config(lmcache_server.url))
    conn = sched.get_kv_connector()
    try:
        prompt = [rng.randrange(10, 500) for _ in range(300)]
        sched.add_request(make_request("r", prompt, block_size=16, max_tokens=700,
                                       ignore_eos=True))
        stores, drafts_scheduled, rejected = [], 0, 0
        while sched.has_requests():
            so = sched.schedule()
            req = sched.requests.get("r")
            known = req.num_tokens if req is not None else 0  # tokens accepted so far
            # schedule() already advanced num_computed_tokens by what it scheduled.
            kv_written = req.num_computed_tokens if req is not None else 0
            for spec in so.kv_connector_metadata.stores:
                assert spec.end <= known, "stored a token the scheduler has not accepted"
                assert spec.end <= kv_written, "stored KV this step does not write"
                stores.append(spec)
            sampled = []
            if "r" in so.num_scheduled_tokens and req.num_computed_tokens >= req.num_prompt_tokens:
                drafts = list(so.scheduled_spec_decode_tokens.get("r", ()))
                drafts_scheduled += len(drafts)
                accepted = rng.randint(0, len(drafts))
                rejected += len(drafts) - accepted
                sampled = [[*drafts[:accepted], rng.randrange(10, 500)]]
            elif "r" in so.num_scheduled_tokens:
                sampled = [[]]
            rids = list(so.num_scheduled_tokens)
            sched.update_from_output(so, ModelRunnerOutput(
                req_ids=rids, req_id_to_index={r: i for i, r in enumerate(rids)},
                sampled_token_ids=sampled, kv_connector_output=KVConnectorOutput()))
            if "r" in sched.requests:  # the drafter's next proposal (random: mostly wrong)
                sched.update_draft_token_ids(DraftTokenIds(
                    ["r"], [[rng.randrange(10, 500) for _ in range(K)]]))
            if req is not None:
                final_tokens = list(req.all_token_ids)
        assert drafts_scheduled > 100 and rejected > 50, "the drafter path was not exercised"
        # Whole chunks, contiguous from 0, each with exactly the tokens the request ended with.
        assert [s.start for s in stores] == [i * CHUNK for i in range(len(stores))]
        assert all(s.end - s.start == CHUNK or s.end % CHUNK == 0 for s in stores)
        for s in stores:
            assert list(s.token_ids) == final_tokens[:s.end]
        assert stores[-1].end >= (len(final_tokens) - 1 - K) // CHUNK * CHUNK
    finally:
        conn.shutdown()
