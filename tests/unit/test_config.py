"""Config parsing: every invalid value is rejected with the key and what is accepted."""

from __future__ import annotations

import pytest

from kvconn_plugin.config import parse_config
from kvconn_plugin.errors import KVConnConfigError


def test_defaults():
    cfg = parse_config({}, env={})
    assert cfg.server_urls == ("tcp://localhost:5555",)
    assert cfg.impl == "auto" and cfg.autostart and cfg.load_failure_policy == "recompute"


def test_lmcache_keys_map():
    cfg = parse_config({"lmcache.mp.host": "tcp://10.0.0.1", "lmcache.mp.port": "6000",
                        "lmcache.mp.mq_timeout": 300, "lmcache.mp.heartbeat_interval": 2,
                        "lmcache.mp.autostart": "false"}, env={})
    assert cfg.server_urls == ("tcp://10.0.0.1:6000",)
    assert cfg.control_timeout == 30.0  # capped: control calls wait seconds, not minutes
    assert cfg.heartbeat_interval == 2 and cfg.autostart is False


def test_server_urls_forms():
    urls = parse_config({"lmcache.mp.server_urls": "a:1, b:2"}, env={}).server_urls
    assert urls == ("tcp://a:1", "tcp://b:2")
    assert parse_config({"lmcache.mp.server_urls": ["ipc:///tmp/x"]}, env={}).server_urls == ("ipc:///tmp/x",)


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ({"kvconn.typo": 1}, "kvconn.typo"),
        ({"kvconn.impl": "fast"}, "kvconn.impl"),
        ({"lmcache.mp.port": 0}, "lmcache.mp.port"),
        ({"lmcache.mp.port": "x"}, "lmcache.mp.port"),
        ({"lmcache.mp.mq_timeout": -1}, "lmcache.mp.mq_timeout"),
        ({"lmcache.mp.heartbeat_interval": "soon"}, "lmcache.mp.heartbeat_interval"),
        ({"lmcache.mp.autostart": "maybe"}, "lmcache.mp.autostart"),
        ({"lmcache.mp.server_urls": 5}, "lmcache.mp.server_urls"),
        ({"lmcache.mp.server_urls": ""}, "lmcache.mp.server_urls"),
        ({"lmcache.mp.host": "http://x"}, "lmcache.mp"),
        ({"lmcache.mp.autostart.server_args": "--port 1"}, "server_args"),
        ({"kvconn.load_failure_policy": "retry"}, "kvconn.load_failure_policy"),
        ({"kvconn.lookup_timeout": 0}, "kvconn.lookup_timeout"),
        ({"kvconn.model_name": "a@b"}, "kvconn.model_name"),
        ({"kvconn.require_server": "2"}, "kvconn.require_server"),
    ],
)
def test_invalid_values_name_the_key(extra, needle):
    with pytest.raises(KVConnConfigError, match=needle.replace(".", r"\.")):
        parse_config(extra, env={})


def test_env_is_read_at_parse_time():
    assert parse_config({}, env={"KVCONN_IMPL": "builtin"}).impl == "builtin"
    with pytest.raises(KVConnConfigError, match="KVCONN_IMPL"):
        parse_config({}, env={"KVCONN_IMPL": "nope"})


def test_offloading_size_validated():
    assert parse_config({}, env={}, offloading_size_gb=8).offloading_size_gb == 8.0
    with pytest.raises(KVConnConfigError, match="kv_offloading_size"):
        parse_config({}, env={}, offloading_size_gb=-1)
