"""Registry target for ``KVConnPluginConnector``: the class is looked up through the
resolver each time vLLM asks (PEP 562), so the environment is read at resolution time."""

from __future__ import annotations


def __getattr__(name: str):
    if name in ("KVConnPluginConnector", "LMCacheMPConnector"):
        from kvconn_plugin.resolver import resolve_connector_class

        return resolve_connector_class()[0]
    raise AttributeError(name)
