"""Which connector class serves a request for ``KVConnPluginConnector`` (or, routed through
us, vLLM's ``LMCacheMPConnector``).

``auto`` prefers the connector shipped inside the ``lmcache`` package when it imports and
passes our compatibility checks, else ours. ``lmcache`` forces LMCache's (failing loudly
when it cannot be used), ``builtin`` forces ours. The choice comes from ``KVCONN_IMPL`` or
``kvconn.impl`` and is made when vLLM resolves the class, never at import time, so scripts
may set the variable right before building the engine. One log line says what was chosen
and why.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import logging
import os
from collections.abc import Mapping
from typing import Any

from kvconn_plugin.errors import KVConnConfigError

logger = logging.getLogger(__name__)

LMCACHE_CONNECTOR_MODULE = "lmcache.integration.vllm.lmcache_mp_connector"
LMCACHE_ADAPTER_MODULE = "lmcache.integration.vllm.vllm_multi_process_adapter"
MIN_LMCACHE = (0, 5, 6)
_PARALLEL_FIELDS = ("mla_only", "vllm_world_size", "vllm_worker_id", "tp_size", "pp_size",
                    "n_servers")
_logged: set[tuple[str, str]] = set()


def _version_tuple(text: str) -> tuple[int, ...]:
    out = []
    for part in text.split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


def lmcache_connector_class() -> tuple[type | None, str]:
    """LMCache's own connector class if usable, with the reason either way."""
    try:
        version = importlib.metadata.version("lmcache")
    except importlib.metadata.PackageNotFoundError:
        return None, "the lmcache package is not installed"
    if _version_tuple(version) < MIN_LMCACHE:
        return None, f"lmcache {version} is older than 0.5.6"
    try:
        module = importlib.import_module(LMCACHE_CONNECTOR_MODULE)
        cls = module.LMCacheMPConnector
        adapters = importlib.import_module(LMCACHE_ADAPTER_MODULE)
    except Exception as exc:  # any import failure means "not usable"
        return None, f"lmcache's connector does not import ({type(exc).__name__}: {exc})"
    if "kv_cache_config" not in inspect.signature(cls.__init__).parameters:
        return None, "lmcache's connector lacks the kv_cache_config constructor argument"
    strategy = getattr(adapters, "ParallelStrategy", None)
    sched = getattr(adapters, "LMCacheMPSchedulerAdapter", None)
    fields = getattr(strategy, "__dataclass_fields__", None) or {}
    if strategy is None or sched is None or any(f not in fields for f in _PARALLEL_FIELDS):
        return None, "lmcache's adapters do not have the ParallelStrategy fields it needs"
    if "server_urls" not in inspect.signature(sched.__init__).parameters:
        return None, "lmcache's scheduler adapter does not take server_urls"
    return cls, f"lmcache {version} is installed and compatible"


def requested_impl(extra: Mapping[str, Any] | None = None) -> str:
    impl = (os.environ.get("KVCONN_IMPL") or (extra or {}).get("kvconn.impl") or "auto")
    impl = str(impl).strip().lower()
    if impl not in ("auto", "lmcache", "builtin"):
        raise KVConnConfigError(
            f"KVCONN_IMPL / kvconn.impl = {impl!r}; accepted: auto, lmcache, builtin"
        )
    return impl


def resolve_connector_class(extra: Mapping[str, Any] | None = None) -> tuple[type, str]:
    """Return ``(class, reason)`` for the configured implementation."""
    impl = requested_impl(extra)
    if impl == "builtin":
        cls, reason = _builtin(), "kvconn.impl/KVCONN_IMPL=builtin"
    else:
        lm_cls, why = lmcache_connector_class()
        if lm_cls is not None:
            cls, reason = lm_cls, why
        elif impl == "lmcache":
            raise KVConnConfigError(f"KVCONN_IMPL/kvconn.impl=lmcache but {why}")
        else:
            cls, reason = _builtin(), f"auto: {why}"
    key = (cls.__module__ + "." + cls.__qualname__, reason)
    if key not in _logged:
        _logged.add(key)
        logger.info("kvconn: using %s (%s)", key[0], reason)
    return cls, reason


def _builtin() -> type:
    from kvconn_plugin.connector import KVConnPluginConnector

    return KVConnPluginConnector
