"""Preemption while stores are in flight, on the real vLLM CPU engine (float32).

The store pipeline claims that preemption needs no flush (``handle_preemptions`` does
nothing): a store copies its blocks out of vLLM's cache inside ``wait_for_save`` of the step
that planned it, and a PREPARE_STORE reply that is not back by then is covered by a staging
copy taken at that same moment. This module tries to break that claim. A KV cache of
``BLOCKS`` blocks is far too small for the concurrent requests (long prompts sharing two
prefixes, enough tokens to grow by decode), so vLLM preempts and reuses blocks all the time,
while the fault proxy holds every PREPARE_STORE reply of the real LMCache server for a
seeded random 50-400 ms, so stores are in flight (staged) when blocks are preempted.

Checks, per phase: every request finishes within ``BOUND_S`` with the no-connector
baseline's greedy tokens (the same geometry, one request at a time), vLLM did preempt, and
the server's read and write locks return to 0. Then a second pass, with vLLM's own prefix
cache reset, continues each first-pass sequence: its prompts hit the chunks stored under
preemption, including chunks holding generated tokens, and must still give the baseline's
tokens. A store that copied blocks after vLLM had reused them would have put another
request's KV under this request's keys, and the second pass would load it.

One engine child (``tests/helpers/chaos_child.py``: a connector engine and a baseline
engine) serves all phases.
"""

from __future__ import annotations

import json
import random
import time
from typing import Any

import pytest

from tests.helpers.chaos import ChaosConfig, ChaosRig
from tests.helpers.chaos_plan import EpisodePlan
from tests.helpers.fault_proxy import Fault

pytestmark = [pytest.mark.engine, pytest.mark.lmcache_server]

CHUNK = 256          # the server's chunk size: 2 vLLM CPU blocks of 128 tokens
BLOCKS = 16          # the whole KV cache (one is vLLM's null block): 1920 usable tokens,
                     # against ~8 x 900 wanted at once
MAX_MODEL_LEN = 1024  # the longest sequence here is 954 tokens
# tiny "small" Llama in float32: 128 tokens x (K, V) x 2 layers x 2 KV heads x 64 x 4 bytes
BLOCK_BYTES = 128 * 2 * 2 * 2 * 64 * 4
REQUESTS = 8         # per first-pass phase, all submitted at once
MAX_TOKENS = 192     # first pass: decode grows each request by one or two blocks
CONT_TOKENS = 8      # second pass: tokens generated after the first pass's sequence
BOUND_S = 60.0       # every request finishes within this
DELAY_S = (0.05, 0.4)  # each PREPARE_STORE reply held this long (seeded uniform draw)
DELAY_TRIES = 3      # delayed first passes, until a preemption fell while a reply was held


def _tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(10, 500) for _ in range(n)]


def _prompts(seed: int) -> list[list[int]]:
    """Two 2-chunk prefixes, each shared by half the prompts, plus a tail of its own long
    enough (652-762 tokens in all) that by the end of the first pass the third chunk of
    every sequence holds generated tokens."""
    rng = random.Random(seed)
    prefixes = [_tokens(rng, 2 * CHUNK) for _ in range(2)]
    return [prefixes[i % 2] + _tokens(rng, rng.randint(140, 250)) for i in range(REQUESTS)]


def _plan(seed: int, tag: str, prompts: list[list[int]], max_tokens: int) -> EpisodePlan:
    return EpisodePlan(seed=seed, warm=[], faults=[], requests=[
        {"id": f"{tag}{i}", "prompt": p, "max_tokens": max_tokens, "delay_s": 0.0}
        for i, p in enumerate(prompts)])


@pytest.fixture(scope="module")
def rig(lmcache_server_factory, tmp_path_factory):
    cfg = ChaosConfig(bound_s=BOUND_S, max_tokens=MAX_TOKENS, max_num_seqs=REQUESTS,
                      kv_cache_bytes=BLOCKS * BLOCK_BYTES, lock_wait_s=20.0,
                      # The proxy holds replies back; a 1 s PING deadline then drops the
                      # server on a loaded machine, which is not what this test is about.
                      heartbeat_s=3.0,
                      extra_engine_args={"num_gpu_blocks_override": BLOCKS,
                                         "max_model_len": MAX_MODEL_LEN})
    r = ChaosRig(lambda: lmcache_server_factory(), tmp_path_factory.mktemp("preempt"), cfg)
    r.orphaned_chunks = 0  # reservations LMCache cannot cancel, summed over the phases
    yield r
    r.close()


