"""Failure semantics on the real vLLM CPU engine with a real LMCache server that the test
kills (SIGKILL) and restarts while the engine keeps serving.

The engine runs in a child script that steps through phases; the test drives the server
between them through marker files. Every output must equal the no-connector baseline.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from kvconn_plugin.tools.procgroup import stop_process_group
from kvconn_plugin.tools.run_engine import DEFAULT_ENV, run_engine
from kvconn_plugin.tools.tiny_model import PRESETS, write_tiny_llama
from tests.helpers.connector_config import kv_transfer_config
from tests.helpers.engine import child_env

pytestmark = [pytest.mark.engine, pytest.mark.lmcache_server]

CHILD = textwrap.dedent('''
    import json, os, sys, time
    from pathlib import Path
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.inputs import TokensPrompt

    def wait_for(path, timeout=180):
        deadline = time.monotonic() + timeout
        while not Path(path).exists():
            if time.monotonic() > deadline:
                raise SystemExit(f"timed out waiting for {path}")
            time.sleep(0.2)

    def main():
        spec = json.loads(Path(sys.argv[1]).read_text())
        d = Path(spec["dir"])
        llm = LLM(model=spec["model"], dtype="float32", max_model_len=4096, enforce_eager=True,
                  seed=0, kv_transfer_config=KVTransferConfig(**spec["kvt"]),
                  **spec["engine_args"])
        sp = SamplingParams(temperature=0.0, max_tokens=8)
        def gen(prompts):
            outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sp,
                                use_tqdm=False)
            return [{"ids": list(o.outputs[0].token_ids), "cached": int(o.num_cached_tokens or 0)}
                    for o in outs]
        res = {"phase1": gen(spec["a"])}
        (d / "phase1").touch(); wait_for(d / "killed")
        res["phase2"] = gen(spec["a"] + spec["b"])          # server dead: no hang, same tokens
        (d / "phase2").touch(); wait_for(d / "restarted")
        # The heartbeat notices the server and re-registers in the background; on a loaded
        # machine that can take a few ticks, so try again (bounded) rather than guess a sleep.
        deadline = time.monotonic() + spec["settle_s"]
        res["phase3_attempts"] = 0
        while True:
            time.sleep(1.0)
            res["phase3_attempts"] += 1
            res["phase3_store"] = gen(spec["c"])
            llm.reset_prefix_cache()                         # next hit must come from LMCache
            res["phase3_hit"] = gen(spec["c"])
            if res["phase3_hit"][0]["cached"] or time.monotonic() > deadline:
                break
        (d / "result.json").write_text(json.dumps(res))
        llm.llm_engine.engine_core.shutdown()  # EngineCore and worker unlink their SHM queues

    if __name__ == "__main__":
        main()
''')


def _prompts(seed: int, n: int = 2) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    prefix = [rng.randrange(10, 500) for _ in range(768)]
    return [prefix + [rng.randrange(10, 500) for _ in range(30)] for _ in range(n)]


def _phased_run(tmp_path: Path, server, seed: int, after_phase1, after_phase2,
                engine_args: dict | None = None, env: dict | None = None,
                **extra) -> tuple[dict, str]:
    """Run CHILD against ``server``: ``after_phase1()`` and ``after_phase2()`` act on the
    server between the phases. ``engine_args`` and ``env`` go to the engine and to its
    baseline alike. Returns (results, child log)."""
    model = write_tiny_llama(tmp_path / "model", **PRESETS["small"])
    a, b, c = _prompts(seed), _prompts(seed + 1), _prompts(seed + 2)
    engine_args, env = engine_args or {}, {**DEFAULT_ENV, **(env or {})}
    spec = {"dir": str(tmp_path), "model": str(model),
            "kvt": kv_transfer_config(server.url, **extra), "engine_args": engine_args,
            "a": a, "b": b, "c": c, "settle_s": 60}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    (tmp_path / "child.py").write_text(CHILD)
    # float32 on both sides: bf16 near-ties would compare vLLM's batching, not the cache.
    # The baseline has no connector, so its process layout does not matter: one process
    # where it has one rank (under half the time; the same single-thread arithmetic).
    one_rank = engine_args.get("tensor_parallel_size", 1) == 1
    baseline = run_engine(model, a + b + c, max_tokens=8, log_path=tmp_path / "base.log",
                          engine_args={"dtype": "float32", **engine_args}, env=env,
                          in_process=one_rank)
    with open(tmp_path / "child.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, str(tmp_path / "child.py"),
                                 str(tmp_path / "spec.json")],
                                env=child_env(env), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            _wait(tmp_path / "phase1", proc)
            after_phase1()
            (tmp_path / "killed").touch()
            _wait(tmp_path / "phase2", proc)
            after_phase2()
            (tmp_path / "restarted").touch()
            _wait(tmp_path / "result.json", proc)
            proc.wait(timeout=120)
        finally:
            stop_process_group(proc)  # the whole engine, gracefully; also reaps stragglers
    res = json.loads((tmp_path / "result.json").read_text())
    base_ids = [r["token_ids"] for r in baseline["results"]]
    # Whatever the server did, every phase's tokens equal the no-connector baseline.
    assert [r["ids"] for r in res["phase1"]] == base_ids[:2]
    assert [r["ids"] for r in res["phase2"]] == base_ids[:4]
    assert [r["ids"] for r in res["phase3_store"]] == base_ids[4:]
    assert [r["ids"] for r in res["phase3_hit"]] == base_ids[4:]
    return res, (tmp_path / "child.log").read_text(errors="replace")


def test_server_killed_and_restarted_midrun(lmcache_server_factory, tmp_path):
    server = lmcache_server_factory()

    def kill_9():
        os.killpg(server.process.pid, signal.SIGKILL)  # kill -9: no goodbye to anyone
        server.kill()                                   # reap it and unlink its pool

    res, _ = _phased_run(tmp_path, server, 11, kill_9, server.restart,
                            **{"lmcache.mp.heartbeat_interval": 1, "kvconn.transfer_timeout": 5,
                               "kvconn.lookup_timeout": 1})
    # After the restart (same port, new SHM pool, no registrations) the connector
    # re-registered: hits are back.
    assert res["phase3_hit"][0]["cached"] >= 768


@pytest.mark.slow
def test_one_of_two_servers_killed_under_tp2(lmcache_server_factory, tmp_path):
    """TP=2 on two servers, one rank each (``lmcache.mp.server_urls``). ``kill -9`` of the
    second while the engine serves: no request fails or changes a token (a hit needs every
    rank's share, so the first server's chunks are not used); restarted, hits resume."""
    first, second = lmcache_server_factory(), lmcache_server_factory()

    def kill_9():
        os.killpg(second.process.pid, signal.SIGKILL)
        second.kill()

    res, _ = _phased_run(
        tmp_path, first, 31, kill_9, second.restart,
        engine_args={"tensor_parallel_size": 2, "distributed_executor_backend": "mp"},
        env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"},
        **{"lmcache.mp.server_urls": [first.url, second.url],
           "lmcache.mp.heartbeat_interval": 1, "kvconn.transfer_timeout": 5,
           "kvconn.lookup_timeout": 1})
    assert res["phase3_hit"][0]["cached"] >= 768, "no hit after the second server came back"


def test_engine_starts_without_a_server_and_picks_it_up_later(lmcache_server_factory, tmp_path):
    """No server when vLLM starts (autostart off): the engine serves without the cache after
    one warning naming the address and the start command; a server that comes up later is
    registered with in the background and hits follow, without restarting vLLM."""
    server = lmcache_server_factory()
    server.kill()  # keep the address, nobody behind it
    res, text = _phased_run(tmp_path, server, 21, lambda: None, server.restart,
                               **{"lmcache.mp.heartbeat_interval": 1})
    assert res["phase3_hit"][0]["cached"] >= 768, "no hit after the server came up"
    warned = [ln for ln in text.splitlines() if "WARNING" in ln and "no LMCache server at" in ln]
    assert len(warned) == 1, warned
    assert server.url in warned[0] and "lmcache server --l1-size-gb" in warned[0]


def test_require_server_fails_engine_start_up_naming_the_address(lmcache_server_factory, tmp_path):
    model = write_tiny_llama(tmp_path / "model", **PRESETS["small"])
    server = lmcache_server_factory()
    server.kill()
    with pytest.raises(RuntimeError) as err:
        run_engine(model, [[1, 2, 3]], max_tokens=1,
                   kv_transfer_config=kv_transfer_config(server.url,
                                                         **{"kvconn.require_server": True}),
                   log_path=tmp_path / "engine.log", timeout=300)
    text = (tmp_path / "engine.log").read_text(errors="replace") + str(err.value)
    assert "kvconn.require_server is set" in text and server.url in text


def _wait(path: Path, proc: subprocess.Popen, timeout: float = 400) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"engine script exited with {proc.returncode} before {path.name}")
        if time.monotonic() > deadline:
            raise AssertionError(f"engine script did not reach {path.name}")
        time.sleep(0.2)


STREAM_CHILD = textwrap.dedent('''
    import asyncio, json, sys, time
    from pathlib import Path
    from vllm import SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.inputs import TokensPrompt
    from vllm.v1.engine.async_llm import AsyncLLM

    async def main():
        spec = json.loads(Path(sys.argv[1]).read_text())
        d = Path(spec["dir"])
        llm = AsyncLLM.from_engine_args(AsyncEngineArgs(
            model=spec["model"], dtype="float32", max_model_len=4096, enforce_eager=True,
            seed=0, kv_transfer_config=KVTransferConfig(**spec["kvt"])))
        sp = SamplingParams(temperature=0.0, max_tokens=8)
        results = {}

        async def one(i, prompt):
            t0 = time.monotonic()
            last = None
            async for out in llm.generate(TokensPrompt(prompt_token_ids=prompt), sp, f"s{i}"):
                last = out
            results[i] = {"ids": list(last.outputs[0].token_ids),
                          "latency_s": time.monotonic() - t0, "start_s": t0 - t_start}

        t_start = time.monotonic()
        try:
            # Warm: the "cached" half of the stream is on the server before the stream starts.
            for i, p in enumerate(spec["warm"]):
                await one(1000 + i, p)
            (d / "warm").touch()
            t_start = time.monotonic()
            tasks = []
            for i, p in enumerate(spec["stream"]):
                tasks.append(asyncio.create_task(one(i, p)))
                await asyncio.sleep(spec["gap_s"])
            await asyncio.gather(*tasks)
        finally:
            (d / "result.json").write_text(json.dumps(
                {str(k): v for k, v in results.items() if k < 1000}))
            llm.shutdown()

    if __name__ == "__main__":
        asyncio.run(main())
''')


def test_kill_9_during_a_request_stream_never_stalls_the_engine(lmcache_server_factory, tmp_path):
    """The user report: AsyncLLM, a request every 0.75 s (half fresh prompts, half already
    cached), the server killed with stores and loads in flight, restarted later. Every
    request finishes well within the heartbeat-derived bound, none waits out a transfer
    deadline, and every output equals the no-connector baseline."""
    import random

    server = lmcache_server_factory()
    model = write_tiny_llama(tmp_path / "model", **PRESETS["small"])
    rng = random.Random(5)

    def prompt(n=700):
        return [rng.randrange(10, 500) for _ in range(n)]

    cached = [prompt() for _ in range(12)]
    stream = [p for pair in zip(cached, [prompt() for _ in range(12)], strict=True) for p in pair]
    extra = {"lmcache.mp.mq_timeout": 5, "lmcache.mp.heartbeat_interval": 2}
    spec = {"dir": str(tmp_path), "model": str(model),
            "kvt": kv_transfer_config(server.url, **extra),
            "warm": cached, "stream": stream, "gap_s": 0.75}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    (tmp_path / "child.py").write_text(STREAM_CHILD)
    # float32 on both sides: bf16 near-ties would compare vLLM's batching, not the cache.
    baseline = run_engine(model, stream, max_tokens=8, log_path=tmp_path / "base.log",
                          engine_args={"dtype": "float32"}, in_process=True)  # no connector
    with open(tmp_path / "child.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, str(tmp_path / "child.py"),
                                 str(tmp_path / "spec.json")],
                                env=child_env(DEFAULT_ENV), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            _wait(tmp_path / "warm", proc)
            time.sleep(4.1)   # a few requests into the stream, some storing, some loading
            os.killpg(server.process.pid, signal.SIGKILL)
            server.kill()
            time.sleep(6.0)   # requests keep coming while the server is dead
            server.restart()
            _wait(tmp_path / "result.json", proc, timeout=300)
            proc.wait(timeout=120)
        finally:
            stop_process_group(proc)
    res = json.loads((tmp_path / "result.json").read_text())
    assert len(res) == len(stream), "some requests never finished"
    ids = [res[str(i)]["ids"] for i in range(len(stream))]
    assert ids == [r["token_ids"] for r in baseline["results"]]
    slowest = max(r["latency_s"] for r in res.values())
    # 2 x heartbeat (4 s) is the most any transfer may wait; the rest is this loaded host.
    assert slowest < 12, f"a request took {slowest:.1f}s (transfer deadline 30 s)"
