"""The embedded default: start a local LMCache server when none answers.

Only for a local TCP address, only when the ``lmcache`` package is importable, and only
once per host and port: workers race for a file lock, the winner starts the server and the
others find it answering. The server dies with the process that started it (parent-death
signal plus an exit hook), and its SHM pool is unlinked after it.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import importlib.util
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from urllib.parse import urlsplit

from kvconn_plugin.client.api import LMCacheClient
from kvconn_plugin.config import KVConnConfig
from kvconn_plugin.errors import KVConnError

logger = logging.getLogger(__name__)

LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1", "0.0.0.0"}
SHM_PREFIX = "lmcache_l1_pool_"


class AutostartedServer:
    def __init__(self, proc: subprocess.Popen, shm_name: str, log_path: str, url: str):
        self.proc = proc
        self.shm_name = shm_name
        self.log_path = log_path
        self.url = url
        atexit.register(self.stop)

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"/dev/shm/{SHM_PREFIX}{self.shm_name}")


def local_tcp(url: str) -> tuple[str, int] | None:
    parts = urlsplit(url)
    if parts.scheme != "tcp" or parts.hostname not in LOCAL_HOSTS or parts.port is None:
        return None
    return parts.hostname, parts.port


def server_answers(url: str, timeout: float) -> bool:
    with LMCacheClient(url, control_timeout=timeout) as client:
        try:
            return client.ping(None, timeout=timeout)
        except KVConnError:
            return False


def maybe_autostart(config: KVConnConfig, url: str, rank: int = 0) -> AutostartedServer | None:
    """Start a server for ``url`` if the config allows it and nothing answers there."""
    if not config.autostart:
        return None
    local = local_tcp(url)
    if local is None or server_answers(url, timeout=1.0):
        return None
    if importlib.util.find_spec("lmcache") is None:
        logger.warning("kvconn: no LMCache server at %s and the lmcache package is not "
                       "installed here, so none can be started (pip install lmcache)", url)
        return None
    host, port = local
    lock_path = os.path.join(tempfile.gettempdir(), f"kvconn-autostart-{port}.lock")
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the loser waits here until the winner's server is up
        if server_answers(url, timeout=1.0):
            return None
        return _launch(config, host, port, url)


def _server_args(config: KVConnConfig) -> list[str]:
    args = list(config.autostart_server_args)
    if config.offloading_size_gb is not None:
        # --kv-offloading-size is the total memory the user gave the offload tier.
        if "--l1-size-gb" in args:
            i = args.index("--l1-size-gb")
            del args[i:i + 2]
        args += ["--l1-size-gb", f"{config.offloading_size_gb:g}"]
    return args


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _parent_death_hook() -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the kernel SIGTERM the server when its parent goes away.

    libc is loaded here, in the parent: the hook runs in the child of a fork from a
    multithreaded process (vLLM's), where loading a library or importing a module could
    deadlock on a lock another thread held at fork time. The signal fires when the *thread*
    that forked exits, so the caller must be a long-lived thread (workers call this from
    their main thread while registering the KV caches); the atexit hook covers the rest.
    """
    try:
        import ctypes

        prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    pr_set_pdeathsig, sigterm = 1, int(signal.SIGTERM)

    def hook() -> None:
        prctl(pr_set_pdeathsig, sigterm)

    return hook


def _launch(config: KVConnConfig, host: str, port: int, url: str) -> AutostartedServer:
    shm_name = f"kvconn_{port}_{os.getpid()}"
    bind_host = "127.0.0.1" if host == "localhost" else host
    cmd = [
        sys.executable, "-m", "lmcache.v1.multiprocess.http_server",
        "--host", bind_host, "--port", str(port),
        "--http-host", "127.0.0.1", "--http-port", str(free_port()),
        "--supported-transfer-mode", "auto", "--shm-name", shm_name,
        *_server_args(config),
    ]
    env = dict(os.environ)
    env.setdefault("LMCACHE_TRACK_USAGE", "false")
    env.setdefault("DO_NOT_TRACK", "1")
    log_path = os.path.join(tempfile.gettempdir(), f"kvconn-lmcache-server-{port}.log")
    logger.info("kvconn: starting an LMCache server on %s (log: %s): %s", url, log_path,
                " ".join(cmd))
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True, preexec_fn=_parent_death_hook())
    server = AutostartedServer(proc, shm_name, log_path, url)
    deadline = time.monotonic() + config.autostart_wait_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        if server_answers(url, timeout=1.0):
            return server
        time.sleep(0.5)
    server.stop()
    raise KVConnError(f"the LMCache server started on {url} did not come up; see {log_path}")
