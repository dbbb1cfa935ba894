"""Shared test fixtures: a real LMCache server, a thread-leak guard, the ``cuda`` auto-skip.

Sub-directory conftest files add their own fixtures; keep this one to what every
directory needs.
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers import shm_check
from tests.helpers.redis_server import RedisServer, redis_server_binary

# Telemetry off for every server and engine a test starts (also inherited by children).
os.environ.setdefault("LMCACHE_TRACK_USAGE", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

SERVER_READY_TIMEOUT_S = float(os.environ.get("KVCONN_TEST_SERVER_READY_TIMEOUT", "120"))
THREAD_PREFIX = "kvconn-"
_names = itertools.count()


# ---------------------------------------------------------------------------- pytest hooks


def pytest_report_header(config: pytest.Config) -> list[str]:
    lines = []
    try:
        if importlib.util.find_spec("kvconn_plugin.ops") is not None:
            import kvconn_plugin.ops as ops

            info = ops.backend_info() if hasattr(ops, "backend_info") else {}
            backend = info.get("backend") or getattr(ops, "BACKEND", None) or "unknown"
            detail = ", ".join(f"{k}={info[k]}" for k in ("reason", "cpu_transfers",
                                                          "cuda_transfers") if k in info)
            build = info.get("build", {}).get("BUILD_TIME")
            lines.append(f"kvconn_plugin.ops backend: {backend} ({detail or ops.__file__}"
                         f"{', built ' + str(build) if build else ''})")
    except Exception as exc:  # a broken ops build must not hide the test run
        lines.append(f"kvconn_plugin.ops backend: import failed: {exc!r}")
    return lines


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    cuda_items = [item for item in items if item.get_closest_marker("cuda") is not None]
    if not cuda_items:
        return
    try:
        import torch

        has_gpu = bool(torch.cuda.is_available())
    except Exception:  # no torch or no driver both mean "no GPU"
        has_gpu = False
    if has_gpu:
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (torch.cuda.is_available() is false)")
    for item in cuda_items:
        item.add_marker(skip)


# ---------------------------------------------------------------------------- thread leaks


def _kvconn_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith(THREAD_PREFIX)}


@pytest.fixture(autouse=True)
def _no_leaked_kvconn_threads() -> Iterator[None]:
    """Fail a test that leaves a ``kvconn-*`` thread running (an unclosed client)."""
    before = _kvconn_threads()
    yield
    deadline = time.monotonic() + 2.0  # closing threads get a moment to finish
    leaked = _kvconn_threads() - before
    while leaked and time.monotonic() < deadline:
        time.sleep(0.02)
        leaked = {t for t in leaked if t.is_alive()}
    if leaked:
        pytest.fail(f"test leaked threads: {sorted(t.name for t in leaked)}", pytrace=False)


# ---------------------------------------------------------------------------- /dev/shm leaks


def _leaked_shm(before: set[str]) -> list[str]:
    return shm_check.leaked(before, pid=os.getpid(), generic=not shm_check.PARALLEL_STREAMS)


@pytest.fixture(scope="module", autouse=True)
def _no_leaked_shm_module() -> Iterator[set[str]]:
    """Fail the module (its last test's teardown) if it left vLLM/LMCache/kvconn entries in
    /dev/shm that nobody holds. Module scope catches what module-scoped fixtures (an engine
    run shared by several tests) leave behind; being the first module fixture, it is torn
    down after the module's own fixtures."""
    before = shm_check.entries()
    yield before  # the per-test check adds what it already reported
    leaked = _leaked_shm(before)
    if leaked:
        pytest.fail(f"module leaked /dev/shm entries: {leaked}", pytrace=False)


@pytest.fixture(autouse=True)
def _no_leaked_shm(_no_leaked_shm_module: set[str]) -> Iterator[None]:
    """Per test, for attribution: the same check after the test's own fixtures are gone."""
    before = shm_check.entries()
    yield
    leaked = _leaked_shm(before)
    if leaked:
        _no_leaked_shm_module.update(leaked)  # reported once, here
        pytest.fail(f"test leaked /dev/shm entries: {leaked}", pytrace=False)


# ---------------------------------------------------------------------------- LMCache server


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the server binds it shortly after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _lmcache_command() -> list[str] | None:
    # The vLLM 0.33 job runs in an environment without lmcache; it names the main
    # environment's executable here.
    override = os.environ.get("KVCONN_TEST_LMCACHE_BIN")
    if override:
        if not os.access(override, os.X_OK):
            raise RuntimeError(f"KVCONN_TEST_LMCACHE_BIN={override} is not an executable")
        return [override, "server"]
    script = Path(sys.executable).with_name("lmcache")
    if script.exists():
        return [str(script), "server"]
    found = shutil.which("lmcache")
    if found:
        return [found, "server"]
    if importlib.util.find_spec("lmcache") is not None:
        return [sys.executable, "-m", "lmcache.v1.multiprocess.http_server"]
    return None


class LMCacheServer:
    """One real ``lmcache server`` process on free ports.

    Attributes:
        url: ``tcp://127.0.0.1:<port>`` for our client.
        shm_name: the ``--shm-name`` value, or ``""`` (pickle fallback).
        pool_path: ``/dev/shm/lmcache_l1_pool_<shm_name>`` or ``None``.
        process: the running ``subprocess.Popen`` (its own process group).
        log_path: combined stdout/stderr of every start.
    """

    def __init__(self, *, shm: bool = True, chunk_size: int | None = None,
                 transfer_mode: str | None = "auto", l1_size_gb: float = 1,
                 extra_args: tuple[str, ...] = (), log_dir: Path):
        cmd = _lmcache_command()
        if cmd is None:
            pytest.skip("lmcache is not installed (pip install kvconn-plugin[lmcache])")
        self._cmd = cmd
        tag = f"kvt{os.getpid()}x{next(_names)}x{uuid.uuid4().hex[:6]}"
        self.shm_name = tag if shm else ""
        self.pool_path = f"/dev/shm/lmcache_l1_pool_{tag}" if shm else None
        self.chunk_size = chunk_size
        self.host = "127.0.0.1"
        self.port = 0
        self.http_port = 0
        self.url = ""
        self.log_path = log_dir / f"lmcache-{tag}.log"
        self.process: subprocess.Popen[bytes] | None = None
        args = ["--l1-size-gb", str(l1_size_gb), "--eviction-policy", "LRU"]
        if transfer_mode:
            args += ["--supported-transfer-mode", transfer_mode]
        if shm:
            args += ["--shm-name", self.shm_name]
        if chunk_size:
            args += ["--chunk-size", str(chunk_size)]
        self._args = args + list(extra_args)

    # -- lifecycle

    def start(self, *, new_ports: bool = True) -> LMCacheServer:
        """Start and wait until a ``ping`` round trip succeeds; retries on port clashes."""
        last: Exception | None = None
        for _ in range(3):
            if new_ports or not self.port:
                self.port, self.http_port = free_port(), free_port()
                self.url = f"tcp://{self.host}:{self.port}"
            self._spawn()
            try:
                self.wait_ready()
                return self
            except _ServerExited as exc:
                last = exc  # most likely a port taken by someone else meanwhile
                if not new_ports:
                    break
        raise RuntimeError(f"LMCache server did not start: {last}; log: {self.log_path}")

    def _spawn(self) -> None:
        argv = [*self._cmd, "--host", self.host, "--port", str(self.port)]
        if self._cmd[-1] == "server" or "http_server" in self._cmd[-1]:
            argv += ["--http-host", self.host, "--http-port", str(self.http_port)]
        argv += self._args
        setpriv = shutil.which("setpriv")
        if setpriv:
            # If pytest itself is killed (CI timeout, SIGKILL), fixture teardown never runs;
            # the parent-death signal still takes the 1+ GiB server down with it.
            argv = [setpriv, "--pdeathsig", "TERM", "--", *argv]
        env = dict(os.environ, LMCACHE_TRACK_USAGE="false", DO_NOT_TRACK="1",
                   LMCACHE_DISABLE_BANNER="1", PYTHONUNBUFFERED="1")
        with open(self.log_path, "ab") as log:
            log.write(f"\n==== {' '.join(argv)}\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=env, start_new_session=True,  # own process group: kill() gets children
            )

    def wait_ready(self, timeout: float = SERVER_READY_TIMEOUT_S) -> None:
        """Bounded wait for a ``ping(None)`` round trip (ZMQ connects before the bind)."""
        from kvconn_plugin.client import LMCacheClient
        from kvconn_plugin.errors import KVConnError

        deadline = time.monotonic() + timeout
        with LMCacheClient(self.url, control_timeout=1.0) as client:
            while True:
                if self.process is None or self.process.poll() is not None:
                    raise _ServerExited(f"exited with {self.process and self.process.returncode}:"
                                        f"\n{self.log_tail()}")
                try:
                    client.ping(None, timeout=1.0)
                    return
                except KVConnError:
                    pass
                if time.monotonic() > deadline:
                    self.kill()
                    raise RuntimeError(f"no ping reply within {timeout:.0f}s:\n{self.log_tail()}")

    def kill(self) -> None:
        """Kill the whole process group (SIGTERM, then SIGKILL) and unlink the pool."""
        proc, self.process = self.process, None
        if proc is not None and proc.poll() is None:
            for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)  # stragglers left in the group
            proc.poll()
        if self.pool_path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.pool_path)

    def restart(self, *, chunk_size: int | None = None,
                transfer_mode: str | None = None) -> LMCacheServer:
        """Kill and start again on the same address (same URL, a fresh, empty server),
        optionally with another chunk size or supported transfer mode."""
        self.kill()
        if chunk_size is not None:
            self._set_arg("--chunk-size", str(chunk_size))
            self.chunk_size = chunk_size
        if transfer_mode is not None:
            self._set_arg("--supported-transfer-mode", transfer_mode)
        return self.start(new_ports=False)

    def _set_arg(self, flag: str, value: str) -> None:
        if flag in self._args:
            self._args[self._args.index(flag) + 1] = value
        else:
            self._args += [flag, value]

    def freeze(self) -> None:
        """SIGSTOP the server: requests already sent stay unanswered (a call in flight)."""
        if self.process is not None:
            os.killpg(self.process.pid, signal.SIGSTOP)

    def kill_hard(self) -> None:
        """SIGKILL the whole group at once, as ``kill -9`` would (works on a frozen server),
        then clean up as :meth:`kill` does."""
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
        self.kill()

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def __repr__(self) -> str:
        return f"LMCacheServer({self.url}, shm={self.shm_name!r}, log={self.log_path})"


