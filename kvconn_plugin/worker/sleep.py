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
from collections.abc import Callable
from typing import Any

from kvconn_plugin.errors import KVConnTransferError

logger = logging.getLogger(__name__)


class UnregisteredTransfer:
    """Stands in for the copy engine while vLLM sleeps: every copy is refused before it
    touches memory (a load then fails and vLLM recomputes; a store is dropped). Remembers
    the geometry and layer addresses it replaced, to compare on wake-up."""

    def __init__(self, layout: Any, addresses: list[int]):
        self.layout = layout
        self.addresses = addresses

    def gather(self, block_ids: Any, dst: Any, stream: Any = None) -> None:
        raise KVConnTransferError("the KV cache is unregistered (vLLM sleep mode)")

    def scatter(self, src: Any, block_ids: Any, skip_blocks: int = 0, stream: Any = None) -> None:
        raise KVConnTransferError("the KV cache is unregistered (vLLM sleep mode)")

    def synchronize(self) -> None:
        return None


def suspend(session: Any, views: list[Any]) -> UnregisteredTransfer:
    """Swap the session's copy engine for a refusing one; returns it. A copy already
    running finishes first: the swap waits for it."""
    stub = UnregisteredTransfer(session.layout, [v.data_ptr() for v in views])
    session.swap_transfer(stub)
    return stub


def resume(session: Any, stub: UnregisteredTransfer, views: list[Any],
           bind: Callable[[list[Any]], tuple[Any, Any]]) -> bool:
    """Bind the views again after wake-up with ``bind`` (the registration's own geometry
    and pointer checks); True when the cache is usable again."""
    try:
        layout, transfer = bind(views)
        if layout != stub.layout:
            raise KVConnTransferError(f"KV geometry changed across sleep: {stub.layout} -> "
                                      f"{layout}")
    except Exception as exc:  # KVConnTransferError, or anything else: the cache stays off
        logger.error("kvconn: cannot bind the KV cache again after wake-up (%s); serving "
                     "without the KV cache on this worker", exc)
        return False
    moved = sum(v.data_ptr() != a for v, a in zip(views, stub.addresses, strict=True))
    logger.info("kvconn: KV cache bound again after wake-up (%d of %d layer views moved)",
                moved, len(views))
    session.swap_transfer(transfer)
    return True
