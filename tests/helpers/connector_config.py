"""Our connector's configuration against a given LMCache server, for every kind of test.

One place spells out the connector's name, module path and the server address keys, so the
scheduler-harness, end-to-end and failure tests cannot drift apart.
"""

from __future__ import annotations

from typing import Any

CONNECTOR = "KVConnPluginConnector"
MODULE_PATH = "kvconn_plugin.connector"


def server_extra_config(server_url: str, **extra: Any) -> dict[str, Any]:
    """``kv_connector_extra_config`` pointing at ``server_url`` with autostart off, plus
    ``extra``."""
    host, port = server_url.rsplit(":", 1)
    return {"lmcache.mp.host": host, "lmcache.mp.port": int(port),
            "lmcache.mp.autostart": False, **extra}


def kv_transfer_config(server_url: str, **extra: Any) -> dict[str, Any]:
    """vLLM's ``kv_transfer_config`` for our connector against ``server_url``."""
    return {
        "kv_connector": CONNECTOR,
        "kv_connector_module_path": MODULE_PATH,
        "kv_role": "kv_both",
        "kv_connector_extra_config": server_extra_config(server_url, **extra),
    }
