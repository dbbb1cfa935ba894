"""vLLM 0.33 sleep mode on the worker: stop touching the KV memory before vLLM unmaps it,
and bind it again, checked, after wake-up.

vLLM's default sleep backend (cumem) keeps each KV tensor's virtual address: sleep unmaps and
releases the physical pages, wake-up maps fresh ones at the same addresses, and the KV
content is gone (it is not offloaded). So after wake-up the same views are valid again; we
still re-derive the geometry and every layer pointer from them, bounds-checked, rather than
trust that, and keep the cache off on this worker if anything changed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from kvconn_plugin.errors import KVConnTransferError

logger = logging.getLogger(__name__)


class UnregisteredCopier:
    """Stands in for the session's copier while vLLM sleeps: every copy is refused before it
    touches memory (a load then fails and vLLM recomputes; a store is dropped). Remembers
    the geometry and layer addresses it replaced, to compare on wake-up."""

    def __init__(self, copier: Any, addresses: list[int]):
        self.layout = copier.layout
        self.num_layers = copier.num_layers
        self.parts = copier.parts
        self.geometry = geometry(copier)
        self.addresses = addresses

    def gather(self, group_blocks: Any, dst: Any) -> None:
        raise KVConnTransferError("the KV cache is unregistered (vLLM sleep mode)")

    def scatter(self, src: Any, group_blocks: Any, skips: Any) -> None:
        raise KVConnTransferError("the KV cache is unregistered (vLLM sleep mode)")

    def synchronize(self) -> None:
        return None


def geometry(copier: Any) -> tuple:
    """What must not change across a sleep: every group's layout and place in the object."""
    return tuple((p.transfer.layout, p.first_layer, p.num_layers) for p in copier.parts)


def suspend(session: Any, kv_caches: Mapping[str, Any]) -> UnregisteredCopier:
    """Swap the session's copier for a refusing one; returns it. A copy already running
    finishes first: the swap waits for it."""
    stub = UnregisteredCopier(session.copier, [v.data_ptr() for v in kv_caches.values()])
    session.swap_copier(stub)
    return stub


def resume(session: Any, stub: UnregisteredCopier, kv_caches: Mapping[str, Any],
           bind: Callable[[Mapping[str, Any]], Any]) -> bool:
    """Bind the views again after wake-up with ``bind`` (the registration's own geometry
    and pointer checks); True when the cache is usable again."""
    try:
        copier = bind(kv_caches)
        if geometry(copier) != stub.geometry:
            raise KVConnTransferError("KV geometry changed across sleep")
    except Exception as exc:  # KVConnTransferError, or anything else: the cache stays off
        logger.error("kvconn: cannot bind the KV cache again after wake-up (%s); serving "
                     "without the KV cache on this worker", exc)
        return False
    moved = sum(v.data_ptr() != a
                for v, a in zip(kv_caches.values(), stub.addresses, strict=True))
    logger.info("kvconn: KV cache bound again after wake-up (%d of %d layer views moved)",
                moved, len(stub.addresses))
    session.swap_copier(copier)
    return True
