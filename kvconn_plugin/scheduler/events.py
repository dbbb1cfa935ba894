"""KV events for cache-aware routers: the chunks we keep in the LMCache tier, and their loss.

Routers (llm-d, Dynamo, vLLM's router) pick a replica by matching a prompt's vLLM block
hashes against the ``BlockStored``/``BlockRemoved`` events each engine publishes. vLLM
publishes its own GPU blocks; this module adds the chunks we offloaded, in the shape of
vLLM's own offloading connector: one ``BlockStored`` per stored chunk, carrying the vLLM
block hashes of its blocks (the very hashes of vLLM's GPU events for the same tokens), the
parent block's hash, the chunk's token ids, ``block_size`` = vLLM's block size and
``medium="CPU"``.

* A chunk is announced once every writing worker reported its COMMIT_STORE confirmed
  (``store_acks``), at the first engine step after that (stores settle in the background;
  an idle engine announces at its next step). Chunks the server reported as already cached
  are not announced by this store (they were announced when first stored, if by us).
* Evictions: the server's event stream reports each evicted chunk by the server's own chunk
  hash (``chunk_hash``); we keep, per announced chunk, that hash next to the vLLM hashes and
  publish ``BlockRemoved`` for the latter. A chunk evicted between its commit and its
  confirmation is not announced at all.
* When the log cannot be followed (server restarted, records lost, stream gone), everything
  announced is withdrawn; so is everything a successful reset cleared.

All state is touched on the scheduler thread only; the stream thread just queues.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from vllm.distributed.kv_events import MEDIUM_CPU, BlockRemoved, BlockStored, KVCacheEvent
from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash

from kvconn_plugin.client.chunk_hash import chunk_hashes
from kvconn_plugin.client.event_stream import KVEventRecord, ServerEventStream
from kvconn_plugin.metadata import TransferSpec
from kvconn_plugin.store_acks import StoreAckBatch
from kvconn_plugin.utils import RateLimitedLog

logger = logging.getLogger(__name__)
_warn = RateLimitedLog(logger, interval=60.0)

GROUP_IDX = 0  # one full-attention KV cache group, as vLLM's GPU events number it
ACK_TIMEOUT = 300.0  # a store unconfirmed this long was dropped by a worker
MAX_PENDING = 65536  # stores awaiting confirmation
MAX_ANNOUNCED = 262144  # chunks announced and not withdrawn (~67M tokens at chunk 256)
MAX_REMOVED_MEMORY = 65536  # recent evictions remembered to veto late confirmations
_STORED_FIELDS = frozenset(BlockStored.__struct_fields__)


@dataclass(slots=True)
class _Chunk:
    server_hash: bytes  # the server's name for the chunk: what evictions report
    key: Any  # the chunk's last vLLM block hash: identity of the announcement
    event: BlockStored


@dataclass(slots=True)
class _Pending:
    planned_at: float
    chunks: list[_Chunk]
    acks: int = 0  # workers that reported this store settled
    commits: list[int] = field(default_factory=list)  # per chunk: workers that committed it


class OffloadEvents:
    """Args:
        block_size: vLLM's block size (tokens per block hash in the events).
        writers: workers that store each chunk (one confirmation each).
        hash_block_size: granularity of ``request.block_hashes`` (vLLM's hash block size).
        hashes: "vllm" (default: vLLM's block hashes, what routers match prompts with) or
            "lmcache" (one hash per chunk, the server's own, as LMCache's connector emits:
            for routers set up for LMCache's events).
    """

    def __init__(self, *, block_size: int, writers: int, hash_block_size: int | None = None,
                 hashes: str = "vllm"):
        self.lmcache_hashes = hashes == "lmcache"
        self.block_size = block_size
        self.hash_block_size = hash_block_size or block_size
        self.writers = max(1, writers)
        self.streams: list[ServerEventStream] = []
        self._requests: dict[str, Any] = {}
        self._server_hashes: dict[str, list[bytes]] = {}
        self._pending: collections.OrderedDict[tuple[str, int, int], _Pending] = (
            collections.OrderedDict())
        # server chunk hash -> {announcement key -> its vLLM block hashes}, oldest first
        self._announced: collections.OrderedDict[bytes, dict[Any, list[Any]]] = (
            collections.OrderedDict())
        self._announced_keys: set[Any] = set()
        self._removed_at: collections.OrderedDict[bytes, float] = collections.OrderedDict()
        self._inbox: collections.deque[tuple[str, Any, float]] = collections.deque()
        self._out: list[KVCacheEvent] = []

    # ------------------------------------------------------------------ set-up

    def start_streams(self, urls: Sequence[str], model_name: str, *, interval: float,
                      control_timeout: float) -> None:
        """Follow every server's evictions (a thread each; see ``event_stream``). With
        several servers each holds its rank block's share of a chunk: a chunk evicted from
        any of them is no longer a hit, and a server whose log is lost withdraws all."""
        for url in urls:
            stream = ServerEventStream(url, model_name, self, interval=interval,
                                       control_timeout=control_timeout)
            self.streams.append(stream)
            stream.start()

    @property
    def live(self) -> bool:
        """Whether every server's eviction log is being followed now."""
        return bool(self.streams) and all(s.live for s in self.streams)

    def close(self) -> None:
        streams, self.streams = self.streams, []
        for stream in streams:
            stream.close()

    # ------------------------------------------------------------------ EventSink (stream thread)

    def on_records(self, records: list[KVEventRecord], received_at: float) -> None:
        self._inbox.append(("records", records, received_at))

    def on_resync(self, reason: str) -> None:
        self._inbox.append(("resync", reason, time.monotonic()))

    # ------------------------------------------------------------------ scheduler thread

    def watch(self, request: Any) -> None:
        """Remember a live request: its block hashes describe the chunks it stores."""
        self._requests[request.request_id] = request

    def forget(self, request_id: str) -> None:
        self._requests.pop(request_id, None)
        self._server_hashes.pop(request_id, None)

    def on_stores_planned(self, specs: Iterable[TransferSpec], chunk_size: int | None) -> None:
        """Snapshot the events of this step's stores while their requests are alive."""
        if not chunk_size:
            return
        now = time.monotonic()
        for spec in specs:
            req = self._requests.get(spec.request_id)
            if req is None or spec.end <= spec.start:
                continue
            chunks = self._describe(req, spec, chunk_size)
            if not chunks:
                continue
            self._pending[(spec.request_id, spec.start, spec.end)] = _Pending(
                now, chunks, commits=[0] * len(chunks))
            while len(self._pending) > MAX_PENDING:
                self._pending.popitem(last=False)

    def on_worker_events(self, kv_cache_events: Any) -> None:
        """Count the workers' store reports; once every writer reported a store, announce
        its chunks that all of them committed."""
        if not isinstance(kv_cache_events, StoreAckBatch):
            return
        self._drain_inbox()  # evictions received so far veto late confirmations
        for ack in kv_cache_events.get_all_events():
            if not (isinstance(ack, (tuple, list)) and len(ack) == 4):
                continue
            key = (ack[0], ack[1], ack[2])
            pend = self._pending.get(key)
            committed = ack[3]
            if pend is None or not isinstance(committed, (tuple, list)):
                continue
            n = len(pend.commits)
            for ci in set(committed):
                if isinstance(ci, int) and 0 <= ci < n:
                    pend.commits[ci] += 1
            pend.acks += 1
            if pend.acks >= self.writers:
                del self._pending[key]
                self._announce(pend)

    def on_reset(self, cleared: bool) -> None:
        """After our reset: stores planned before it may have committed into the cleared
        cache, so they are not announced. What the clear removed is withdrawn by the
        server's eviction records when the stream follows them, else all at once."""
        if not cleared:
            return
        self._drain_inbox()
        self._pending.clear()
        if not self.live:
            self._withdraw_all()

    def take(self) -> list[KVCacheEvent]:
        """This step's events for vLLM's publisher (called once per step)."""
        self._drain_inbox()
        if self._pending:
            self._expire(time.monotonic())
        out, self._out = self._out, []
        return out

    # ------------------------------------------------------------------ internals

    def _drain_inbox(self) -> None:
        while self._inbox:
            kind, payload, at = self._inbox.popleft()
            if kind == "records":
                self._apply_records(payload, at)
            else:
                if self._announced_keys:
                    logger.info("kvconn: withdrawing %d offloaded chunks from routers (%s)",
                                len(self._announced_keys), payload)
                self._withdraw_all()

    def _describe(self, req: Any, spec: TransferSpec, chunk: int) -> list[_Chunk]:
        tokens = spec.token_ids
        if spec.start % chunk or spec.end % chunk or len(tokens) < spec.end:
            return []
        # Only the chunks this request had not hashed before are hashed now.
        server = chunk_hashes(tokens, chunk, self._server_hashes.setdefault(spec.request_id, []),
                              end=spec.end)
        if self.lmcache_hashes:
            return [self._lmcache_chunk(server, s // chunk, tokens[s:s + chunk], chunk)
                    for s in range(spec.start, spec.end, chunk)]
        hashes = self._block_hashes(req)
        if hashes is None:
            return []
        bs = self.block_size
        lora = getattr(req, "lora_request", None)
        base = {
            "block_size": bs,
            "lora_id": lora.adapter_id if lora is not None else None,
            "lora_name": lora.name if lora is not None else None,
            "medium": MEDIUM_CPU,
            "group_idx": GROUP_IDX,
            "session_id": getattr(req, "session_id", None),
        }
        base = {k: v for k, v in base.items() if k in _STORED_FIELDS}
        out = []
        for s in range(spec.start, spec.end, chunk):
            a, b = s // bs, (s + chunk) // bs
            if b > len(hashes):
                break  # the request has fewer hashed blocks than the store covers
            block_hashes = [maybe_convert_block_hash(h) for h in hashes[a:b]]
            event = BlockStored(
                block_hashes=block_hashes,
                parent_block_hash=maybe_convert_block_hash(hashes[a - 1]) if a else None,
                token_ids=list(tokens[s:s + chunk]),
                extra_keys=_extra_keys(req, s, s + chunk, bs),
                **base,
            )
            out.append(_Chunk(server[s // chunk], block_hashes[-1], event))
        return out

    @staticmethod
    def _lmcache_chunk(server: list[bytes], i: int, tokens: Any, chunk: int) -> _Chunk:
        h = maybe_convert_block_hash(server[i])
        event = BlockStored(
            block_hashes=[h],
            parent_block_hash=maybe_convert_block_hash(server[i - 1]) if i else None,
            token_ids=list(tokens), block_size=chunk, lora_id=None, medium=MEDIUM_CPU,
            lora_name=None,
        )
        return _Chunk(server[i], h, event)

    def _block_hashes(self, req: Any) -> list[Any] | None:
        hashes = getattr(req, "block_hashes", None)
        if not hashes:
            return None
        if self.hash_block_size == self.block_size:
            return hashes
        try:
            from vllm.v1.core.kv_cache_utils import resolve_block_hashes

            return list(resolve_block_hashes(hashes, self.hash_block_size, self.block_size))
        except Exception:  # another vLLM's layout: describe nothing rather than guess
            _warn.warning("hash-view", "kvconn: cannot view block hashes of size %d at %d; "
                          "KV events for offloaded chunks are off", self.hash_block_size,
                          self.block_size)
            return None

    def _announce(self, pend: _Pending) -> None:
        for c, commits in zip(pend.chunks, pend.commits, strict=True):
            if commits < self.writers:
                continue  # not committed by every writer (dropped, or the server had it)
            if c.key in self._announced_keys:
                continue  # already announced (another request stored the same chunk)
            removed = self._removed_at.get(c.server_hash)
            if removed is not None and removed >= pend.planned_at:
                continue  # evicted after this store was planned: maybe gone already
            self._announced.setdefault(c.server_hash, {})[c.key] = c.event.block_hashes
            self._announced.move_to_end(c.server_hash)
            self._announced_keys.add(c.key)
            self._out.append(c.event)
        while len(self._announced_keys) > MAX_ANNOUNCED:
            # Past the cap we could no longer withdraw them later: withdraw the oldest now.
            self._withdraw(self._announced.popitem(last=False)[1])

    def _apply_records(self, records: list[KVEventRecord], at: float) -> None:
        for rec in records:
            if rec.kind != "removed" or rec.medium != MEDIUM_CPU:
                continue  # stored records name other engines' chunks, not in vLLM hashes
            for h in rec.block_hashes:
                self._removed_at[h] = at
                self._removed_at.move_to_end(h)
                entries = self._announced.pop(h, None)
                if entries:
                    self._withdraw(entries)
        while len(self._removed_at) > MAX_REMOVED_MEMORY:
            self._removed_at.popitem(last=False)

    def _withdraw(self, entries: dict[Any, list[Any]]) -> None:
        hashes: list[Any] = []
        for key, block_hashes in entries.items():
            self._announced_keys.discard(key)
            hashes.extend(block_hashes)
        if hashes:
            self._out.append(BlockRemoved(block_hashes=hashes, medium=MEDIUM_CPU,
                                          group_idx=GROUP_IDX))

    def _withdraw_all(self) -> None:
        hashes = [h for entries in self._announced.values() for hs in entries.values()
                  for h in hs]
        self._announced.clear()
        self._announced_keys.clear()
        if hashes:
            self._out.append(BlockRemoved(block_hashes=hashes, medium=MEDIUM_CPU,
                                          group_idx=GROUP_IDX))

    def _expire(self, now: float) -> None:
        while self._pending:
            key, pend = next(iter(self._pending.items()))
            if now - pend.planned_at < ACK_TIMEOUT:
                return
            del self._pending[key]

    @property
    def announced_chunks(self) -> int:
        return len(self._announced_keys)


def _extra_keys(req: Any, start: int, end: int, bs: int) -> list | None:
    """Per-block extra keys (LoRA, multimodal, cache_salt) as vLLM's GPU events carry them."""
    try:
        from vllm.v1.core.kv_cache_utils import generate_block_hash_extra_keys, to_event_extra_keys
    except ImportError:
        return None
    gen: Callable = generate_block_hash_extra_keys
    keys: list = []
    mm_idx = 0  # any start is correct (inputs that end before a block are skipped)
    try:
        for s in range(start, end, bs):
            k, mm_idx = gen(req, s, s + bs, mm_idx)
            keys.append(k)
    except Exception:  # a request shape this vLLM cannot describe: no extra keys
        return None
    return to_event_extra_keys(keys)
