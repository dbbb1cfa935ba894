"""``vllm.general_plugins`` entry point.

vLLM calls :func:`register` in every process (front end, EngineCore, workers), sometimes
twice, before any connector class is resolved. It must be idempotent, cheap (no lmcache,
no CUDA) and must never raise into vLLM.

What it does:
* registers ``KVConnPluginConnector`` with vLLM's connector factory;
* routes the names we serve (ours, and vLLM's ``LMCacheMPConnector`` that
  ``--kv-offloading-backend lmcache`` selects) through our resolver, which sees the
  request's ``kv_connector_extra_config``. ``KVCONN_ROUTE_LMCACHE_MP=0`` leaves
  ``LMCacheMPConnector`` to vLLM.
"""

from __future__ import annotations

import contextlib
import logging
import os

from kvconn_plugin import CONNECTOR_NAME

logger = logging.getLogger(__name__)

LMCACHE_MP_NAME = "LMCacheMPConnector"
_ROUTED_ATTR = "_kvconn_routed"


def route_lmcache_mp() -> bool:
    value = os.environ.get("KVCONN_ROUTE_LMCACHE_MP", "1").strip().lower()
    return value not in ("0", "false", "no", "off")


def register() -> None:
    try:
        from kvconn_plugin.logs import attach_to_vllm_logging

        attach_to_vllm_logging()
        _register()
    except Exception:  # a plugin must never take vLLM down
        logger.exception("kvconn: plugin registration failed; the connector is unavailable")


def _register() -> None:
    try:
        from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
    except ImportError:
        logger.debug("kvconn: vLLM not importable; nothing to register")
        return
    with contextlib.suppress(ValueError):  # already registered in this process
        KVConnectorFactory.register_connector(CONNECTOR_NAME, "kvconn_plugin.resolved",
                                              CONNECTOR_NAME)
    _wrap_get_connector_class(KVConnectorFactory)


def _wrap_get_connector_class(factory: type) -> None:
    """Resolve our names with the request's extra config in hand (the registry's zero-arg
    loaders cannot see it). Wrapped once per process."""
    current = factory.__dict__["get_connector_class"]
    if getattr(current.__func__, _ROUTED_ATTR, False):
        return
    original = current.__func__

    def get_connector_class(cls, kv_transfer_config):
        name = getattr(kv_transfer_config, "kv_connector", None)
        if not getattr(kv_transfer_config, "kv_connector_module_path", None) and (
            name == CONNECTOR_NAME or (name == LMCACHE_MP_NAME and route_lmcache_mp())
        ):
            from kvconn_plugin.resolver import resolve_connector_class

            extra = getattr(kv_transfer_config, "kv_connector_extra_config", None) or {}
            return resolve_connector_class(extra)[0]
        return original(cls, kv_transfer_config)

    setattr(get_connector_class, _ROUTED_ATTR, True)
    factory.get_connector_class = classmethod(get_connector_class)
