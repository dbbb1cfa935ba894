"""Smoke test for tests/helpers/sched_harness.py: vLLM's real Scheduler with a stub connector.

The stub lives in this module and is loaded through ``kv_connector_module_path`` (this
module's import name), so the test exercises only the harness and vLLM, not our connector.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # repo root: `tests.helpers`

from tests.helpers.sched_harness import (
    SchedHarness,
    assert_scheduler_empty,
    run_until_idle,
)

# isort: split
# vLLM after tests.helpers.sched_harness, which sets HF_HUB_OFFLINE before vLLM loads
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
)
from vllm.v1.request import RequestStatus

BS = 16


class StubMeta(KVConnectorMetadata):
    pass


class StubConnector(KVConnectorBase_V1):
    """Scheduler-side stub: claims ``hit`` external tokens for every new request (async if
    ``async`` is set), optionally holds blocks after finish, and records its calls."""

    def __init__(self, vllm_config, role, kv_cache_config=None):
        super().__init__(vllm_config, role, kv_cache_config)
        extra = vllm_config.kv_transfer_config.kv_connector_extra_config
        self.hit = int(extra.get("hit", 0))
        self.is_async = bool(extra.get("async", False))
        self.delay_free = bool(extra.get("delay_free", False))
        self.calls: list[tuple] = []
        self._answered: set[str] = set()

    def get_num_new_matched_tokens(self, request, num_computed_tokens):
        # Pure function of the request: the hit is offered until the request is admitted.
        n = 0 if request.request_id in self._answered else max(0, self.hit - num_computed_tokens)
        self.calls.append(("match", request.request_id, num_computed_tokens, n))
        return n, (self.is_async and n > 0)

    def update_state_after_alloc(self, request, blocks, num_external_tokens):
        if num_external_tokens:
            self._answered.add(request.request_id)
        self.calls.append(("alloc", request.request_id, num_external_tokens))

    def build_connector_meta(self, scheduler_output):
        self.calls.append(("meta", dict(scheduler_output.num_scheduled_tokens)))
        return StubMeta()

    def request_finished(self, request, block_ids):
        self.calls.append(("finished", request.request_id, list(block_ids)))
        return self.delay_free, None

    def update_connector_output(self, connector_output):
        self.calls.append(("output", connector_output.finished_recving))

    # Worker-side hooks are never called in a scheduler-only harness.
    def start_load_kv(self, forward_context, **kwargs):
        raise AssertionError("worker hook called")

    def wait_for_layer_load(self, layer_name):
        raise AssertionError("worker hook called")

    def save_kv_layer(self, layer_name, kv_layer, attn_metadata, **kwargs):
        raise AssertionError("worker hook called")

    def wait_for_save(self):
        raise AssertionError("worker hook called")


def harness(async_scheduler=False, **extra) -> SchedHarness:
    return SchedHarness.create(
        connector="StubConnector",
        module_path=__name__,
        extra_config=extra,
        block_size=BS,
        async_scheduler=async_scheduler,
        kv_load_failure_policy="recompute",
    )


def calls(h, kind):
    return [c for c in h.connector.calls if c[0] == kind]


@pytest.mark.parametrize("async_scheduler", [False, True], ids=["sync_sched", "async_sched"])
def test_plain_request_runs_to_completion(async_scheduler):
    h = harness(async_scheduler=async_scheduler)
    assert isinstance(h.connector, StubConnector)
    # A non-SupportsHMA connector makes vLLM turn the hybrid allocator off.
    assert h.vllm_config.scheduler_config.disable_hybrid_kv_cache_manager
    h.add(h.request("r1", list(range(1000, 1040)), max_tokens=3))
    so, _ = h.step()
    assert so.num_scheduled_tokens == {"r1": 40}
    run_until_idle(h.scheduler)
    assert [c[1] for c in calls(h, "finished")] == ["r1"]
    assert len(calls(h, "meta")) >= 3  # built on every schedule(), empty steps included
    assert_scheduler_empty(h.scheduler)


def test_chunked_prefill_samples_only_on_last_chunk():
    h = harness()
    h.add(h.request("r1", list(range(100)), max_tokens=2))
    so, outs = h.step()
    assert so.num_scheduled_tokens == {"r1": 64}  # max_num_batched_tokens
    assert not any(o.new_token_ids for eo in outs.values() for o in eo.outputs)
    so, outs = h.step()
    assert so.num_scheduled_tokens == {"r1": 36}
    assert [o.new_token_ids for eo in outs.values() for o in eo.outputs] == [[100]]
    run_until_idle(h.scheduler)
    h.assert_empty()


def test_sync_external_hit_skips_loaded_tokens():
    h = harness(hit=32)
    h.add(h.request("r1", list(range(40)), max_tokens=2))
    so, _ = h.step()
    assert so.num_scheduled_tokens == {"r1": 8}
    assert so.has_sync_kv_loads
    assert ("alloc", "r1", 32) in h.connector.calls
    run_until_idle(h.scheduler)
    h.assert_empty()


def test_async_load_waits_for_finished_recving():
    h = harness(hit=32, **{"async": True})
    h.add(h.request("r1", list(range(40)), max_tokens=2))
    so, _ = h.step()
    assert so.num_scheduled_tokens == {}
    assert h.scheduler.requests["r1"].status == RequestStatus.WAITING_FOR_REMOTE_KVS
    so, _ = h.step()  # still loading: nothing to run
    assert so.num_scheduled_tokens == {}
    h.step(finished_recving={"r1"})  # the worker reports the load done
    so, _ = h.step()
    assert so.num_scheduled_tokens == {"r1": 8}
    run_until_idle(h.scheduler)
    h.assert_empty()


def test_delay_free_holds_blocks_until_finished_sending():
    h = harness(delay_free=True)
    h.add(h.request("r1", list(range(40)), max_tokens=1))
    h.step()  # prefill + the single token -> finished, blocks held by the connector
    assert "r1" in h.scheduler.requests
    so, _ = h.step()
    assert "r1" in so.finished_req_ids  # what the worker would be told
    h.step(finished_sending={"r1"})
    h.assert_empty()


def test_load_error_with_recompute_policy():
    h = harness(hit=32)
    h.add(h.request("r1", list(range(40)), max_tokens=2))
    so, _ = h.step()
    assert so.num_scheduled_tokens == {"r1": 8}
    block_ids = h.scheduler.kv_cache_manager.get_block_ids("r1")[0]
    h.step(invalid_block_ids=set(block_ids[:2]))  # both loaded blocks failed
    so, _ = h.step()
    assert so.num_scheduled_tokens["r1"] >= 32  # the lost prefix is recomputed
    run_until_idle(h.scheduler)
    h.assert_empty()
