"""Connector configuration: ``kv_connector_extra_config`` + environment -> one frozen object.

The LMCache keys (``lmcache.mp.*``) are the ones LMCache's own connector reads, so one
config serves both implementations; ``kvconn.*`` keys are ours. Everything is validated
once, when the connector is built, and a bad value raises ``KVConnConfigError`` naming the
key and what it accepts. Environment variables are read here, at construction, never at
import: a script that sets them before building the engine must be obeyed.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kvconn_plugin.client.transport import normalize_url
from kvconn_plugin.errors import KVConnConfigError

IMPL_CHOICES = ("auto", "lmcache", "builtin")
DEFAULT_HOST = "tcp://localhost"
DEFAULT_PORT = 5555
DEFAULT_SERVER_ARGS = "--l1-size-gb 4 --eviction-policy LRU"

# Our keys and their meaning; anything else under "kvconn." is a typo and is rejected.
KVCONN_KEYS = {
    "kvconn.impl": "auto | lmcache | builtin: which connector class serves requests",
    "kvconn.require_server": "bool: fail start-up when no server answers",
    "kvconn.lookup_timeout": "seconds (>0): a lookup older than this counts as a miss",
    "kvconn.transfer_timeout": "seconds (>0): deadline of each store/retrieve call",
    "kvconn.connect_timeout": "seconds (>0): how long start-up waits for a server",
    "kvconn.load_failure_policy": "recompute | fail: what vLLM does when a load fails",
    "kvconn.store": "bool: write new KV to the server",
    "kvconn.store_staging_mb": "MiB (>=0): memory for chunks copied before their slots were lent",
    "kvconn.load": "bool: read KV hits from the server",
    "kvconn.model_name": "str: cache namespace (default: the model path/name)",
    "kvconn.kv_events_hashes": "vllm | lmcache: block hashes of our KV events (see README)",
}
LMCACHE_KEYS = (
    "lmcache.mp.host",
    "lmcache.mp.port",
    "lmcache.mp.server_urls",
    "lmcache.mp.mq_timeout",
    "lmcache.mp.heartbeat_interval",
    "lmcache.mp.autostart",
    "lmcache.mp.autostart.server_args",
    "lmcache.mp.autostart.wait_timeout",
)
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


@dataclass(frozen=True)
class KVConnConfig:
    """Validated settings shared by the scheduler and worker adapters."""

    server_urls: tuple[str, ...] = (f"{DEFAULT_HOST}:{DEFAULT_PORT}",)
    control_timeout: float = 5.0
    heartbeat_interval: float = 10.0
    autostart: bool = True
    autostart_server_args: tuple[str, ...] = tuple(shlex.split(DEFAULT_SERVER_ARGS))
    autostart_wait_timeout: float = 90.0
    offloading_size_gb: float | None = None
    impl: str = "auto"
    require_server: bool = False
    lookup_timeout: float = 2.0
    transfer_timeout: float = 30.0
    connect_timeout: float = 5.0
    load_failure_policy: str = "recompute"
    store: bool = True
    store_staging_mb: float = 256.0
    load: bool = True
    model_name: str | None = None
    kv_events_hashes: str = "vllm"
    extra: Mapping[str, Any] = field(default_factory=dict, repr=False)


def parse_config(
    extra: Mapping[str, Any] | None,
    env: Mapping[str, str] | None = None,
    *,
    offloading_size_gb: float | None = None,
) -> KVConnConfig:
    """Build the config from ``kv_connector_extra_config`` and the environment."""
    extra = dict(extra or {})
    env = os.environ if env is None else env
    for key in extra:
        if key.startswith("kvconn.") and key not in KVCONN_KEYS:
            raise KVConnConfigError(
                f"unknown key {key!r} in kv_connector_extra_config; accepted kvconn keys: "
                + ", ".join(sorted(KVCONN_KEYS))
            )
    impl = str(env.get("KVCONN_IMPL") or extra.get("kvconn.impl", "auto")).strip().lower()
    if impl not in IMPL_CHOICES:
        src = "KVCONN_IMPL" if env.get("KVCONN_IMPL") else "kvconn.impl"
        raise KVConnConfigError(f"{src}={impl!r} is not one of {', '.join(IMPL_CHOICES)}")
    policy = _choice(extra, "kvconn.load_failure_policy", ("recompute", "fail"), "recompute")
    server_args = extra.get("lmcache.mp.autostart.server_args", DEFAULT_SERVER_ARGS)
    if not isinstance(server_args, str):
        raise KVConnConfigError("lmcache.mp.autostart.server_args must be a string of server flags")
    args = tuple(shlex.split(server_args))
    for forbidden in ("--host", "--port", "--shm-name", "--supported-transfer-mode"):
        if forbidden in args:
            raise KVConnConfigError(
                f"lmcache.mp.autostart.server_args must not contain {forbidden}: "
                "the connector sets it from lmcache.mp.host/port"
            )
    urls = _server_urls(extra)
    autostart = _bool(extra, "lmcache.mp.autostart", len(urls) == 1)
    if autostart and len(urls) > 1:
        # LMCache refuses this too: autostart starts one local server.
        raise KVConnConfigError(
            "lmcache.mp.autostart starts one local server; with several "
            "lmcache.mp.server_urls start them yourself and set lmcache.mp.autostart=false"
        )
    size = offloading_size_gb
    if size is not None and (not isinstance(size, (int, float)) or size <= 0):
        raise KVConnConfigError(
            f"kv_offloading_size must be a positive number of GiB, got {size!r}"
        )
    return KVConnConfig(
        server_urls=urls,
        control_timeout=_positive(extra, "lmcache.mp.mq_timeout", 5.0, cap=30.0),
        heartbeat_interval=_positive(extra, "lmcache.mp.heartbeat_interval", 10.0),
        autostart=autostart,
        autostart_server_args=args,
        autostart_wait_timeout=_positive(extra, "lmcache.mp.autostart.wait_timeout", 90.0),
        offloading_size_gb=float(size) if size is not None else None,
        impl=impl,
        require_server=_bool(extra, "kvconn.require_server", False),
        lookup_timeout=_positive(extra, "kvconn.lookup_timeout", 2.0),
        transfer_timeout=_positive(extra, "kvconn.transfer_timeout", 30.0),
        connect_timeout=_positive(extra, "kvconn.connect_timeout", 5.0),
        load_failure_policy=policy,
        store=_bool(extra, "kvconn.store", True),
        store_staging_mb=_non_negative(extra, "kvconn.store_staging_mb", 256.0),
        load=_bool(extra, "kvconn.load", True),
        model_name=_opt_str(extra, "kvconn.model_name"),
        kv_events_hashes=_choice(extra, "kvconn.kv_events_hashes", ("vllm", "lmcache"), "vllm"),
        extra=extra,
    )


def check_topology(config: KVConnConfig, *, world_size: int, pipeline_parallel_size: int = 1,
                   data_parallel_size: int = 1) -> None:
    """Refuse the parallel layouts several servers cannot serve, as LMCache's connector
    does: ranks go to servers in contiguous blocks of ``world_size // n`` (so ``n`` must
    divide the world size), and neither pipeline nor data parallelism is supported with
    more than one server. One server accepts any layout."""
    n = len(config.server_urls)
    if n <= 1:
        return
    if pipeline_parallel_size > 1:
        raise KVConnConfigError(
            f"lmcache.mp.server_urls lists {n} servers, which supports tensor parallelism "
            f"only, not pipeline parallelism (pipeline_parallel_size={pipeline_parallel_size});"
            " list one server"
        )
    if data_parallel_size > 1:
        raise KVConnConfigError(
            f"lmcache.mp.server_urls lists {n} servers, which does not support data "
            f"parallelism (data_parallel_size={data_parallel_size}); list one server"
        )
    if world_size % n:
        raise KVConnConfigError(
            f"lmcache.mp.server_urls lists {n} servers but the world size (tensor x pipeline "
            f"parallel) is {world_size}: it must be a multiple of the number of servers, "
            "each server serving a contiguous block of ranks"
        )


def _server_urls(extra: Mapping[str, Any]) -> tuple[str, ...]:
    urls = extra.get("lmcache.mp.server_urls")
    if urls is not None:
        if isinstance(urls, str):
            items = [u for u in (p.strip() for p in urls.split(",")) if u]
        elif isinstance(urls, (list, tuple)) and all(isinstance(u, str) for u in urls):
            items = list(urls)
        else:
            raise KVConnConfigError(
                "lmcache.mp.server_urls must be a list of URLs or a comma-separated string"
            )
        if not items:
            raise KVConnConfigError("lmcache.mp.server_urls is empty")
    else:
        host = extra.get("lmcache.mp.host", DEFAULT_HOST)
        if not isinstance(host, str) or not host:
            raise KVConnConfigError("lmcache.mp.host must be a host such as tcp://localhost")
        port = extra.get("lmcache.mp.port", DEFAULT_PORT)
        try:
            port = int(port)
        except (TypeError, ValueError):
            port = -1
        if not 1 <= port <= 65535:
            raise KVConnConfigError(
                f"lmcache.mp.port must be an integer 1-65535, got {extra.get('lmcache.mp.port')!r}"
            )
        items = [f"{host}:{port}"]
    try:
        return tuple(normalize_url(u) for u in items)
    except ValueError as exc:
        raise KVConnConfigError(f"lmcache.mp server address: {exc}") from None


def _bool(extra: Mapping[str, Any], key: str, default: bool) -> bool:
    val = extra.get(key, default)
    if isinstance(val, bool):
        return val
    if isinstance(val, (int, str)) and str(val).strip().lower() in _TRUE | _FALSE:
        return str(val).strip().lower() in _TRUE
    raise KVConnConfigError(f"{key} must be a boolean (true/false), got {val!r}")


def _positive(
    extra: Mapping[str, Any], key: str, default: float, cap: float | None = None
) -> float:
    val = extra.get(key, default)
    try:
        num = float(val)
    except (TypeError, ValueError):
        num = float("nan")
    if isinstance(val, bool) or not num > 0 or num == float("inf"):
        raise KVConnConfigError(f"{key} must be a positive number of seconds, got {val!r}")
    return min(num, cap) if cap else num


def _non_negative(extra: Mapping[str, Any], key: str, default: float) -> float:
    val = extra.get(key, default)
    try:
        num = float(val)
    except (TypeError, ValueError):
        num = float("nan")
    if isinstance(val, bool) or not num >= 0 or num == float("inf"):
        raise KVConnConfigError(f"{key} must be a number >= 0, got {val!r}")
    return num


def _choice(extra: Mapping[str, Any], key: str, choices: tuple[str, ...], default: str) -> str:
    val = extra.get(key, default)
    if not isinstance(val, str) or val.lower() not in choices:
        raise KVConnConfigError(f"{key} must be one of {', '.join(choices)}, got {val!r}")
    return val.lower()


def _opt_str(extra: Mapping[str, Any], key: str) -> str | None:
    val = extra.get(key)
    if val is None:
        return None
    if not isinstance(val, str) or not val or "@" in val:
        raise KVConnConfigError(f"{key} must be a non-empty string without '@', got {val!r}")
    return val