def _baseline(rig: ChaosRig, prompts: list[list[int]], max_tokens: int) -> None:
    """Greedy tokens of each prompt alone on the no-connector engine, into rig.baseline."""
    outs = rig.engine.request({"cmd": "baseline", "prompts": prompts,
                               "max_tokens": max_tokens}, 60 + 10 * len(prompts))["tokens"]
    rig.baseline.update({tuple(p): o for p, o in zip(prompts, outs, strict=True)})


def _run_phase(rig: ChaosRig, name: str, plan: EpisodePlan,
               faults: list[Fault] | None = None) -> dict[str, Any]:
    """Run ``plan``'s requests at once through the connector engine (``faults`` armed on
    the proxy meanwhile), then heal and wait for the server's locks."""
    engine = rig.engine
    offset = engine.log_offset()
    rig.proxy.arm(faults or [], seed=plan.seed)
    t0 = time.monotonic()
    out = engine.request({"cmd": "episode", "requests": plan.requests, "bound_s": BOUND_S,
                          "canary": False}, BOUND_S + 90)
    rec: dict[str, Any] = {"phase": name, "failures": [], "episode_s": time.monotonic() - t0,
                           "armed_at": rig.proxy.armed_at}
    rec["fault_log"] = rig.proxy.heal()
    rig.check_requests(plan, out, rec)
    rec["connector"] = out.get("connector_stats", {})
    rec["preemption_times"] = out.get("preemption_times", [])
    rec["tokens"] = {r["id"]: r["tokens"] for r in out["requests"]}
    rec["cached"] = {r["id"]: r.get("cached") for r in out["requests"]}
    rig.orphaned_chunks += rec["connector"].get("store_orphaned_chunks", 0)
    rec["orphaned_chunks"] = rig.orphaned_chunks
    rec["locks"], rec["lock_wait_s"] = rig.wait_locks_free(lambda: (0, rig.orphaned_chunks))
    rec["connector_log"] = [ln[-300:] for ln in engine.log_since(offset).splitlines()
                            if "kvconn" in ln or "Traceback" in ln][-40:]
    return rec


def _preemptions_with_stores_in_flight(rec: dict[str, Any]) -> int:
    """Preempting steps seen while the proxy held some PREPARE_STORE reply back (both clocks
    are ``time.monotonic`` of this host; the step is seen a few ms after it preempted)."""
    t0, start, windows = rec["armed_at"], {}, []
    for e in rec["fault_log"]:
        key = (e.get("conn"), repr(e.get("uid")))
        if e["kind"] == "delayed" and e.get("op") == "PREPARE_STORE":
            start[key] = t0 + e["t"]
        elif e["kind"] == "released" and key in start:
            windows.append((start.pop(key), t0 + e["t"]))
    return sum(any(a <= t <= b for a, b in windows) for t in rec["preemption_times"])


def _why_locks(rec: dict[str, Any]) -> str:
    return (f"{rec['phase']}: server (read, write) locks {rec['locks']} "
            f"{rec['lock_wait_s']:.0f}s after the phase; connector counters "
            f"{rec['connector']}; connector log:\n" + "\n".join(rec["connector_log"]))


def _summary(rec: dict[str, Any]) -> dict[str, Any]:
    keys = ("phase", "episode_s", "preemptions", "max_latency_s", "locks", "lock_wait_s",
            "connector", "failures")
    return {k: rec.get(k) for k in keys}


