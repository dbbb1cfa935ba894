"""Run one vLLM engine in a child process and return its results as JSON.

Each engine gets a fresh process so that "engine #2" really starts cold (empty vLLM prefix
cache) and dies cleanly. Used by the demo, the end-to-end tests and the benchmarks.

Child protocol: ``python -m kvconn_plugin.tools.run_engine SPEC.json OUT.json``; the spec
holds the model dir, prompts (text or token-id lists), an optional ``kv_transfer_config`` dict
and engine arguments. The output has per prompt the greedy token ids and text, the prompt's
token ids, ``num_cached_tokens`` and the time to first token measured around a 1-token
generation (which runs first, so ``num_cached_tokens`` is what the engine found before this
prompt ever ran). With ``timestamps`` the engine keeps vLLM's per-request timestamps, and
each result splits that first TTFT into ``wait_s`` (queued until first scheduled for a
forward: connector lookup and asynchronous load included) and ``prefill_s`` (scheduled until
the first token: the forward, with any synchronous load). With ``time_local_hit`` the same
prompt is generated once more (1 token) right after: ``local_hit_ttft_s`` is then the TTFT
of a hit in vLLM's own prefix cache on the same engine, with ``local_hit_tokens``.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from kvconn_plugin.tools.procgroup import stop_process_group

DEFAULT_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_CPU_KVCACHE_SPACE": "2",
    "LMCACHE_TRACK_USAGE": "false",
    "DO_NOT_TRACK": "1",
    "VLLM_LOGGING_LEVEL": "INFO",
}


def run_engine(
    model_dir: str | Path,
    prompts: list[str] | list[list[int]],
    *,
    kv_transfer_config: dict[str, Any] | None = None,
    max_tokens: int = 8,
    engine_args: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 600,
    log_path: str | Path | None = None,
    single_pass: bool = False,
    timestamps: bool = False,
    time_local_hit: bool = False,
    in_process: bool = False,
) -> dict[str, Any]:
    """Run prompts through a fresh engine in a child process; raise on failure.

    ``single_pass``: one generation per prompt (no 1-token run first), so its tokens come
    from the same prefill as ``num_cached_tokens`` (``ttft_s`` is then that of the whole
    generation). Needed where vLLM's own prefix cache is off (MLA on CPU): the 1-token
    run would otherwise make the second one a hit.

    ``in_process``: the engine core and its one worker run in the child itself (vLLM's
    in-process client and its single-process executor, which vLLM CPU allows only without
    V1 multiprocessing) instead of two more spawned processes that each import torch and
    vLLM again: about 20 s per engine instead of 45 here. Both connector halves share one
    process, so it suits what the tests check of the cache's contents and tokens, not of
    the engine's process layout or of transfers crossing it; TP=1 and PP=1 only.

    The whole process group is stopped afterwards (also on a timeout), so no EngineCore,
    worker or /dev/shm queue outlives the call.
    """
    layout = engine_args or {}
    if in_process and (layout.get("tensor_parallel_size", 1) != 1
                       or layout.get("pipeline_parallel_size", 1) != 1):
        raise ValueError("in_process runs one rank only (TP=1, PP=1)")
    spec = {
        "model": str(model_dir),
        "prompts": [p if isinstance(p, str) else list(p) for p in prompts],
        "kv_transfer_config": kv_transfer_config,
        "max_tokens": max_tokens,
        "engine_args": {**layout,
                        **({"distributed_executor_backend": "uni"} if in_process else {})},
        "single_pass": single_pass,
        "timestamps": timestamps,
        "time_local_hit": time_local_hit,
    }
    with tempfile.TemporaryDirectory(prefix="kvconn-engine-") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(spec))
        child_env = {**os.environ, **DEFAULT_ENV, **(env or {})}
        if in_process:
            child_env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
            # vLLM binds its spawned worker to one core's thread; without that worker, torch
            # would take every core. One thread keeps the arithmetic (and so the greedy
            # tokens) the same as in the usual layout, and leaves the other cores alone.
            child_env.setdefault("OMP_NUM_THREADS", "1")
        with contextlib.ExitStack() as stack:
            log = stack.enter_context(open(log_path, "ab")) if log_path else subprocess.DEVNULL
            proc = subprocess.Popen(
                [sys.executable, "-m", "kvconn_plugin.tools.run_engine", str(spec_path),
                 str(out_path)],
                env=child_env, stdout=log,
                stderr=subprocess.STDOUT if log_path else subprocess.PIPE,
                start_new_session=True,  # its own group: the engine's processes die with it
            )
            stack.callback(stop_process_group, proc)  # also reaps stragglers after an exit
            try:
                _, err = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"engine did not finish within {timeout}s") from None
        if proc.returncode != 0 or not out_path.exists():
            tail = (err or b"").decode(errors="replace")[-4000:] if err else f"see {log_path}"
            raise RuntimeError(f"engine exited with {proc.returncode}: {tail}")
        return json.loads(out_path.read_text())


def _child(spec_path: str, out_path: str) -> None:
    from vllm import LLM, SamplingParams

    spec = json.loads(Path(spec_path).read_text())
    args = {"model": spec["model"], "dtype": "bfloat16", "max_model_len": 4096,
            "enforce_eager": True, "seed": 0, "max_num_seqs": 8}
    if spec.get("timestamps"):
        args["disable_log_stats"] = False  # vLLM records request timestamps only then
    args.update(spec["engine_args"])
    if spec["kv_transfer_config"] is not None:
        from vllm.config import KVTransferConfig

        args["kv_transfer_config"] = KVTransferConfig(**spec["kv_transfer_config"])
    t0 = time.perf_counter()
    llm = LLM(**args)
    start_s = time.perf_counter() - t0
    one = SamplingParams(temperature=0.0, max_tokens=1)
    full = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"])
    results = []
    for p in spec["prompts"]:
        prompt = p if isinstance(p, str) else {"prompt_token_ids": p}
        t = time.perf_counter()
        first = llm.generate([prompt], full if spec.get("single_pass") else one,
                             use_tqdm=False)[0]
        ttft = time.perf_counter() - t
        row: dict[str, Any] = {"ttft_s": ttft}
        m = first.metrics if spec.get("timestamps") else None
        if m is not None and getattr(m, "scheduled_ts", 0) and getattr(m, "first_token_ts", 0):
            row["wait_s"] = m.scheduled_ts - m.queued_ts
            row["prefill_s"] = m.first_token_ts - m.scheduled_ts
        if spec.get("time_local_hit"):
            t = time.perf_counter()
            again = llm.generate([prompt], one, use_tqdm=False)[0]
            row["local_hit_ttft_s"] = time.perf_counter() - t
            row["local_hit_tokens"] = int(again.num_cached_tokens or 0)
        if spec.get("single_pass"):
            out = first
        elif spec.get("time_local_hit") and spec["max_tokens"] == 1:
            out = again  # already the full (1-token) generation, from the same cache state
        else:
            out = llm.generate([prompt], full, use_tqdm=False)[0]
        results.append({
            **row,
            "num_cached_tokens": int(first.num_cached_tokens or 0),
            "prompt_token_ids": list(first.prompt_token_ids or []),
            "token_ids": list(out.outputs[0].token_ids),
            "text": out.outputs[0].text,
        })
    sched_cfg = llm.llm_engine.vllm_config.scheduler_config
    Path(out_path).write_text(json.dumps({
        "engine_start_s": start_s, "results": results,
        "hybrid_kv_cache_manager": not sched_cfg.disable_hybrid_kv_cache_manager,
    }))
    # Shut down explicitly so the connector's shutdown hooks run before the parent reaps us.
    with contextlib.suppress(Exception):
        llm.llm_engine.engine_core.shutdown()


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2])
