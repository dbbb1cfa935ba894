#!/usr/bin/env python
"""Protocol benchmark: our wire client vs LMCache's own client, against ONE real server.

Measured for both clients, same server, same data, interleaved round by round so that
background load on a shared host hits both alike:

* ping round trip (``ping(None)``) p50/p99;
* lookup round trip: LOOKUP, wait for its ack, then QUERY_PREFETCH_STATUS until it returns
  the hit count (4 stored chunks, all hit), p50/p99; the read locks are released after
  each sample, outside the timed region;
* engine-driven store and retrieve throughput (GB/s, 1e9 bytes) for 256-token chunks of a
  Llama-3.1-8B-shaped KV (32 layers, 8 KV heads x 128, bf16 = 32 MiB per chunk),
  including the copy between a source/destination tensor and the SHM slot
  (store: prepare_store -> copy_ into the slots -> commit_store; retrieve, after an
  untimed lookup: prepare_retrieve -> copy_ out of the slots -> commit_retrieve).

LMCache's side uses what its vLLM adapters use: ``RequestClientFactory.create(url)``
(``ping``, ``lookup``, ``query_prefetch_status`` futures) and the engine-driven SHM
context ``create_engine_driven_context`` (``EngineDrivenContextShm``). Without lmcache
installed the peer column is skipped (the server itself also comes from lmcache, so then
``--url`` must name a running server).

Usage: python benchmarks/bench_protocol.py [--quick] [--url tcp://host:port --shm-name X]
Writes the final table to benchmarks/results/bench_protocol.txt as well.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import importlib.util
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("LMCACHE_TRACK_USAGE", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("LMCACHE_DISABLE_BANNER", "1")

import torch
import zmq

from _report import save  # sibling module (benchmarks run as scripts)
from kvconn_plugin.client import (
    CacheKey,
    LMCacheClient,
    RegisterEngineDrivenPayload,
    new_instance_id,
)
from kvconn_plugin.client.shm_pool import ShmPool
from kvconn_plugin.server.autostart import free_port

# Llama-3.1-8B KV per rank: 32 layers, 8 KV heads x 128, bf16.
NUM_LAYERS, KV_HEADS, HEAD_DIM, DTYPE = 32, 8, 128, "bfloat16"
HIDDEN = KV_HEADS * HEAD_DIM
BLOCK_SIZE = 16
CHUNKS_PER_OP = 4          # 128 MiB per store/retrieve
LOOKUP_CHUNKS = 4
RESULTS = Path(__file__).resolve().parent / "results" / "bench_protocol.txt"


# ---------------------------------------------------------------------------- server



@dataclass
class Server:
    url: str
    shm_name: str
    proc: subprocess.Popen | None = None
    log: Path | None = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(self.proc.pid, sig)
                    self.proc.wait(timeout=10)
                    break
                except subprocess.TimeoutExpired:
                    continue
                except ProcessLookupError:
                    break
        if self.proc is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"/dev/shm/lmcache_l1_pool_{self.shm_name}")
        self.proc = None


def start_server(l1_size_gb: float) -> Server:
    exe = Path(sys.executable).with_name("lmcache")
    if not exe.exists():
        sys.exit("the lmcache CLI is not installed; pass --url/--shm-name of a running server")
    port, http_port = free_port(), free_port()
    shm = f"kvbench{os.getpid()}x{uuid.uuid4().hex[:6]}"
    log = Path(tempfile.gettempdir()) / f"bench_protocol_{shm}.log"
    argv = [str(exe), "server", "--host", "127.0.0.1", "--port", str(port),
            "--http-host", "127.0.0.1", "--http-port", str(http_port),
            "--l1-size-gb", str(l1_size_gb), "--eviction-policy", "LRU",
            "--supported-transfer-mode", "auto", "--shm-name", shm]
    with open(log, "wb") as f:
        proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    server = Server(f"tcp://127.0.0.1:{port}", shm, proc, log)
    atexit.register(server.stop)
    deadline = time.monotonic() + 180
    with LMCacheClient(server.url, control_timeout=1.0) as probe:
        while True:
            if proc.poll() is not None:
                server.stop()
                sys.exit(f"server exited ({proc.returncode}); log: {log}")
            try:
                probe.ping(timeout=1.0)
                break
            except Exception:  # not up yet
                if time.monotonic() > deadline:
                    sys.exit(f"server not ready after 180 s; log: {log}")
    return server


# ---------------------------------------------------------------------------- statistics


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


@dataclass
class Stats:
    ping: list[float] = field(default_factory=list)
    lookup: list[float] = field(default_factory=list)
    store_s: list[float] = field(default_factory=list)
    retrieve_s: list[float] = field(default_factory=list)
    store_bytes: int = 0
    retrieve_bytes: int = 0


# ---------------------------------------------------------------------------- data


@dataclass
class Workload:
    chunk: int
    shape: tuple[int, ...]
    src: list[torch.Tensor]          # CHUNKS_PER_OP source chunks (bf16)
    dst: list[torch.Tensor]          # retrieve destinations
    model: str

    @property
    def chunk_bytes(self) -> int:
        return self.src[0].numel() * self.src[0].element_size()

    def tokens(self, n_chunks: int, tag: int) -> list[int]:
        g = torch.Generator().manual_seed(tag)
        return torch.randint(0, 120_000, (n_chunks * self.chunk,), generator=g).tolist()


def prefault(t: torch.Tensor) -> None:
    """Touch every page of a mapping once: both clients then copy into mapped pages."""
    t.view(torch.uint8)[:: 4096].sum()


# ---------------------------------------------------------------------------- our client


class Ours:
    name = "ours"

    def __init__(self, url: str, wl: Workload):
        self.client = LMCacheClient(url, control_timeout=30.0, transfer_timeout=60.0)
        self.wl = wl
        self.iid = new_instance_id()
        reply = self.client.register_engine_driven(RegisterEngineDrivenPayload(
            instance_id=self.iid, model_name=wl.model, world_size=1, block_size=BLOCK_SIZE,
            num_layers=NUM_LAYERS, hidden_dim_size=HIDDEN, dtype_str=DTYPE, use_mla=False,
            num_physical_slots=wl.chunk))
        self.pool = ShmPool(reply.shm_name, reply.pool_size)
        prefault(self.pool.tensor)

    def key(self, tokens: list[int], n: int, rid: str, worker: bool = True) -> CacheKey:
        return CacheKey(model_name=self.wl.model, world_size=1, worker_id=0 if worker else None,
                        token_ids=tokens, start=0, end=n * self.wl.chunk, request_id=rid)

    def ping(self) -> None:
        self.client.ping(None)

    def lookup(self, tokens: list[int], n: int, rid: str) -> int:
        return self.client.lookup(self.key(tokens, n, rid, worker=False), poll_interval=0.0)

    def release(self, tokens: list[int], n: int, rid: str) -> None:
        self.client.free_lookup_locks(self.key(tokens, n, rid, worker=False))
        self.client.end_session(rid)

    def store(self, tokens: list[int], rid: str) -> int:
        key = self.key(tokens, len(self.wl.src), rid)
        reply = self.client.prepare_store(key, self.iid)
        for slot, ci in zip(reply.context.slots, reply.context.chunk_indices, strict=False):
            self.pool.typed_view(slot, self.wl.shape, DTYPE).copy_(self.wl.src[ci])
        if reply.context.slots:
            self.client.commit_store(key, self.iid)
        return len(reply.context.slots)

    def retrieve(self, tokens: list[int], rid: str) -> bool:
        key = self.key(tokens, len(self.wl.dst), rid)
        reply = self.client.prepare_retrieve(key, self.iid)
        if not reply.success:
            return False
        for slot, out in zip(reply.context.slots, self.wl.dst, strict=False):
            out.copy_(self.pool.typed_view(slot, self.wl.shape, DTYPE))
        return self.client.commit_retrieve(key, self.iid)

    def close(self) -> None:
        self.client.unregister_engine_driven(self.iid)
        self.pool.close()
        self.client.close()


# ---------------------------------------------------------------------------- lmcache's client


class Theirs:
    name = "lmcache"

    def __init__(self, url: str, wl: Workload):
        from lmcache.v1.distributed.api import MemoryLayoutDesc
        from lmcache.v1.multiprocess.custom_types import (
            IPCCacheServerKey,
            RegisterEngineDrivenContextPayload,
        )
        from lmcache.v1.multiprocess.transfer_context import (
            EngineDrivenContextMetadata,
            create_engine_driven_context,
        )
        from lmcache.v1.multiprocess.transport.factory import RequestClientFactory

        self._key_cls = IPCCacheServerKey
        self.wl = wl
        self.timeout = 60.0
        self.req = RequestClientFactory.create(url)
        self.iid = new_instance_id()
        reply = self.req.register_kv_cache_engine_driven_context(
            RegisterEngineDrivenContextPayload(
                instance_id=self.iid, model_name=wl.model, world_size=1, block_size=BLOCK_SIZE,
                num_layers=NUM_LAYERS, hidden_dim_size=HIDDEN, dtype_str=DTYPE, use_mla=False,
                num_physical_slots=wl.chunk)).result(timeout=self.timeout)
        meta = EngineDrivenContextMetadata(
            layout_desc=MemoryLayoutDesc(shapes=[torch.Size(wl.shape)], dtypes=[torch.bfloat16]),
            block_size=BLOCK_SIZE, use_mla=False)
        self.ctx = create_engine_driven_context(meta, self.req, self.timeout,
                                                shm_name=reply.shm_name, pool_size=reply.pool_size)
        if type(self.ctx).__name__ != "EngineDrivenContextShm":
            raise RuntimeError(f"lmcache fell back to {type(self.ctx).__name__}")
        prefault(torch.frombuffer(self.ctx._shm_buffer, dtype=torch.uint8))

    def key(self, tokens: list[int], n: int, rid: str, worker: bool = True):
        return self._key_cls(model_name=self.wl.model, world_size=1,
                             worker_id=0 if worker else None, token_ids=tuple(tokens), start=0,
                             end=n * self.wl.chunk, request_id=rid, num_kv_readers=1)

    def ping(self) -> None:
        self.req.ping(None).result(timeout=self.timeout)

    def lookup(self, tokens: list[int], n: int, rid: str) -> int:
        # What LMCacheMPSchedulerAdapter does: wait for the LOOKUP ack, then QUERY until
        # it is not None.
        self.req.lookup(self.key(tokens, n, rid, worker=False), 1).result(timeout=self.timeout)
        while True:
            hit = self.req.query_prefetch_status(rid).result(timeout=self.timeout)
            if hit is not None:
                return int(hit)

    def release(self, tokens: list[int], n: int, rid: str) -> None:
        self.req.free_lookup_locks(self.key(tokens, n, rid, worker=False), 1).result(
            timeout=self.timeout)
        self.req.end_session(rid).result(timeout=self.timeout)

    def store(self, tokens: list[int], rid: str) -> int:
        key = self.key(tokens, len(self.wl.src), rid)
        res = self.ctx.prepare_store(key, self.iid)
        if res is None:
            raise RuntimeError("lmcache prepare_store returned pickle mode")
        tensors, indices = res
        for t, ci in zip(tensors, indices, strict=False):
            t.copy_(self.wl.src[ci])
        if tensors:
            self.ctx.commit_store(key, self.iid, [])
        return len(tensors)

    def retrieve(self, tokens: list[int], rid: str) -> bool:
        key = self.key(tokens, len(self.wl.dst), rid)
        tensors = self.ctx.prepare_retrieve(key, self.iid)
        if tensors is None:
            return False
        for t, out in zip(tensors, self.wl.dst, strict=False):
            out.copy_(t)
        return self.ctx.commit_retrieve(key, self.iid)

    def close(self) -> None:
        self.req.unregister_kv_cache_engine_driven_context(self.iid).result(timeout=self.timeout)
        self.ctx.close()
        self.req.close()


# ---------------------------------------------------------------------------- runs


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def order(clients: list, r: int) -> list:
    """Alternate who goes first, so that neither client always runs on a warmer cache."""
    return clients if r % 2 == 0 else clients[::-1]


def run(clients: list, wl: Workload, args: argparse.Namespace) -> dict[str, Stats]:
    stats = {c.name: Stats() for c in clients}
    rounds = 4

    # Ping: warm up, then alternate blocks.
    for c in clients:
        for _ in range(100):
            c.ping()
    for r in range(rounds):
        for c in order(clients, r):
            stats[c.name].ping += [timed(c.ping) for _ in range(args.pings // rounds)]

    # Lookup: 4 chunks stored once, then every sample hits all 4.
    look_tokens = wl.tokens(LOOKUP_CHUNKS, tag=1)
    clients[0].store(look_tokens, "seed-lookup")  # LOOKUP_CHUNKS == CHUNKS_PER_OP
    for c in clients:
        for i in range(20):
            rid = f"warm-{c.name}-{i}"
            c.lookup(look_tokens, LOOKUP_CHUNKS, rid)
            c.release(look_tokens, LOOKUP_CHUNKS, rid)
    for r in range(rounds):
        for c in order(clients, r):
            for i in range(args.lookups // rounds):
                rid = f"lk-{c.name}-{r}-{i}"
                t0 = time.perf_counter()
                hits = c.lookup(look_tokens, LOOKUP_CHUNKS, rid)
                stats[c.name].lookup.append(time.perf_counter() - t0)
                if hits != LOOKUP_CHUNKS:
                    raise RuntimeError(f"{c.name}: lookup hit {hits}, expected {LOOKUP_CHUNKS}")
                c.release(look_tokens, LOOKUP_CHUNKS, rid)

    # Throughput: fresh tokens per store (nothing cached), then lookup + retrieve them.
    n = len(wl.src)
    for rep in range(args.reps + 1):  # rep 0 is a warm-up
        for c in order(clients, rep):
            tokens = wl.tokens(n, tag=1000 + rep * 10 + len(c.name))
            st = stats[c.name]
            t0 = time.perf_counter()
            stored = c.store(tokens, f"st-{c.name}-{rep}")
            dt_store = time.perf_counter() - t0
            if stored != n:
                raise RuntimeError(f"{c.name}: server gave {stored}/{n} slots (L1 too small?)")
            rid = f"rt-{c.name}-{rep}"
            if c.lookup(tokens, n, rid) != n:
                raise RuntimeError(f"{c.name}: stored chunks not found")
            for d in wl.dst:
                d.zero_()
            t0 = time.perf_counter()
            ok = c.retrieve(tokens, rid)
            dt_retrieve = time.perf_counter() - t0
            c.release(tokens, 0, rid)  # only the session; commit_retrieve freed the locks
            if not ok or not all(torch.equal(a.view(torch.uint8), b.view(torch.uint8))
                                 for a, b in zip(wl.src, wl.dst, strict=True)):
                raise RuntimeError(f"{c.name}: retrieved data differs from what was stored")
            if rep:
                st.store_s.append(dt_store)
                st.retrieve_s.append(dt_retrieve)
                st.store_bytes += n * wl.chunk_bytes
                st.retrieve_bytes += n * wl.chunk_bytes
    return stats


def versions() -> str:
    import msgspec

    parts = [f"python {platform.python_version()}", f"torch {torch.__version__}",
             f"pyzmq {zmq.__version__} (libzmq {zmq.zmq_version()})",
             f"msgspec {msgspec.__version__}"]
    try:
        from importlib.metadata import version

        parts.append(f"lmcache {version('lmcache')}")
    except Exception:
        parts.append("lmcache: not installed")
    try:
        if importlib.util.find_spec("kvconn_plugin.ops") is not None:
            import kvconn_plugin.ops as ops

            info = ops.backend_info() if hasattr(ops, "backend_info") else {}
            parts.append(f"kvconn ops backend {info.get('backend', getattr(ops, 'BACKEND', '?'))}"
                         f" (not used here: copies are torch copy_)")
    except Exception as exc:
        parts.append(f"kvconn ops: {exc!r}")
    parts.append(f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}")
    return "; ".join(parts)


def table(stats: dict[str, Stats], wl: Workload) -> str:
    ours = stats["ours"]
    theirs = stats.get("lmcache")
    rows: list[tuple[str, float, float | None]] = []

    def lat(name: str, xs_o: list[float], xs_t: list[float] | None) -> None:
        for q in (50, 99):
            rows.append((f"{name} p{q} (us)", pct(xs_o, q) * 1e6,
                         pct(xs_t, q) * 1e6 if xs_t else None))

    lat("ping round trip", ours.ping, theirs.ping if theirs else None)
    lat(f"lookup+query round trip, {LOOKUP_CHUNKS} hits", ours.lookup,
        theirs.lookup if theirs else None)

    def gbps(b: int, s: list[float]) -> float:
        return b / sum(s) / 1e9

    rows.append((f"store {len(wl.src)}x32MiB incl. copy (GB/s)",
                 gbps(ours.store_bytes, ours.store_s),
                 gbps(theirs.store_bytes, theirs.store_s) if theirs else None))
    rows.append((f"retrieve {len(wl.dst)}x32MiB incl. copy (GB/s)",
                 gbps(ours.retrieve_bytes, ours.retrieve_s),
                 gbps(theirs.retrieve_bytes, theirs.retrieve_s) if theirs else None))
    w = max(len(r[0]) for r in rows)
    lines = [f"{'metric':<{w}}  {'ours':>10}  {'lmcache':>10}  {'ours/lmcache':>12}",
             "-" * (w + 38)]
    for name, o, t in rows:
        ts = f"{t:>10.2f}" if t is not None else f"{'-':>10}"
        rs = f"{o / t:>12.2f}" if t else f"{'-':>12}"
        lines.append(f"{name:<{w}}  {o:>10.2f}  {ts}  {rs}")
    lines.append("latency: ratio < 1 means ours is faster; "
                 "throughput: ratio > 1 means ours is faster")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", help="use a running server instead of starting one")
    ap.add_argument("--shm-name", help="with --url: unused, the server reports its pool")
    ap.add_argument("--l1-size-gb", type=float, default=3.0)
    ap.add_argument("--pings", type=int, default=3000)
    ap.add_argument("--lookups", type=int, default=1000)
    ap.add_argument("--reps", type=int, default=8, help="timed store/retrieve ops per client")
    ap.add_argument("--quick", action="store_true", help="a few samples only (smoke test)")
    ap.add_argument("--no-lmcache", action="store_true", help="skip the lmcache column")
    args = ap.parse_args()
    if args.quick:
        args.pings, args.lookups, args.reps = 200, 80, 2

    have_lmcache = importlib.util.find_spec("lmcache") is not None and not args.no_lmcache
    t_start = time.monotonic()
    server = Server(args.url, "") if args.url else start_server(args.l1_size_gb)
    print(f"server {server.url} ready in {time.monotonic() - t_start:.1f}s", flush=True)

    with LMCacheClient(server.url) as probe:
        chunk_size = probe.get_chunk_size()
    shape = (2, NUM_LAYERS, chunk_size, HIDDEN)
    g = torch.Generator().manual_seed(0)
    nbytes = math.prod(shape) * 2

    def rand_chunk() -> torch.Tensor:
        raw = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=g)
        return raw.view(torch.bfloat16).view(shape)

    wl = Workload(chunk=chunk_size, shape=shape,
                  src=[rand_chunk() for _ in range(CHUNKS_PER_OP)],
                  dst=[torch.empty(shape, dtype=torch.bfloat16) for _ in range(CHUNKS_PER_OP)],
                  model=f"bench/llama-3.1-8b-{uuid.uuid4().hex[:6]}")
    for d in wl.dst:
        d.zero_()  # fault the destination pages in before timing

    clients: list = [Ours(server.url, wl)]
    if have_lmcache:
        clients.append(Theirs(server.url, wl))
    try:
        stats = run(clients, wl, args)
    finally:
        for c in clients:
            c.close()
        server.stop()

    header = (f"bench_protocol: chunk {chunk_size} tokens, KV {NUM_LAYERS}L x {KV_HEADS}H x "
              f"{HEAD_DIM} {DTYPE} ({wl.chunk_bytes / 2**20:.0f} MiB/chunk); pings "
              f"{len(stats['ours'].ping)}, lookups {len(stats['ours'].lookup)}, store/retrieve "
              f"ops {len(stats['ours'].store_s)} per client\n{versions()}")
    out = f"{header}\n\n{table(stats, wl)}\n(total {time.monotonic() - t_start:.0f}s)\n"
    save(RESULTS, out)


if __name__ == "__main__":
    main()
