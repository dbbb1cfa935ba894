"""Typed errors. Callers decide per type: config errors stop start-up, transport and
protocol errors turn into "recompute" for vLLM."""

from __future__ import annotations


class KVConnError(Exception):
    """Base class of every error this package raises on purpose."""


class KVConnConfigError(KVConnError, ValueError):
    """A configuration value is invalid; the message names the key and what is accepted."""


class KVConnUnavailable(KVConnError, ConnectionError):
    """No LMCache server answers at the configured address."""


class KVConnTimeout(KVConnError, TimeoutError):
    """A server call got no reply within its deadline; its outcome is unknown."""


class KVConnChunkSizeMismatch(KVConnError):
    """Servers of one engine report different chunk sizes: the cache cannot be used."""


class KVConnProtocolError(KVConnError):
    """A reply (or shared-memory descriptor) did not match the protocol."""


class KVConnInFlightLost(KVConnUnavailable):
    """A request reached the server but its reply never will (connection lost, or the
    server stopped answering): like a timeout, the server may still have acted on it."""


class KVConnClosed(KVConnUnavailable):
    """The client was closed while the call was pending."""


class KVConnTransferError(KVConnError):
    """A gather/scatter argument was rejected before anything was written."""
