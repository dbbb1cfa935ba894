"""The embedded default: the connector starts a local LMCache server when none answers.

Real `lmcache` server processes on free ports. The server must come up once, be found (not
started again) by later callers, and never outlive the process that started it: a normal
stop unlinks its SHM pool, and a parent that dies without running any exit hook still takes
the server down through the parent-death signal set in the forked child.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from kvconn_plugin.config import parse_config
from kvconn_plugin.server.autostart import SHM_PREFIX, free_port, maybe_autostart, server_answers
from kvconn_plugin.tools.procgroup import is_alive

pytestmark = [
    pytest.mark.lmcache_server,
    pytest.mark.skipif(importlib.util.find_spec("lmcache") is None, reason="needs lmcache"),
]

ROOT = Path(__file__).resolve().parents[2]
SMALL = {"lmcache.mp.autostart.server_args": "--l1-size-gb 0.25 --eviction-policy LRU"}


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while is_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def test_autostart_starts_once_and_stop_cleans_up():
    url = f"tcp://127.0.0.1:{free_port()}"
    cfg = parse_config(SMALL)
    srv = maybe_autostart(cfg, url)
    assert srv is not None, "nothing answered, so a server had to be started"
    pool = Path(f"/dev/shm/{SHM_PREFIX}{srv.shm_name}")
    try:
        assert server_answers(url, timeout=2.0)
        # A second worker of the same host finds it answering and starts nothing.
        assert maybe_autostart(cfg, url) is None
    finally:
        srv.stop()
    assert srv.proc.poll() is not None
    assert not server_answers(url, timeout=0.5)
    assert not pool.exists()
    srv.stop()  # idempotent: the atexit hook calls it again


def test_autostart_off_or_remote_starts_nothing():
    port = free_port()
    assert maybe_autostart(parse_config({**SMALL, "lmcache.mp.autostart": False}),
                           f"tcp://127.0.0.1:{port}") is None
    # Not a local TCP address: we never start servers for someone else's host or for IPC.
    assert maybe_autostart(parse_config(SMALL), f"tcp://10.255.255.1:{port}") is None
    assert maybe_autostart(parse_config(SMALL), "ipc:///tmp/kvconn-none") is None


def test_server_dies_with_a_parent_that_exits_without_cleanup():
    """The starter forks from a process with busy threads (like a vLLM worker) and then exits
    with os._exit, so no atexit hook runs: only the parent-death signal can stop the server."""
    url = f"tcp://127.0.0.1:{free_port()}"
    script = textwrap.dedent(f"""
        import os, threading, logging
        from kvconn_plugin.config import parse_config
        from kvconn_plugin.server.autostart import maybe_autostart

        stop = threading.Event()
        def churn():
            log = logging.getLogger("churn")
            while not stop.is_set():
                log.debug("holding the logging lock now and then")
        for _ in range(4):
            threading.Thread(target=churn, daemon=True).start()
        srv = maybe_autostart(parse_config({SMALL!r}), {url!r})
        print(srv.proc.pid, srv.shm_name, flush=True)
        os._exit(0)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=180, env=env, check=True).stdout.split()
    pid, shm_name = int(out[0]), out[1]
    try:
        assert _wait_gone(pid, timeout=60), "the server outlived the process that started it"
        assert not server_answers(url, timeout=0.5)
    finally:
        if is_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        # The pool's owner died without our exit hook; the fixture would flag it as a leak.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"/dev/shm/{SHM_PREFIX}{shm_name}")
