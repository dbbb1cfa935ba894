"""kvconn_plugin: a vLLM KV connector backed by an external LMCache multiprocess server.

Importing this package stays cheap on purpose: vLLM loads the plugin in every process,
so nothing here imports torch, vLLM or lmcache.
"""

__version__ = "0.1.0"

CONNECTOR_NAME = "KVConnPluginConnector"
