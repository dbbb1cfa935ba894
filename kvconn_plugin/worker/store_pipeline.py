"""Stores that never hold the forward pass, or vLLM's blocks, hostage to the network.

A store is PREPARE_STORE (the server lends slots of its SHM pool), a copy of the chunk's
blocks into them, then COMMIT_STORE. Only the copy touches vLLM's blocks, and it always
happens inside ``wait_for_save`` of the step that planned the store, before vLLM can free,
preempt-and-reuse or slide a window over those blocks. The two network legs are off the
engine thread's critical path:

* PREPARE_STORE goes out when the step's metadata is bound, before the forward, so its reply
  is normally back by ``wait_for_save``: the blocks are then gathered straight into the lent
  slots (one copy).
* A reply not back yet (slow or dead server) does not wait: the blocks are gathered into a
  private staging buffer from a bounded budget, and a finisher thread copies them into the
  slots when (if) the reply arrives. With no budget left the store is dropped.
* COMMIT_STORE is sent without waiting; its outcome is only counted.

So ``request_finished`` never has to keep blocks for a store, preemption needs no flush
(``tests/e2e/test_preemption_e2e.py`` preempts under a tiny KV cache with PREPARE_STORE
replies held back, then loads what was stored), and the engine step waits on no reply. A
failure anywhere drops the store (counted, logged at a limited rate); the chunks are
recomputed and stored another time.

With KV events on, every store begun reports once when it settles (``store_acks``): the
chunks whose COMMIT_STORE the server confirmed, none for a dropped store. Chunks the server
left out of its PREPARE_STORE reply (already cached, or no room) are not among them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kvconn_plugin.client.protocol import PrepareStoreReply
from kvconn_plugin.client.reply_future import ReplyFuture
from kvconn_plugin.errors import (
    KVConnError,
    KVConnInFlightLost,
    KVConnProtocolError,
    KVConnTimeout,
    KVConnUnavailable,
)
from kvconn_plugin.metadata import TransferSpec
from kvconn_plugin.store_acks import StoreAckRecorder
from kvconn_plugin.utils import RateLimitedLog
from kvconn_plugin.worker.session import ChunkPlan, ServerSession

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)
_warn = RateLimitedLog(logger, interval=30.0)


@dataclass(eq=False)
class PendingStore:
    spec: TransferSpec
    plan: ChunkPlan
    prepared: ReplyFuture
    t0: float = field(default_factory=time.perf_counter)
    staged: list[torch.Tensor] | None = None  # one staging buffer per chunk
    pooled: bool = False  # staged buffers come from (and go back to) the budget
    ready: Any = None  # CUDA event after which the staged bytes are complete


class StorePipeline:
    """Args:
        session: the worker's registration (client, layout, transfer, stats).
        staging_bytes: budget for chunks gathered before their slots were lent.
        acks: where settled stores are reported (KV events on), or None.
    """

    def __init__(self, session: ServerSession, staging_bytes: int,
                 acks: StoreAckRecorder | None = None):
        self.session = session
        self.acks = acks
        self.stats = session.stats
        self._budget = max(0, int(staging_bytes))
        self._lock = threading.Lock()
        self._staged_bytes = 0
        self._free: list[torch.Tensor] = []  # staging buffers of one chunk, for reuse
        self._in_flight = 0  # stores begun whose commit has not settled
        self._idle = threading.Condition(self._lock)
        self._finisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvconn-store")

    # ------------------------------------------------------------------ engine thread

    def begin(self, specs: Sequence[TransferSpec]) -> list[PendingStore]:
        """Send PREPARE_STORE for each spec (bind time, before the forward). Never blocks."""
        out = []
        s = self.session
        for spec in specs:
            try:
                plan = s.plan(spec, store=True)
                s.unsettled_commits.forget(plan.key)  # never commit a fresh reservation
                fut = s.client.prepare_store_async(plan.key, s.instance_id)
            except KVConnError as exc:
                self._dropped(spec, exc)
                if self.acks is not None:
                    self.acks.record(spec, ())
                continue
            with self._lock:
                self._in_flight += 1
            out.append(PendingStore(spec, plan, fut))
        return out

    def copy(self, pending: Sequence[PendingStore]) -> None:
        """Copy each store's blocks out of vLLM's cache now (``wait_for_save``); the network
        legs finish in the background."""
        for p in pending:
            try:
                if p.prepared.done():
                    self._finish(p)
                elif not self._stage(p):
                    # Its reply may still lend slots we can no longer fill.
                    p.prepared.add_done_callback(lambda f, p=p: self._orphaned(p, f))
                    self._settle(p, KVConnUnavailable("PREPARE_STORE still unanswered and the "
                                                      "staging budget is spent"))
                else:
                    p.prepared.add_done_callback(lambda _f, p=p: self._submit_finish(p))
            except KVConnError as exc:
                self._settle(p, exc)
            except Exception as exc:  # a bug here must not kill the engine
                logger.exception("kvconn: unexpected error storing %s", p.spec.request_id)
                self._settle(p, exc)

    # ------------------------------------------------------------------ both threads

    def _finish(self, p: PendingStore) -> None:
        """The PREPARE_STORE reply is in: fill the slots and commit."""
        s = self.session
        try:
            reply: PrepareStoreReply = p.prepared.result()
        except KVConnError as exc:
            if isinstance(exc, (KVConnTimeout, KVConnInFlightLost)):
                self._note_orphaned(p, p.plan.nchunks, certain=False)
            s.failed(exc)
            raise
        ctx, plan = reply.context, p.plan
        if plan.pool is None:
            return self._commit_pickled(p)
        if not ctx.slots:
            return self._settle(p, None)  # all cached already, or no room
        if plan.pool is not s.pool:
            raise KVConnUnavailable("the server's SHM pool changed (server restarted)")
        views = []
        for slot, ci in zip(ctx.slots, ctx.chunk_indices, strict=True):
            if ci >= plan.nchunks:
                raise KVConnProtocolError(f"prepare_store: chunk index {ci} >= {plan.nchunks}")
            views.append((ci, plan.pool.slot_view(slot, plan.shape, s.dtype_name)))
        with s.xfer_lock:
            for ci, view in views:
                if p.staged is not None:
                    view.copy_(p.staged[ci])
                else:
                    s.copier.gather(plan.chunk_blocks(ci), view)
            direct_cuda = p.staged is None and s.layout.device != "cpu"
            if direct_cuda:
                import torch

                # Queued behind the forward on the compute stream: commit once they landed,
                # off the engine thread.
                p.ready = torch.cuda.Event()
                p.ready.record()
        committed = tuple(ci for ci, _ in views)
        if direct_cuda:
            self._finisher.submit(self._commit_when_ready, p, committed)
        else:
            self._commit(p, b"", committed)

    def _commit_pickled(self, p: PendingStore) -> None:
        from kvconn_plugin.client import pickle_codec

        s, plan = self.session, p.plan
        if p.staged is None and not self._stage(p, pooled=False):
            raise KVConnUnavailable("no memory to pickle the chunks")
        self._wait_staged(p)
        data = pickle_codec.encode_chunks(p.staged or [], plan.shape, s.dtype_name)
        self._commit(p, data, tuple(range(plan.nchunks)))

    def _commit_when_ready(self, p: PendingStore, committed: tuple[int, ...]) -> None:
        try:
            self._wait_staged(p)
            self._commit(p, b"", committed)
        except Exception as exc:
            self._settle(p, exc)

    def _commit(self, p: PendingStore, data: bytes, committed: tuple[int, ...]) -> None:
        s = self.session
        try:
            fut = s.client.commit_store_async(p.plan.key, s.instance_id, data)
        except KVConnUnavailable as exc:
            if not data:  # never sent, so the reservation is certainly still pending
                s.unsettled_commits.add(p.plan.key, exc)
            raise
        fut.add_done_callback(lambda f: self._committed(p, f, committed, retry=not data))

    def _committed(self, p: PendingStore, fut: ReplyFuture, committed: tuple[int, ...],
                   retry: bool = False) -> None:
        exc = fut.exception()
        if retry and isinstance(exc, (KVConnTimeout, KVConnInFlightLost, KVConnUnavailable)):
            # The server may never have seen it: its reservation would stay write-locked.
            self.session.unsettled_commits.add(p.plan.key, exc)
        if exc is None and fut.result() is not True:
            exc = KVConnProtocolError("commit_store refused (reservation expired?)")
        if exc is not None and isinstance(exc, KVConnError):
            self.session.failed(exc)
        self._settle(p, exc, committed)

    # ------------------------------------------------------------------ staging

    def _stage(self, p: PendingStore, pooled: bool = True) -> bool:
        """Gather every chunk into private buffers; False when the budget is spent."""
        s, plan = self.session, p.plan
        nbytes = s.chunk_bytes
        buffers = self._take(plan.nchunks, nbytes) if pooled else self._alloc(plan.nchunks, nbytes)
        if buffers is None:
            return False
        p.staged, p.pooled = buffers, pooled
        if pooled:
            self.stats.record("stores_staged")
        with s.xfer_lock:
            for ci, buf in enumerate(buffers):
                s.copier.gather(plan.chunk_blocks(ci), buf)
            if s.layout.device != "cpu":
                import torch

                p.ready = torch.cuda.Event()
                p.ready.record()
        return True

    def _wait_staged(self, p: PendingStore) -> None:
        if p.ready is not None:
            p.ready.synchronize()

    def _take(self, n: int, nbytes: int) -> list[torch.Tensor] | None:
        with self._lock:
            fresh = n - min(n, len(self._free))
            if self._staged_bytes + fresh * nbytes > self._budget:
                return None
            self._staged_bytes += fresh * nbytes
            reused = [self._free.pop() for _ in range(n - fresh)]
        return reused + self._alloc(fresh, nbytes)

    def _alloc(self, n: int, nbytes: int) -> list[torch.Tensor]:
        import torch

        pin = self.session.layout.device != "cpu"
        return [torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin) for _ in range(n)]

    def _release(self, p: PendingStore) -> None:
        staged, p.staged = p.staged, None
        if staged and p.pooled:
            with self._lock:
                self._free.extend(staged)

    def _submit_finish(self, p: PendingStore) -> None:
        # On the I/O thread (the reply's callback): hand the copy to the finisher.
        try:
            self._finisher.submit(self._finish_staged, p)
        except RuntimeError:  # shutting down
            self._settle(p, KVConnUnavailable("shutting down"))

    def _finish_staged(self, p: PendingStore) -> None:
        try:
            self._wait_staged(p)
            self._finish(p)
        except Exception as exc:
            if not isinstance(exc, KVConnError):
                logger.exception("kvconn: unexpected error storing %s", p.spec.request_id)
            self._settle(p, exc)

    # ------------------------------------------------------------------ outcome

    def _settle(self, p: PendingStore, exc: BaseException | None,
                committed: tuple[int, ...] = ()) -> None:
        self._release(p)
        if exc is not None:
            committed = ()
        if self.acks is not None:
            self.acks.record(p.spec, committed)
        if exc is None:
            chunks = len(committed)
            if chunks:
                nbytes = chunks * self.session.chunk_bytes
                self.stats.record("stored_chunks", chunks)
                self.stats.record("stored_bytes", nbytes)
                self.stats.record("store_seconds", time.perf_counter() - p.t0)
        else:
            self._dropped(p.spec, exc)
        with self._idle:
            self._in_flight -= 1
            self._idle.notify_all()

    def _orphaned(self, p: PendingStore, fut: ReplyFuture) -> None:
        """A dropped store's PREPARE_STORE was answered after all: the slots it lent stay
        reserved, unfilled."""
        if fut.exception() is None:
            n = len(fut.result().context.slots)
            if n:
                self._note_orphaned(p, n, certain=True)

    def _note_orphaned(self, p: PendingStore, chunks: int, certain: bool) -> None:
        # Not rate-limited: each line explains write locks an operator sees on the server
        # for the next 10 minutes (LMCache 0.5.6 has no call that cancels a reservation).
        self.stats.record("store_orphaned_chunks", chunks)
        logger.info("kvconn: store of %s: the server holds %s%d chunk(s) write-reserved "
                    "until its write TTL (PREPARE_STORE %s)", p.spec.request_id,
                    "" if certain else "up to ", chunks,
                    "answered after the store was dropped" if certain else "outcome unknown")

    def _dropped(self, spec: TransferSpec, exc: BaseException) -> None:
        self.stats.record("store_failures")
        _warn.warning("store", "kvconn: store of %s dropped (%s)", spec.request_id, exc)

    def wait_idle(self, timeout: float) -> bool:
        """Until every store begun so far has settled (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._in_flight > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def close(self) -> None:
        self._finisher.shutdown(wait=True, cancel_futures=True)