@pytest.fixture(scope="module")
def runs(rig) -> dict[str, Any]:
    """Every phase, in order, on one engine: baselines, the first pass without and with
    delayed PREPARE_STORE replies, a vLLM prefix-cache reset, the second pass.

    Whether a preemption falls while a reply is held is up to timing: the delayed pass is
    run again with new prompts (at most ``DELAY_TRIES`` times in all) until one did, and
    every run must pass every check."""
    t0 = time.monotonic()
    plain = _prompts(8100)
    _baseline(rig, plain, MAX_TOKENS)
    out: dict[str, Any] = {"plain": _run_phase(rig, "plain", _plan(8100, "p", plain,
                                                                    MAX_TOKENS))}
    delay = Fault("delay_reply", at_msg=0, op="PREPARE_STORE", count=1 << 30,
                  duration_s=DELAY_S[0], duration_max_s=DELAY_S[1])
    out["delayed_runs"] = []
    for seed in range(8200, 8200 + DELAY_TRIES):
        delayed = _prompts(seed)
        _baseline(rig, delayed, MAX_TOKENS)
        rec = _run_phase(rig, "delayed", _plan(seed, f"d{seed}x", delayed, MAX_TOKENS),
                         [delay])
        rec["in_flight_preemptions"] = _preemptions_with_stores_in_flight(rec)
        out["delayed_runs"].append(rec)
        if rec["in_flight_preemptions"]:
            break
    out["delayed"] = out["delayed_runs"][-1]
    # Second pass: each first-pass sequence minus its last CONT_TOKENS tokens, continued.
    keep = MAX_TOKENS - CONT_TOKENS
    first = plain + delayed
    cont = [p + rig.baseline[tuple(p)]["tokens"][:keep] for p in first]
    _baseline(rig, cont, CONT_TOKENS)
    rig.engine.request({"cmd": "reset_prefix_cache"}, 30)  # hits now come from LMCache only
    second = _plan(8300, "s", cont, CONT_TOKENS)
    out["second"] = _run_phase(rig, "second", second)
    out["first_prompt_len"] = {r["id"]: len(p) for r, p in
                               zip(second.requests, first, strict=True)}
    out["total_s"] = round(time.monotonic() - t0, 1)
    print("\npreemption e2e:", json.dumps(
        {"plain": _summary(out["plain"]),
         "delayed": [{**_summary(r), "in_flight_preemptions": r["in_flight_preemptions"]}
                     for r in out["delayed_runs"]],
         "second": _summary(out["second"]), "total_s": out["total_s"]}, default=str))
    return out


def _phase_runs(runs: dict[str, Any], phase: str) -> list[dict[str, Any]]:
    return runs["delayed_runs"] if phase == "delayed" else [runs[phase]]


@pytest.mark.parametrize("phase", ["plain", "delayed"])
def test_preempted_requests_keep_the_baseline_tokens(runs, phase):
    for rec in _phase_runs(runs, phase):
        assert not rec["failures"], json.dumps(_summary(rec), indent=1, default=str)
        assert rec["max_latency_s"] <= BOUND_S
        assert rec["preemptions"] > 0, "no preemption: the test did not exercise its case"
        assert rec["connector"].get("stored_chunks", 0) > 0, rec["connector"]


def test_stores_were_in_flight_when_requests_were_preempted(runs):
    rec = runs["delayed"]
    delayed = [e for e in rec["fault_log"] if e["kind"] == "delayed"]
    assert delayed, "no PREPARE_STORE reply was held"
    # wait_for_save found the slots not lent yet: the blocks went to staging memory.
    assert rec["connector"].get("stores_staged", 0) > 0, rec["connector"]
    assert rec["in_flight_preemptions"] > 0, (
        f"{[r['preemptions'] for r in runs['delayed_runs']]} preemptions in "
        f"{DELAY_TRIES} runs, none while a PREPARE_STORE reply was held")


def test_second_pass_hits_what_was_stored_under_preemption(runs):
    rec = runs["second"]
    assert not rec["failures"], json.dumps(_summary(rec), indent=1, default=str)
    assert rec["max_latency_s"] <= BOUND_S
    assert rec["connector"].get("hit_tokens", 0) > 0, rec["connector"]
    # vLLM's prefix cache was reset and each sequence's third chunk is its own, so a
    # request that found more tokens than its first-pass prompt loaded a chunk holding
    # tokens generated (and stored) under preemption in the first pass.
    beyond = [rid for rid, n in runs["first_prompt_len"].items()
              if (rec["cached"].get(rid) or 0) > n]
    assert beyond, f"no hit beyond a first-pass prompt: cached {rec['cached']}"


@pytest.mark.parametrize("phase", ["plain", "delayed", "second"])
def test_server_locks_return_to_zero(runs, phase):
    """No read lock is left; write locks only where the connector gave up on a PREPARE_STORE
    (it counts those chunks: LMCache cannot cancel their reservation before its 600 s TTL)."""
    for rec in _phase_runs(runs, phase):
        read, write = rec["locks"]
        assert read == 0 and write <= 2 * rec["orphaned_chunks"], _why_locks(rec)
