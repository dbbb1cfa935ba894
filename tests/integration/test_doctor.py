"""``kvconn doctor`` against a real server and against none."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import free_port

pytestmark = pytest.mark.lmcache_server


def _doctor(extra: dict) -> subprocess.CompletedProcess:
    env = {**os.environ, "LMCACHE_TRACK_USAGE": "false", "DO_NOT_TRACK": "1"}
    return subprocess.run([sys.executable, "-m", "kvconn_plugin", "doctor",
                           "--extra-config", json.dumps(extra)],
                          capture_output=True, text=True, timeout=180, env=env)


def test_doctor_with_server(lmcache_server):
    host, port = lmcache_server.url.rsplit(":", 1)
    out = _doctor({"lmcache.mp.host": host, "lmcache.mp.port": int(port)})
    assert out.returncode == 0, out.stdout + out.stderr
    assert "[OK  ] server" in out.stdout and "chunk size 256" in out.stdout
    assert "[OK  ] SHM pool" in out.stdout
    assert "[OK  ] kernels" in out.stdout and "resolver" in out.stdout


def test_doctor_fails_when_config_cannot_work():
    out = _doctor({"lmcache.mp.host": "tcp://127.0.0.1", "lmcache.mp.port": free_port(),
                   "kvconn.require_server": True})
    assert out.returncode == 1
    assert "[FAIL] server" in out.stdout and "fix: lmcache server" in out.stdout
    bad = _doctor({"kvconn.nope": 1})
    assert bad.returncode == 1 and "kvconn.nope" in bad.stdout
