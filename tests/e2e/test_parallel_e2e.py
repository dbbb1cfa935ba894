"""Past one worker on the real vLLM CPU engine: tensor parallelism (TP=2 on vLLM's ``mp``
executor), pipeline parallelism (PP=2, compiled: see ``PP2``) and an MLA model (tiny
DeepSeek-V2, block size 16).

Each test chains fresh engines on one LMCache server so that every hit can only come
from the server: engine #1 stores, a fresh engine #2 reads those objects and stores new
ones, and so on, alternating LMCache's own connector and ours where both run, so that one
server serves both implementations in both directions. Every output equals a run without
a connector in the same parallel layout (float32 greedy; vLLM's own prefix cache serves
the second generation of each prompt in both, so only the connector differs).
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from kvconn_plugin.tools.run_engine import run_engine
from kvconn_plugin.tools.tiny_mla import write_tiny_deepseek_v2
from kvconn_plugin.tools.tiny_model import PRESETS, write_tiny_llama
from tests.helpers.connector_config import kv_transfer_config

pytestmark = [pytest.mark.engine, pytest.mark.lmcache_server, pytest.mark.slow]

CHUNK = 256
PREFIX = 3 * CHUNK
ENGINE_TIMEOUT = 600
# vLLM CPU's automatic thread binding asserts on a machine without enough NUMA nodes; one
# core per rank by hand works everywhere with 2 cores or more.
TWO_RANKS_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}
TP2 = {"tensor_parallel_size": 2, "distributed_executor_backend": "mp"}
# LMCache's connector declares its server dead after one health ping unanswered for
# lmcache.mp.heartbeat_interval (10 s), and then serves misses. At TP=2 on this 2-core box
# its server went 17 s without answering while LMCache's own TP=2 engine ran (2026-12-06:
# its lookups had completed, the replies never came). Ours is unaffected in every run here;
# this keeps LMCache's connector from turning such a stall into misses in our test.
PATIENT_HEALTH = {"lmcache.mp.heartbeat_interval": 30}
# vLLM CPU 0.32 skips its warm-up forward when eager, and that forward is what allocates a
# later pipeline stage's buffer for the activations it receives: eager, the second stage
# asserts on its first step and the scheduler then dies (KeyError in update_from_output).
# With torch.compile the warm-up runs and PP=2 works; users must not pass --enforce-eager.
PP2 = {"pipeline_parallel_size": 2, "distributed_executor_backend": "mp", "enforce_eager": False}


def _prompts(seed: int) -> list[list[int]]:
    """4 prompts over 2 shared prefixes of 3 chunks each (the first of each prefix can only
    hit through the server on a fresh engine; the second hits vLLM's own cache too)."""
    rng = random.Random(seed)
    out = []
    for _ in range(2):
        prefix = [rng.randrange(10, 500) for _ in range(PREFIX)]
        out += [prefix + [rng.randrange(10, 500) for _ in range(rng.randrange(20, 120))]
                for _ in range(2)]
    return out


def _kvt(server, impl: str, **extra: object) -> dict:
    """Through our resolver, so ``kvconn.impl`` picks LMCache's connector or ours."""
    kvt = kv_transfer_config(server.url, **{"kvconn.impl": impl, **extra})
    del kvt["kv_connector_module_path"]
    return kvt


class Chain:
    """Fresh engines of one model and layout, one after the other, on one server."""

    def __init__(self, model: Path, server, log: Path, engine_args: dict, env: dict,
                 single_pass: bool = False, in_process: bool = False, **connector: object):
        self.model, self.server, self.log = model, server, log
        self.engine_args = {"dtype": "float32", **engine_args}
        self.env, self.single_pass, self.connector = env, single_pass, connector
        self.in_process = in_process

    def run(self, prompts, impl: str | None) -> list[dict]:
        kvt = None if impl is None else _kvt(self.server, impl, **self.connector)
        out = run_engine(self.model, prompts, kv_transfer_config=kvt, log_path=self.log,
                         timeout=ENGINE_TIMEOUT, engine_args=self.engine_args, env=self.env,
                         single_pass=self.single_pass,
                         # LMCache's connector cannot run in a one-process vLLM CPU engine
                         # (see test_mixed_impl_e2e): it keeps the usual processes.
                         in_process=self.in_process and impl != "lmcache")
        # For the record (-s): what a hit costs here, next to the no-connector run.
        print(f"{impl or 'none'}: engine start {out['engine_start_s']:.0f}s, TTFT ms "
              f"{[round(r['ttft_s'] * 1000) for r in out['results']]}, cached "
              f"{[r['num_cached_tokens'] for r in out['results']]}")
        return out["results"]


def _ids(results: list[dict]) -> list[list[int]]:
    return [r["token_ids"] for r in results]


def _assert_server_hits(results: list[dict], what: str) -> None:
    for r in results[::2]:  # the first prompt of each prefix, on a fresh engine
        assert r["num_cached_tokens"] >= PREFIX, (what, r["num_cached_tokens"])


def _run_chain(chain: Chain, writers: list[str], exact: bool = True) -> None:
    """``writers[0]`` stores P0; each next implementation reads P(i-1) (stored by the one
    before) and stores P(i). With ``exact``, every output equals the no-connector run.

    Without it (MLA on vLLM CPU, which turns vLLM's own prefix cache off for MLA, so no
    run without a connector reuses a prefix): a prompt computed whole equals the
    no-connector run, and a prompt whose prefix came from the server gives the same tokens
    whichever implementation wrote or read it. The two can differ from each other: the
    tail computed after a loaded prefix takes another attention path than one prefill."""
    sets = [_prompts(100 + i) for i in range(len(writers))]
    base = chain.run([p for s in sets for p in s], None)
    n = len(sets[0])
    expect = [_ids(base[i * n:(i + 1) * n]) for i in range(len(sets))]
    seen: dict[tuple[int, int, int], tuple[list[int], str]] = {}  # (set, prompt, hit) -> run

    def check(results: list[dict], i: int, what: str) -> None:
        for j, r in enumerate(results):
            if exact or r["num_cached_tokens"] == 0:
                assert r["token_ids"] == expect[i][j], (what, i, j, r["num_cached_tokens"])
                continue
            first = seen.setdefault((i, j, r["num_cached_tokens"]), (r["token_ids"], what))
            assert r["token_ids"] == first[0], (what, "differs from", first[1], i, j)

    check(chain.run(sets[0], writers[0]), 0, f"{writers[0]} storing")
    for i in range(1, len(writers)):
        out = chain.run(sets[i - 1] + sets[i], writers[i])
        what = f"{writers[i]} reading {writers[i - 1]}'s objects"
        check(out[:n], i - 1, what)
        check(out[n:], i, f"{writers[i]} storing")
        _assert_server_hits(out[:n], what)
    text = chain.log.read_text(errors="replace")
    assert "load of" not in text, "a load failed"


def test_tp2_fresh_engines_hit_each_others_objects(lmcache_server_factory, tmp_path):
    """TP=2: each rank stores and loads its own KV heads (kv rank = TP rank). Ours reads
    ours, LMCache's connector reads ours, and ours reads LMCache's."""
    model = write_tiny_llama(tmp_path / "llama", **{**PRESETS["small"], "dtype": "float32"})
    chain = Chain(model, lmcache_server_factory(), tmp_path / "engines.log", TP2,
                  TWO_RANKS_ENV, **PATIENT_HEALTH)
    _run_chain(chain, ["builtin", "builtin", "lmcache", "builtin"])


def test_mla_fresh_engines_hit_each_others_objects(lmcache_server_factory, tmp_path):
    """MLA: one latent plane per token (vLLM CPU's MLA path, block size 16). One rank, so
    each engine runs in one process (the objects are under test, not the layout)."""
    model = write_tiny_deepseek_v2(tmp_path / "mla")
    chain = Chain(model, lmcache_server_factory(), tmp_path / "engines.log",
                  {"block_size": 16}, {}, single_pass=True, in_process=True)
    _run_chain(chain, ["builtin", "builtin", "lmcache", "builtin"], exact=False)


def test_pp2_fresh_engines_hit_each_others_objects(lmcache_server_factory, tmp_path):
    """PP=2: each stage stores and loads its own layers (kv rank = PP rank). Ours reads
    ours, LMCache's connector reads ours, and ours reads LMCache's."""
    model = write_tiny_llama(tmp_path / "llama", **{**PRESETS["small"], "dtype": "float32"})
    chain = Chain(model, lmcache_server_factory(), tmp_path / "engines.log", PP2,
                  TWO_RANKS_ENV)
    _run_chain(chain, ["builtin", "lmcache", "builtin"])
