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
from typing import Any

from kvconn_plugin.errors import KVConnTransferError

logger = logging.getLogger(__name__)


class UnregisteredTransfer:
    """Stands in for the copy engine while vLLM sleeps: every copy is refused before it
    touches memory (a load then fails and vLLM recomputes; a store is dropped)."""

    def __init__(self, layout: Any, bases: list[int]):
        self.layout = layout
        self.bases = bases

    def gather(self, block_ids: Any, dst: Any, stream: Any = None) -> None:
        raise KVConnTransferError("the KV cache is unregistered (vLLM sleep mode)")

    def scatter(self, src: Any, block_ids: Any, skip_blocks: int = 0, stream: Any = None) -> None:
        raise KVConnTransferError("the KV cache is unregistered (vLLM sleep mode)")

    def synchronize(self) -> None:
        return None


def suspend(session: Any, layout: Any, views: list[Any]) -> UnregisteredTransfer:
    """Swap the session's copy engine for a refusing one; returns it (holds the old layout
    and pointers). A copy already running finishes first: the swap waits for it."""
    from kvconn_plugin.ops import layout as layout_mod

    stub = UnregisteredTransfer(layout, layout_mod.layer_base_pointers(layout, views))
    session.swap_transfer(stub)
    return stub


def resume(session: Any, stub: UnregisteredTransfer, views: list[Any], head_size: int,
           kv_split: str) -> bool:
    """Bind the views again after wake-up; True when the cache is usable again."""
    from kvconn_plugin import ops
    from kvconn_plugin.ops import layout as layout_mod

    try:
        layout = ops.layout_from_vllm_views(views, head_size, kv_split)
        if layout != stub.layout:
            raise KVConnTransferError(f"KV geometry changed across sleep: {stub.layout} -> "
                                      f"{layout}")
        bases = layout_mod.layer_base_pointers(layout, views)
        transfer = ops.KVTransfer(layout, views)
    except KVConnTransferError as exc:
        logger.error("kvconn: cannot bind the KV cache again after wake-up (%s); serving "
                     "without the KV cache on this worker", exc)
        return False
    moved = sum(a != b for a, b in zip(bases, stub.bases, strict=True))
    logger.info("kvconn: KV cache bound again after wake-up (%d of %d layer pointers moved)",
                moved, len(bases))
    session.swap_transfer(transfer)
    return True