class _ServerExited(RuntimeError):
    pass


class _ServerRegistry:
    """Every server the session started, and one log folder for all of them."""

    def __init__(self) -> None:
        self.log_dir = Path(tempfile.mkdtemp(prefix="kvconn-lmcache-logs-"))
        self.servers: list[LMCacheServer] = []

    def start(self, **kwargs: object) -> LMCacheServer:
        server = LMCacheServer(log_dir=self.log_dir, **kwargs)  # type: ignore[arg-type]
        self.servers.append(server)
        return server.start()


@pytest.fixture(scope="session")
def _lmcache_servers(request: pytest.FixtureRequest) -> Iterator[_ServerRegistry]:
    registry = _ServerRegistry()
    try:
        yield registry
    finally:
        for server in registry.servers:
            server.kill()
        if request.session.testsfailed:
            sys.stderr.write(f"\nLMCache server logs kept in {registry.log_dir}\n")
        else:
            shutil.rmtree(registry.log_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def lmcache_server_factory(
    _lmcache_servers: _ServerRegistry,
) -> Iterator[Callable[..., LMCacheServer]]:
    """Start real LMCache servers: ``factory(shm=True, chunk_size=None, transfer_mode="auto",
    l1_size_gb=1, extra_args=())``. Each is killed when its test module ends: an idle server
    still costs a few percent of a core and its L1, and a whole suite starts dozens. Logs are
    kept (and their folder printed) when any test failed."""
    mine: list[LMCacheServer] = []

    def start(**kwargs: object) -> LMCacheServer:
        server = _lmcache_servers.start(**kwargs)
        mine.append(server)
        return server

    try:
        yield start
    finally:
        for server in mine:
            server.kill()


@pytest.fixture(scope="session")
def lmcache_server(_lmcache_servers: _ServerRegistry) -> LMCacheServer:
    """The shared default server: engine-driven and lmcache-driven ops, SHM pool, 1 GiB L1,
    chunk size 256. Tests that kill or restart a server must use the factory instead."""
    return _lmcache_servers.start()


# ---------------------------------------------------------------------------- Redis


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A real ``redis-server`` on a free port, no persistence, its own directory under
    ``tmp_path`` (removed at teardown; the log is copied to ``tmp_path``). Skips when no
    ``redis-server`` is installed (``scripts/setup_env.sh`` installs it with apt-get)."""
    binary = redis_server_binary()
    if binary is None:
        pytest.skip("redis-server is not installed (scripts/setup_env.sh installs the Debian "
                    "package redis-server; it could not, or was not run)")
    server = RedisServer(binary, parent_dir=tmp_path)
    try:
        yield server.start()
    finally:
        server.stop(keep_log_in=tmp_path)
