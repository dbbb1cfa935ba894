"""Our own LMCache MP wire client: protocol structs, ZeroMQ transport, SHM pool."""

from kvconn_plugin.client.api import LMCacheClient, new_instance_id
from kvconn_plugin.client.protocol import CacheKey, Op, RegisterEngineDrivenPayload

__all__ = ["CacheKey", "LMCacheClient", "Op", "RegisterEngineDrivenPayload", "new_instance_id"]
