"""One real ``vllm serve`` (CPU engine) with our connector and a real LMCache server: what a
router subscribed to vLLM's KV events sees, cache resets through the HTTP API, and per-request
control through ``kv_transfer_params`` in the request body (OpenAI ``extra_body``)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from kvconn_plugin.tools.run_engine import DEFAULT_ENV
from kvconn_plugin.tools.tiny_model import PRESETS, write_tiny_llama
from tests.conftest import free_port
from tests.helpers.connector_config import kv_transfer_config
from tests.helpers.engine import post_json, start_vllm_serve
from tests.helpers.kv_events import KVEventSubscriber

pytestmark = [pytest.mark.engine, pytest.mark.lmcache_server]

CHUNK = 256


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("model") / "small", **PRESETS["small"])


def _prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(10, 500) for _ in range(n)]


def _complete(base, prompt: list[int], params: dict | None = None) -> dict:
    body = {"model": base.model, "prompt": prompt, "max_tokens": 3, "temperature": 0}
    if params is not None:
        body["kv_transfer_params"] = params
    return post_json(f"{base}/v1/completions", body)


def _stats(resp: dict) -> dict:
    return (resp.get("kv_transfer_params") or {})["cached_token_stats"]


def _cpu_tokens(sub: KVEventSubscriber) -> list[list[int]]:
    return [e.token_ids for e in sub.stored("CPU")]


def _until(base, sub: KVEventSubscriber, pred, tries: int = 20) -> bool:
    """Wait for ``pred()`` on the events received. Events go out with engine steps and
    stores settle in the background: a commit confirmed after a request's last step is
    announced at the next step, so a short request (stores nothing) drives one."""
    for i in range(tries):
        if sub.wait_for(lambda _: pred(), 3) and pred():
            return True
        _complete(base, _prompt(20, 100 + i))
    return pred()


def test_events_reset_and_request_params_on_vllm_serve(tiny_model, lmcache_server_factory,
                                                       tmp_path):
    server = lmcache_server_factory()
    port = free_port()
    kvt = kv_transfer_config(server.url, **{"kvconn.impl": "builtin",
                                           "lmcache.mp.heartbeat_interval": 2})
    events_cfg = {"enable_kv_cache_events": True, "publisher": "zmq",
                  "endpoint": f"tcp://*:{port}"}
    args = ["--kv-transfer-config", json.dumps(kvt), "--kv-events-config", json.dumps(events_cfg)]
    env = {**DEFAULT_ENV, "VLLM_SERVER_DEV_MODE": "1"}  # /reset_prefix_cache is a dev route
    a, b, c = _prompt(600, 1), _prompt(600, 2), _prompt(600, 3)
    with start_vllm_serve(tiny_model, args, env=env, log_path=tmp_path / "serve.log") as base:
        sub = KVEventSubscriber(f"tcp://127.0.0.1:{port}")
        try:
            first = _complete(base, a, {"cached_token_stats": True})
            assert _stats(first)["num_lmcache_cached_tokens"] == 0
            # The router sees A's two chunks in the CPU tier, under vLLM's block hashes:
            # the same hashes as vLLM's own GPU events for those blocks.
            assert _until(base, sub, lambda: len(sub.stored("CPU")) >= 2)
            cpu = sub.stored("CPU")
            assert _cpu_tokens(sub) == [a[:CHUNK], a[CHUNK:2 * CHUNK]]
            gpu = {h for e in sub.stored("GPU") for h in e.block_hashes}
            ours = [h for e in cpu for h in e.block_hashes]
            assert ours and set(ours) <= gpu
            assert cpu[1].parent_block_hash == cpu[0].block_hashes[-1]
            block_size = cpu[0].block_size
            assert len(cpu[0].block_hashes) == CHUNK // block_size

            # vLLM's own prefix cache only: ours keeps A, and a request asking for stats
            # learns that A came from LMCache.
            assert post_json(f"{base}/reset_prefix_cache", {}) == {"success": True}
            again = _complete(base, a, {"cached_token_stats": True})
            assert again["choices"][0]["text"] == first["choices"][0]["text"]
            assert _stats(again) == {"num_vllm_cached_tokens": 0,
                                     "num_lmcache_cached_tokens": 2 * CHUNK,
                                     "num_lmcache_extra_cached_tokens": 2 * CHUNK}

            # skip_save: B is never stored; C (plain, sent after B) is.
            _complete(base, b, {"lmcache.skip_save": True})
            _complete(base, c, {"lmcache.max_offload_tokens": 300, "lmcache.tag.team": "x"})
            assert _until(base, sub, lambda: c[:CHUNK] in _cpu_tokens(sub))
            assert b[:CHUNK] not in _cpu_tokens(sub)
            assert c[CHUNK:2 * CHUNK] not in _cpu_tokens(sub)  # capped at 300 -> one chunk
            # A bad value is ignored (defaults apply), the request still succeeds.
            assert _complete(base, _prompt(40, 4), {"lmcache.skip_save": "perhaps"})["choices"]

            # The external reset: the server is cleared, the router told so. Events go out
            # with the engine's steps (vLLM publishes nothing while idle): the next request
            # carries them.
            announced = {h for e in sub.stored("CPU") for h in e.block_hashes}
            resp = post_json(f"{base}/reset_prefix_cache?reset_external=true", {})
            assert resp == {"success": True}
            after = _complete(base, a, {"cached_token_stats": True})
            assert _stats(after)["num_lmcache_cached_tokens"] == 0
            assert after["choices"][0]["text"] == first["choices"][0]["text"]
            removed = lambda: {h for r in sub.removed("CPU") for h in r.block_hashes}  # noqa: E731
            assert _until(base, sub, lambda: removed() >= announced)
        finally:
            sub.close()
    log = (tmp_path / "serve.log").read_text()
    assert "kvconn: worker" in log and "LMCache server at" in log
