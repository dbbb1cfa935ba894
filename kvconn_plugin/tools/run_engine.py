"""Run one vLLM engine in a child process and return its results as JSON.

Each engine gets a fresh process so that "engine #2" really starts cold (empty vLLM prefix
cache) and dies cleanly. Used by the demo, the end-to-end tests and the benchmarks.

Child protocol: ``python -m kvconn_plugin.tools.run_engine SPEC.json OUT.json``; the spec
holds the model dir, prompts as token-id lists, an optional ``kv_transfer_config`` dict and
engine arguments. The output has per prompt the greedy token ids, ``num_cached_tokens`` and
the time to first token measured around a 1-token generation.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

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
    prompts: list[list[int]],
    *,
    kv_transfer_config: dict[str, Any] | None = None,
    max_tokens: int = 8,
    engine_args: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 600,
    log_path: str | Path | None = None,
) -> dict[str, Any]:
    """Run prompts through a fresh engine in a child process; raise on failure."""
    spec = {
        "model": str(model_dir),
        "prompts": prompts,
        "kv_transfer_config": kv_transfer_config,
        "max_tokens": max_tokens,
        "engine_args": engine_args or {},
    }
    with tempfile.TemporaryDirectory(prefix="kvconn-engine-") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(spec))
        child_env = {**os.environ, **DEFAULT_ENV, **(env or {})}
        log = open(log_path, "ab") if log_path else subprocess.DEVNULL
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "kvconn_plugin.tools.run_engine", str(spec_path), str(out_path)],
                env=child_env, stdout=log, stderr=subprocess.STDOUT if log_path else subprocess.PIPE,
                start_new_session=True,
            )
            try:
                _, err = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                raise RuntimeError(f"engine did not finish within {timeout}s") from None
        finally:
            if log_path:
                log.close()
        _kill_group(proc)  # stragglers (EngineCore, autostarted server) die with the group
        if proc.returncode != 0 or not out_path.exists():
            tail = (err or b"").decode(errors="replace")[-4000:] if err else f"see {log_path}"
            raise RuntimeError(f"engine exited with {proc.returncode}: {tail}")
        return json.loads(out_path.read_text())


def _kill_group(proc: subprocess.Popen, grace_s: float = 15.0) -> None:
    """Stop whatever is left of the engine's process group. SIGTERM first, with a grace
    period: vLLM's EngineCore and workers unlink their /dev/shm queues on the way out,
    and an immediate SIGKILL would leak them."""
    import signal

    def alive() -> bool:
        try:
            os.killpg(proc.pid, 0)
            return True
        except (ProcessLookupError, PermissionError):
            return False

    if alive():
        os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while alive() and time.monotonic() < deadline:
            proc.poll()
            time.sleep(0.2)
        if alive():
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    proc.wait()


def _child(spec_path: str, out_path: str) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    spec = json.loads(Path(spec_path).read_text())
    args = dict(
        model=spec["model"], dtype="bfloat16", max_model_len=4096,
        enforce_eager=True, seed=0, max_num_seqs=8,
    )
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
    for ids in spec["prompts"]:
        t = time.perf_counter()
        first = llm.generate([TokensPrompt(prompt_token_ids=ids)], one, use_tqdm=False)[0]
        ttft = time.perf_counter() - t
        out = llm.generate([TokensPrompt(prompt_token_ids=ids)], full, use_tqdm=False)[0]
        results.append({
            "ttft_s": ttft,
            "num_cached_tokens": int(first.num_cached_tokens or 0),
            "token_ids": list(out.outputs[0].token_ids),
        })
    Path(out_path).write_text(json.dumps({"engine_start_s": start_s, "results": results}))
    del llm


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2])
