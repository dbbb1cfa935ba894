"""How long a store holds the engine thread: our store path against a synchronous one.

A worker adapter over real CPU paged KV tensors stores ``--chunks`` chunks per step into a
real LMCache server, as vLLM drives it: metadata bound (before the forward), the forward
(simulated by sleeping ``--forward-ms``), then ``wait_for_save``. Measured per step, in the
same run:

* ``ours``: the time inside ``wait_for_save`` (PREPARE_STORE went out at bind time, so the
  blocks are gathered straight into the lent slots; COMMIT_STORE is not waited for);
* ``sync``: PREPARE_STORE, gather and COMMIT_STORE one after the other on the engine thread
  (what the connector did before 0.2, and the usual design);
* ``gather``: the copy alone (the floor of any design that copies on the engine thread);
* ``frozen``: ``ours`` again with the server stopped (SIGSTOP): the engine thread only pays
  the copy into staging, where a synchronous store waits out its deadline.

``python benchmarks/bench_store_path.py [--steps 40] [--chunks 2] [--forward-ms 20]``
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from _report import percentile, save
from kvconn_plugin.config import parse_config
from kvconn_plugin.metadata import KVConnMetadata, TransferSpec
from kvconn_plugin.parallel import kv_ranks
from kvconn_plugin.worker.adapter import WorkerAdapter
from tests.conftest import LMCacheServer
from tests.helpers.connector_config import server_extra_config

CHUNK, BLOCK = 256, 16
LAYERS, HEADS, HEAD = 8, 8, 64  # the "bench" preset's per-token KV: 16 KiB per token


def _worker(url: str) -> tuple[WorkerAdapter, list[torch.Tensor]]:
    kv = [torch.randn(512, HEADS, BLOCK, 2 * HEAD).to(torch.bfloat16) for _ in range(LAYERS)]
    cfg = parse_config(server_extra_config(url, **{"lmcache.mp.heartbeat_interval": 30,
                                                   "kvconn.transfer_timeout": 30}))
    w = WorkerAdapter(cfg, model_name="bench/store-path",
                      ranks=kv_ranks(mla=False, world_size=1, rank=0, tp_size=1),
                      block_size=BLOCK, head_size=HEAD)
    w.register_kv_caches({f"l{i}": t for i, t in enumerate(kv)})
    return w, kv


def _specs(step: int, chunks: int) -> list[TransferSpec]:
    g = torch.Generator().manual_seed(step)
    tokens = torch.randint(10, 30000, (chunks * CHUNK,), generator=g).tolist()
    blocks = tuple(range(chunks * CHUNK // BLOCK))
    return [TransferSpec(request_id=f"s{step}", token_ids=tuple(tokens), start=0,
                         end=len(tokens), block_ids=blocks)]


def _ours(w: WorkerAdapter, specs, forward_s: float) -> float:
    meta = KVConnMetadata(stores=specs)
    w.start_transfers(meta)
    time.sleep(forward_s)
    t0 = time.perf_counter()
    w.wait_for_save(meta)
    return time.perf_counter() - t0


def _sync(w: WorkerAdapter, specs) -> float:
    s = w.session
    t0 = time.perf_counter()
    for spec in specs:
        plan = s.plan(spec, store=True)
        ctx = s.client.prepare_store(plan.key, s.instance_id).context
        for slot, ci in zip(ctx.slots, ctx.chunk_indices, strict=True):
            s.copier.gather(plan.chunk_blocks(ci), plan.pool.slot_view(slot, plan.shape,
                                                                        s.dtype_name))
        if ctx.slots:
            s.client.commit_store(plan.key, s.instance_id, b"")
    return time.perf_counter() - t0


def _gather(w: WorkerAdapter, specs) -> float:
    s = w.session
    plan = s.plan(specs[0], store=True)
    buf = torch.empty(s.chunk_bytes, dtype=torch.uint8)
    t0 = time.perf_counter()
    for spec in specs:
        for ci in range(s.plan(spec, store=True).nchunks):
            s.copier.gather(plan.chunk_blocks(ci), buf)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--chunks", type=int, default=2)
    ap.add_argument("--forward-ms", type=float, default=20.0)
    ap.add_argument("--out", default="benchmarks/results/bench_store_path.txt")
    args = ap.parse_args()
    os.environ.setdefault("LMCACHE_TRACK_USAGE", "false")
    t_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="kvconn-bench-") as tmp:
        server = LMCacheServer(log_dir=Path(tmp), l1_size_gb=2).start()
        w = None
        try:
            w, _ = _worker(server.url)
            times: dict[str, list[float]] = {"ours": [], "sync": [], "gather": [], "frozen": []}
            fwd = args.forward_ms / 1e3
            for i in range(args.steps):  # interleaved, every step a fresh prefix (a miss)
                times["ours"].append(_ours(w, _specs(2 * i, args.chunks), fwd))
                time.sleep(fwd)
                times["sync"].append(_sync(w, _specs(2 * i + 1, args.chunks)))
                times["gather"].append(_gather(w, _specs(0, args.chunks)))
            assert w.wait_stores_idle(60)
            os.killpg(server.process.pid, signal.SIGSTOP)
            try:
                for i in range(min(10, args.steps)):
                    times["frozen"].append(_ours(w, _specs(10_000 + i, args.chunks), fwd))
            finally:
                os.killpg(server.process.pid, signal.SIGCONT)
            assert w.wait_stores_idle(60)
            stats = w.stats.data
        finally:
            if w is not None:
                w.shutdown()
            server.kill()
    mib = args.chunks * CHUNK * LAYERS * HEADS * 2 * HEAD * 2 / 2**20
    lines = [f"bench_store_path: {args.steps} steps, {args.chunks} chunks ({mib:.0f} MiB) "
             f"stored per step, forward {args.forward_ms:.0f} ms; engine-thread ms per step",
             f"{'path':<8}{'p50':>9}{'p99':>9}{'max':>9}{'/gather p50':>13}"]
    g50 = median(times["gather"])
    for name, xs in times.items():
        lines.append(f"{name:<8}{median(xs) * 1e3:9.2f}{percentile(xs, 0.99) * 1e3:9.2f}"
                     f"{max(xs) * 1e3:9.2f}{median(xs) / g50:13.2f}")
    lines.append(f"stored chunks {stats.get('stored_chunks', 0)}, staged stores "
                 f"{stats.get('stores_staged', 0)}, dropped {stats.get('store_failures', 0)}")
    lines.append(f"(total {time.monotonic() - t_start:.0f}s)")
    save(args.out, "\n".join(lines))


if __name__ == "__main__":
    main()
