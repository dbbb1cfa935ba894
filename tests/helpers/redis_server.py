"""A real ``redis-server`` for tests: free port, no persistence, its own directory.

LMCache's ``resp`` L2 adapter (Redis/Valkey) needs a server to talk to; the tests start one
per test with :class:`RedisServer` (through the ``redis_server`` fixture in
``tests/conftest.py``) and speak just enough RESP over a raw socket to know it is up
(``PING``) and how many keys it holds (``DBSIZE``), so no Redis client package is needed.
``scripts/setup_env.sh`` installs ``redis-server`` (Debian package) when it is missing.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

READY_TIMEOUT_S = 20.0


def redis_server_binary() -> str | None:
    """``redis-server`` (or ``valkey-server``) on PATH, else ``None``."""
    return shutil.which("redis-server") or shutil.which("valkey-server")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _encode(*args: str) -> bytes:
    out = [f"*{len(args)}\r\n".encode()]
    for a in args:
        b = a.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


class RedisServer:
    """One ``redis-server`` process: ``start()``, ``command(...)``, ``stop()``.

    Attributes:
        host, port: where it listens (127.0.0.1, a free port).
        workdir: its own directory (``--dir``), removed by :meth:`stop`.
        log_path: its log (inside ``workdir`` until stopped; kept with ``keep_log_in``).
    """

    def __init__(self, binary: str, *, parent_dir: str | Path | None = None):
        self.binary = binary
        self.host = "127.0.0.1"
        self.port = 0
        self.workdir = Path(tempfile.mkdtemp(prefix="kvconn-redis-", dir=parent_dir))
        self.log_path = self.workdir / "redis.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisServer:
        """Start on a free port and wait until it answers ``PING``; retries port clashes."""
        last = ""
        for _ in range(3):
            self.port = _free_port()
            argv = [self.binary, "--bind", self.host, "--port", str(self.port),
                    "--save", "", "--appendonly", "no",  # nothing is written to disk
                    "--dir", str(self.workdir), "--daemonize", "no",
                    "--protected-mode", "no", "--logfile", ""]  # log to stdout
            setpriv = shutil.which("setpriv")
            if setpriv:  # dies with pytest even when fixture teardown never runs
                argv = [setpriv, "--pdeathsig", "TERM", "--", *argv]
            with open(self.log_path, "ab") as log:
                self.process = subprocess.Popen(
                    argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    start_new_session=True)
            try:
                self._wait_ready()
                return self
            except RuntimeError as exc:
                last = str(exc)
                self._kill()
        raise RuntimeError(f"redis-server did not start: {last}")

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if self.process is None or self.process.poll() is not None:
                raise RuntimeError(f"exited with {self.process and self.process.returncode}:\n"
                                   f"{self.log_tail()}")
            with contextlib.suppress(OSError):
                if self.command("PING") == "PONG":
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"no PONG within {READY_TIMEOUT_S:.0f}s:\n{self.log_tail()}")
            time.sleep(0.05)

    def command(self, *args: str, timeout: float = 2.0) -> str | int:
        """One command over a fresh connection; a simple string or integer reply
        (``PING`` -> ``"PONG"``, ``DBSIZE`` -> ``int``). Raises ``OSError`` on anything else."""
        with socket.create_connection((self.host, self.port), timeout=timeout) as s:
            s.sendall(_encode(*args))
            buf = b""
            while not buf.endswith(b"\r\n"):
                part = s.recv(4096)
                if not part:
                    raise OSError("connection closed before a reply")
                buf += part
        kind, body = buf[:1], buf[1:-2].decode(errors="replace")
        if kind == b"+":
            return body
        if kind == b":":
            return int(body)
        raise OSError(f"unexpected reply to {args[0]}: {buf[:200]!r}")

    def dbsize(self) -> int:
        n = self.command("DBSIZE")
        if not isinstance(n, int):
            raise OSError(f"DBSIZE answered {n!r}")
        return n

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def _kill(self) -> None:
        proc, self.process = self.process, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # nothing to save: no persistence
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)

    def stop(self, keep_log_in: Path | None = None) -> None:
        """Kill the server and remove its directory (its log is copied first if asked)."""
        self._kill()
        if keep_log_in is not None:
            with contextlib.suppress(OSError):
                shutil.copy(self.log_path, keep_log_in / f"redis-{self.port}.log")
        shutil.rmtree(self.workdir, ignore_errors=True)

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}"

    def __repr__(self) -> str:
        return f"RedisServer({self.url}, dir={self.workdir})"
