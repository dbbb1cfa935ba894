"""End to end on the real vLLM CPU engine and a real LMCache server.

Each engine runs in its own child process, so engine #2 starts with an empty vLLM prefix
cache: every hit it reports came through LMCache.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path

import pytest

from kvconn_plugin.tools.procgroup import stop_process_group
from kvconn_plugin.tools.run_engine import DEFAULT_ENV, run_engine
from kvconn_plugin.tools.tiny_model import PRESETS, write_tiny_llama
from tests.helpers.connector_config import kv_transfer_config
from tests.helpers.engine import post_json, start_vllm_serve

pytestmark = [pytest.mark.engine, pytest.mark.lmcache_server]

PREFIX = 1024


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("model") / "small", **PRESETS["small"])


def _prompts(n: int = 2, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    prefix = [rng.randrange(10, 500) for _ in range(PREFIX)]
    return [prefix + [rng.randrange(10, 500) for _ in range(40)] for _ in range(n)]


def test_fresh_engine_hits_and_matches_baseline(tiny_model, lmcache_server_factory, tmp_path):
    server = lmcache_server_factory()
    prompts = _prompts(seed=1)
    log = tmp_path / "engines.log"
    base = run_engine(tiny_model, prompts, log_path=log, in_process=True)  # no connector
    kvt = kv_transfer_config(server.url)
    e1 = run_engine(tiny_model, prompts, kv_transfer_config=kvt, log_path=log)
    e2 = run_engine(tiny_model, prompts, kv_transfer_config=kvt, log_path=log)
    for b, r1, r2 in zip(base["results"], e1["results"], e2["results"], strict=True):
        assert r1["token_ids"] == b["token_ids"]
        assert r2["token_ids"] == b["token_ids"]
    # Engine #1's first prompt had nothing to hit; engine #2's first prompt is cold in
    # vLLM and must get the whole shared prefix from LMCache.
    assert e1["results"][0]["num_cached_tokens"] == 0
    assert e2["results"][0]["num_cached_tokens"] >= PREFIX


def test_model_namespace_isolates_engines(tiny_model, lmcache_server_factory, tmp_path):
    # Keys, not processes, are under test: one-process engines start faster.
    server = lmcache_server_factory()
    prompts = _prompts(n=1, seed=2)
    run_engine(tiny_model, prompts, kv_transfer_config=kv_transfer_config(server.url),
               log_path=tmp_path / "l", in_process=True)
    tenant_b = kv_transfer_config(server.url, **{"kvconn.model_name": "tenant-b"})
    other = run_engine(tiny_model, prompts, kv_transfer_config=tenant_b, log_path=tmp_path / "l",
                       in_process=True)
    assert other["results"][0]["num_cached_tokens"] == 0


def _env(**extra: str) -> dict[str, str]:
    return {**DEFAULT_ENV, **extra}


def _serve_and_complete(model: Path, args: list[str], env: dict, log: Path, prompt_ids: list[int],
                        metrics: list[str] | None = None) -> list[dict]:
    with start_vllm_serve(model, args, env=env, log_path=log) as base:
        out = [
            post_json(f"{base}/v1/completions", {"model": base.model, "prompt": prompt_ids,
                                                 "max_tokens": 4, "temperature": 0})
            for _ in range(2)
        ]
        if metrics is not None:
            with urllib.request.urlopen(f"{base}/metrics", timeout=30) as r:
                metrics.append(r.read().decode())
        return out


def test_vllm_serve_with_kv_transfer_config(tiny_model, lmcache_server_factory, tmp_path):
    server = lmcache_server_factory()
    kvt = kv_transfer_config(server.url, **{"kvconn.impl": "builtin"})
    del kvt["kv_connector_module_path"]  # through the entry point's registration
    scraped: list[str] = []
    out = _serve_and_complete(tiny_model, ["--kv-transfer-config", json.dumps(kvt)], _env(),
                              tmp_path / "serve.log", _prompts(n=1, seed=3)[0], metrics=scraped)
    # Our Prometheus metrics are on vllm serve's /metrics.
    for name in ("vllm:kvconn_hit_tokens_total", "vllm:kvconn_stored_bytes_total",
                 "vllm:kvconn_degraded", "vllm:kvconn_lookup_latency_seconds_bucket"):
        assert name in scraped[0], name
    assert all(r["choices"][0]["text"] is not None for r in out)
    assert out[0]["choices"][0]["text"] == out[1]["choices"][0]["text"]
    assert "kvconn: worker" in (tmp_path / "serve.log").read_text()


def test_vllm_serve_with_offloading_backend(tiny_model, lmcache_server_factory, tmp_path):
    server = lmcache_server_factory()
    host, port = server.url.rsplit(":", 1)
    extra = {"kv_connector_extra_config": {"lmcache.mp.host": host, "lmcache.mp.port": int(port),
                                           "lmcache.mp.autostart": False}}
    out = _serve_and_complete(
        tiny_model,
        ["--kv-offloading-backend", "lmcache", "--kv-offloading-size", "1",
         "--kv-transfer-config", json.dumps(extra)],
        _env(KVCONN_IMPL="builtin"), tmp_path / "offload.log", _prompts(n=1, seed=4)[0],
    )
    assert len(out) == 2
    log = (tmp_path / "offload.log").read_text()
    assert "kvconn: worker" in log  # our connector served the LMCacheMPConnector name


def test_asyncllm_script_sets_impl_inside(tiny_model, lmcache_server_factory, tmp_path):
    server = lmcache_server_factory()
    host, port = server.url.rsplit(":", 1)
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(f"""
        import asyncio, os
        os.environ["KVCONN_IMPL"] = "builtin"   # set inside the script, before the engine
        from vllm.config import KVTransferConfig
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        async def main():
            args = AsyncEngineArgs(model={str(tiny_model)!r}, max_model_len=4096,
                enforce_eager=True, dtype="bfloat16",
                kv_transfer_config=KVTransferConfig(kv_connector="KVConnPluginConnector",
                kv_role="kv_both", kv_connector_extra_config={{"lmcache.mp.host": {host!r},
                "lmcache.mp.port": {int(port)}, "lmcache.mp.autostart": False}}))
            llm = AsyncLLM.from_engine_args(args)
            try:
                async for out in llm.generate(TokensPrompt(prompt_token_ids=list(range(10, 400))),
                                              SamplingParams(max_tokens=3, temperature=0), "r1"):
                    last = out
                print("RESULT", last.outputs[0].token_ids)
            finally:
                llm.shutdown()

        if __name__ == "__main__":  # vLLM's CPU platform spawns its engine processes
            asyncio.run(main())
    """))
    log = tmp_path / "async.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, str(script)], env=_env(), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=400)
        finally:
            stop_process_group(proc)  # on timeout the whole engine, not just the script
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    assert "RESULT" in text
    assert "kvconn_plugin.connector.KVConnPluginConnector (kvconn.impl/KVCONN_IMPL=builtin)" in text
