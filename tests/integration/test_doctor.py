"""``kvconn doctor`` against a real server and against none."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import free_port

pytestmark = pytest.mark.lmcache_server


def _doctor(extra: dict, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "LMCACHE_TRACK_USAGE": "false", "DO_NOT_TRACK": "1"}
    return subprocess.run([sys.executable, "-m", "kvconn_plugin", "doctor",
                           "--extra-config", json.dumps(extra), *args],
                          capture_output=True, text=True, timeout=180, env=env)


def test_doctor_with_server(lmcache_server):
    host, port = lmcache_server.url.rsplit(":", 1)
    out = _doctor({"lmcache.mp.host": host, "lmcache.mp.port": int(port)})
    assert out.returncode == 0, out.stdout + out.stderr
    assert "[OK  ] server" in out.stdout and "chunk size 256" in out.stdout
    assert "[OK  ] server SHM pool" in out.stdout
    assert "[OK  ] kernels" in out.stdout and "resolver" in out.stdout


def test_doctor_reports_every_server_and_its_l2_tiers(lmcache_server_factory, tmp_path):
    """Two servers, the second with an fs L2 tier: one block of lines per server, with the
    tiers its status page lists; a wrong count of status pages is refused."""
    plain = lmcache_server_factory()
    tiered = lmcache_server_factory(extra_args=(
        "--l2-adapter", json.dumps({"type": "fs", "base_path": str(tmp_path / "l2")})))
    servers = [plain, tiered]
    extra = {"lmcache.mp.server_urls": [s.url for s in servers]}
    pages = ",".join(f"http://127.0.0.1:{s.http_port}/status" for s in servers)
    out = _doctor(extra, "--status-urls", pages)
    assert out.returncode == 0, out.stdout + out.stderr
    for i, s in enumerate(servers, 1):
        assert f"[OK  ] server {i}/2: {s.url} answers; chunk size 256" in out.stdout
        assert f"[OK  ] server {i}/2 SHM pool" in out.stdout
    assert "[OK  ] server 1/2 L2: none (L1 only)" in out.stdout
    assert f"[OK  ] server 2/2 L2: FSL2Adapter (healthy, {tmp_path / 'l2'})" in out.stdout
    wrong = _doctor(extra, "--status-urls", pages.split(",")[0])
    assert wrong.returncode == 1 and "[FAIL] status pages" in wrong.stdout


def test_doctor_fails_when_config_cannot_work():
    out = _doctor({"lmcache.mp.host": "tcp://127.0.0.1", "lmcache.mp.port": free_port(),
                   "kvconn.require_server": True})
    assert out.returncode == 1
    assert "[FAIL] server" in out.stdout and "fix: lmcache server" in out.stdout
    bad = _doctor({"kvconn.nope": 1})
    assert bad.returncode == 1 and "kvconn.nope" in bad.stdout


def test_doctor_reports_a_kv_format_the_connector_cannot_move(lmcache_server):
    from tests.helpers.sched_harness import tiny_model_dir

    host, port = lmcache_server.url.rsplit(":", 1)
    extra = {"lmcache.mp.host": host, "lmcache.mp.port": int(port)}
    model = str(tiny_model_dir())
    env = {**os.environ, "LMCACHE_TRACK_USAGE": "false", "DO_NOT_TRACK": "1",
           "HF_HUB_OFFLINE": "1"}

    def run(engine: dict) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "kvconn_plugin", "doctor", "--extra-config",
                               json.dumps(extra), "--engine-args", json.dumps(engine)],
                              capture_output=True, text=True, timeout=300, env=env)

    plain = run({"model": model})
    assert plain.returncode == 0 and "[OK  ] KV format: attention" in plain.stdout, plain.stdout
    dcp = run({"model": model, "tensor_parallel_size": 4, "decode_context_parallel_size": 2})
    # The engine still runs (without the cache), so this warns instead of failing.
    assert dcp.returncode == 0, dcp.stdout + dcp.stderr
    assert "[WARN] KV format: context parallelism" in dcp.stdout
    assert "serve without the KV cache" in dcp.stdout
