"""A hybrid model (sliding-window and full-attention layers) keeps vLLM's hybrid KV cache
manager on with our connector, and still gets correct hits for every KV cache group.

The model is a tiny random-weight Gemma-3 text model (6 layers: sliding window 256 on 4,
full attention on 2), which vLLM serves with several KV cache groups. float32, so that the
comparison with the no-connector run measures the cache alone (see test_mixed_impl_e2e).
"""

from __future__ import annotations

import functools
import random
import re

import pytest

from kvconn_plugin.tools.run_engine import run_engine
from kvconn_plugin.tools.tiny_hybrid import write_tiny_gemma3
from tests.helpers.connector_config import kv_transfer_config

# slow: about 3 min of engine runs; CI runs it in make test-slow.
pytestmark = [pytest.mark.engine, pytest.mark.lmcache_server, pytest.mark.slow]

CHUNK = 256
ARGS = {"dtype": "float32"}


def _prompts(seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    out = []
    for _ in range(3):
        prefix = [rng.randrange(10, 500) for _ in range(3 * CHUNK)]
        out += [prefix + [rng.randrange(10, 500) for _ in range(rng.randrange(20, 200))]
                for _ in range(2)]
    return out


def test_hybrid_model_keeps_the_hybrid_manager_and_hits_every_group(lmcache_server_factory,
                                                                   tmp_path):
    model = write_tiny_gemma3(tmp_path / "gemma3")
    prompts = _prompts(seed=4)
    log = tmp_path / "engines.log"
    # The groups' objects and tokens are under test, not the process layout: one-process
    # engines run in under half the time.
    run = functools.partial(run_engine, model, prompts, log_path=log, engine_args=ARGS,
                            in_process=True)
    base = run()
    server = lmcache_server_factory()
    kvt = kv_transfer_config(server.url)
    first = run(kv_transfer_config=kvt)
    second = run(kv_transfer_config=kvt)
    ids = [r["token_ids"] for r in base["results"]]
    assert [r["token_ids"] for r in first["results"]] == ids
    assert [r["token_ids"] for r in second["results"]] == ids
    assert first["hybrid_kv_cache_manager"] and second["hybrid_kv_cache_manager"]
    # A fresh engine: every prompt's prefix came through the server, for all groups (a
    # missing sliding-window group changes these tokens; checked by hand).
    assert all(r["num_cached_tokens"] >= 3 * CHUNK for r in second["results"])
    text = log.read_text(errors="replace")
    # vLLM made one full-attention and two sliding-window groups; all three are moved.
    groups = re.findall(r"groups=(\S+)", text)
    assert groups and all(sorted(g.split(",")) == ["full:2", "sliding(256):2",
                                                   "sliding(256):2"] for g in groups), groups
    assert "Turning off hybrid kv cache manager" not in text
