"""``--kv-offloading-backend lmcache`` through vLLM's own config translation and connector
factory, on its real Scheduler against a real server (no engine, so it runs on every vLLM the
CI tests).

vLLM turns the flags into ``kv_connector="LMCacheMPConnector"`` / ``kv_role="kv_both"``;
our plugin's registration routes that name through the resolver. Each case runs in a fresh
interpreter: registration changes the process-wide connector factory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.helpers.connector_config import server_extra_config

pytestmark = pytest.mark.lmcache_server
ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import json, os, sys, time
os.environ["HF_HUB_OFFLINE"] = "1"
from kvconn_plugin.plugin import register
register()  # what vLLM's general-plugin loading does in every process
from vllm.config import CacheConfig, KVTransferConfig, SchedulerConfig, VllmConfig
from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
from tests.helpers.sched_harness import HASH_ALGO, make_request, make_scheduler, \\
    make_vllm_config, step
from tests.helpers.seed import seed_server

extra, url, build = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3] == "1"
base = make_vllm_config(connector=None, max_model_len=4096, max_num_batched_tokens=2048)
cfg = VllmConfig(
    model_config=base.model_config, device_config=base.device_config,
    # A fresh SchedulerConfig: the hybrid-allocator choice is still vLLM's to make.
    scheduler_config=SchedulerConfig(max_num_batched_tokens=2048, max_num_seqs=16,
                                     max_model_len=4096, enable_chunked_prefill=True,
                                     is_encoder_decoder=False),
    cache_config=CacheConfig(block_size=16, enable_prefix_caching=True,
                             prefix_caching_hash_algo=HASH_ALGO,
                             kv_offloading_backend="lmcache", kv_offloading_size=1.0),
    # The user's own extra config (server address) survives vLLM's rewrite.
    kv_transfer_config=KVTransferConfig(kv_connector_extra_config=extra))
kvt = cfg.kv_transfer_config
cls = KVConnectorFactory.get_connector_class(kvt)
print("ROUTE", kvt.kv_connector, kvt.kv_role, cls.__module__ + "." + cls.__name__)
if build:
    sched = make_scheduler(cfg)
    conn = sched.get_kv_connector()
    print("CONNECTOR", type(conn).__module__ + "." + type(conn).__name__)
    tokens = list(range(1000, 1600))
    seed_server(url, cfg.model_config.model, tokens)
    sched.add_request(make_request("r", tokens))
    for _ in range(500):
        so, _ = step(sched)
        if so.kv_connector_metadata.loads:
            load = so.kv_connector_metadata.loads[0]
            print("LOAD", load.start, load.end)
            break
        time.sleep(0.005)
    conn.shutdown()
"""


def _run(server, extra: dict, env: dict[str, str], build: bool) -> str:
    full = {**os.environ, "LMCACHE_TRACK_USAGE": "false", "DO_NOT_TRACK": "1", **env}
    full["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), full.get("PYTHONPATH")]))
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(SCRIPT), json.dumps(extra),
                          server.url, "1" if build else "0"],
                         capture_output=True, text=True, timeout=300, env=full, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-4000:]
    return out.stdout


@pytest.fixture(scope="module")
def own_server(lmcache_server_factory):
    """A server of this module's own: the load planned here has no worker to carry it out, so
    its read locks stay until the server's TTL and would skew lock counts on a shared one."""
    return lmcache_server_factory()


def test_offloading_flag_serves_hits_through_our_connector(own_server):
    extra = server_extra_config(own_server.url, **{"kvconn.lookup_timeout": 10})
    out = _run(own_server, extra, {"KVCONN_IMPL": "builtin"}, build=True)
    assert ("ROUTE LMCacheMPConnector kv_both kvconn_plugin.connector.KVConnPluginConnector"
            in out), out
    assert "CONNECTOR kvconn_plugin.connector.KVConnPluginConnector" in out, out
    assert "LOAD 0 512" in out, out  # two seeded chunks found and planned for loading


def test_offloading_flag_in_auto_mode_picks_lmcache_when_installed(own_server):
    import importlib.util

    if importlib.util.find_spec("lmcache") is None:
        pytest.skip("lmcache is not installed in this environment")
    out = _run(own_server, {}, {"KVCONN_IMPL": "auto"}, build=False)
    assert ("ROUTE LMCacheMPConnector kv_both "
            "lmcache.integration.vllm.lmcache_mp_connector.LMCacheMPConnector") in out, out
