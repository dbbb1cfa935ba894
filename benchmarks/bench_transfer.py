"""Bandwidth of the KV gather (store) / scatter (retrieve) of one 256-token LMCache chunk.

For each model shape it times, in one run:
  * the ceiling: one contiguous copy of the same bytes (GPU: device <-> registered host memory
    through the copy engine; CPU: the best of libc memcpy and torch's parallel copy);
  * the native library (GPU: "staged" and "zerocopy" host paths, plus the device-only kernel);
  * the PyTorch fallback;
and prints GB/s with the ratio to the ceiling.

    python benchmarks/bench_transfer.py                 # CUDA if available, else CPU
    python benchmarks/bench_transfer.py --device cpu --iters 10
    python benchmarks/bench_transfer.py --json out.json --sweep-ctas

GPU host memory is an anonymous mmap registered with cudaHostRegister (like the server's SHM
pool). Block ids are drawn at random from a cache several times the L2 for every iteration.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import statistics
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from kvconn_plugin import ops

CHUNK_TOKENS = 256


@dataclass(frozen=True)
class Shape:
    name: str
    layers: int
    heads: int
    content: int  # C in elements (2*head_size, or the MLA latent size)
    block_size: int
    split: str


SHAPES = [
    Shape("llama3.1-8b", 32, 8, 256, 16, "packed"),
    Shape("llama-70b-tp4", 80, 2, 256, 16, "packed"),
    Shape("mla-576", 61, 1, 576, 16, "mla"),
]


def make_views(shape: Shape, num_blocks: int, device: str, split: str, layout: str):
    """Per-layer [B, H, N, C] bf16 views over one flat buffer, as vLLM allocates them."""
    H, N, C, L = shape.heads, shape.block_size, shape.content, shape.layers
    page = H * N * C
    flat = torch.randint(-2**15, 2**15, (L * num_blocks * page,), dtype=torch.int16,
                         device=device).view(torch.bfloat16)
    inner = (N * C, C) if layout == "LBHNC" else (C, H * C)
    return [flat.as_strided((num_blocks, H, N, C), (page, *inner, 1), layer * num_blocks * page)
            for layer in range(L)]


class RegisteredHost:
    """Anonymous mmap pinned with cudaHostRegister, sliced into slots."""

    def __init__(self, nbytes: int):
        self.region = mmap.mmap(-1, nbytes)
        self.array = np.frombuffer(self.region, dtype=np.uint8)
        self.tensor = torch.from_numpy(self.array)
        self.pinned = ops.pin_host_memory(self.tensor.data_ptr(), nbytes)
        if not self.pinned or not self.tensor.is_pinned():
            # The ceiling would then be a pageable copy and every ratio meaningless.
            raise SystemExit(f"registered host memory not pinned (ours: {self.pinned}, "
                             f"torch sees pinned: {self.tensor.is_pinned()})")

    def close(self) -> None:
        if self.pinned:
            ops.unpin_host_memory(self.tensor.data_ptr())
        del self.tensor, self.array
        self.region.close()


def time_cuda(fn, iters: int, warmup: int = 3) -> float:
    """Median seconds per call, timed with CUDA events around each call."""
    for i in range(warmup):
        fn(i)
    torch.cuda.synchronize()
    times = []
    for i in range(iters):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(i)
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) / 1e3)
    return statistics.median(times)


def id_sets(num_blocks: int, per_chunk: int, count: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.choice(num_blocks, per_chunk, replace=False).tolist() for _ in range(count)]


def bench_gpu(shape: Shape, iters: int, sweep_ctas: bool) -> list[dict]:
    per_chunk = CHUNK_TOKENS // shape.block_size
    page_bytes = shape.heads * shape.block_size * shape.content * 2
    # >= 1 GiB of KV so random block ids miss the 60 MB L2.
    num_blocks = max(256, (1 << 30) // (page_bytes * shape.layers))
    views = make_views(shape, num_blocks, "cuda", shape.split, "LBNHC")
    layout = ops.layout_from_vllm_views(views, shape.content // 2, shape.split)
    nbytes = layout.slot_bytes(per_chunk)
    sets = id_sets(num_blocks, per_chunk, 16)
    host_mem = RegisteredHost(nbytes * 4)
    slots = [host_mem.tensor[k * nbytes:(k + 1) * nbytes] for k in range(4)]
    dev_slot = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    rows = []

    def add(direction, impl, seconds, ceiling=None):
        rows.append({"shape": shape.name, "device": "cuda", "direction": direction,
                     "impl": impl, "mbytes": nbytes / 2**20, "ms": seconds * 1e3,
                     "gbps": nbytes / seconds / 1e9,
                     "ceiling_gbps": (nbytes / ceiling / 1e9) if ceiling else None})

    # Each timed call binds its transfer object explicitly (no late-binding closures).
    def gather_to(tr, target):
        return lambda i: tr.gather(sets[i % 16], target(i))

    def scatter_from(tr, source):
        return lambda i: tr.scatter(source(i), sets[i % 16])

    def host(i):
        return slots[i % 4]

    def dev(_i):
        return dev_slot

    d2h = time_cuda(lambda i: slots[i % 4].copy_(dev_slot, non_blocking=True), iters)
    h2d = time_cuda(lambda i: dev_slot.copy_(slots[i % 4], non_blocking=True), iters)
    add("gather", "ceiling (1 DMA D2H)", d2h, d2h)
    add("scatter", "ceiling (1 DMA H2D)", h2d, h2d)
    for mode in ("staged", "zerocopy"):
        tr = ops.KVTransfer(layout, views, backend="native", cuda_copy=mode)
        add("gather", f"native {mode}", time_cuda(gather_to(tr, host), iters), d2h)
        add("scatter", f"native {mode}", time_cuda(scatter_from(tr, host), iters), h2d)
    tr = ops.KVTransfer(layout, views, backend="native")
    add("gather", "native kernel only (D2D)", time_cuda(gather_to(tr, dev), iters))
    add("scatter", "native kernel only (D2D)", time_cuda(scatter_from(tr, dev), iters))
    if sweep_ctas:
        for ctas in (8, 16, 32, 64, 132, 264):
            tr = ops.KVTransfer(layout, views, backend="native", max_ctas=ctas)
            add("gather", f"D2D kernel, {ctas} CTAs", time_cuda(gather_to(tr, dev), iters))
            for mode in ("staged", "zerocopy"):
                tr = ops.KVTransfer(layout, views, backend="native", max_ctas=ctas,
                                    cuda_copy=mode)
                add("gather", f"native {mode}, {ctas} CTAs",
                    time_cuda(gather_to(tr, host), iters), d2h)
                add("scatter", f"native {mode}, {ctas} CTAs",
                    time_cuda(scatter_from(tr, host), iters), h2d)
    tr = ops.KVTransfer(layout, views, backend="torch")
    few = max(3, iters // 4)
    add("gather", "torch fallback", time_cuda(gather_to(tr, host), few), d2h)
    add("scatter", "torch fallback", time_cuda(scatter_from(tr, host), few), h2d)
    torch.cuda.synchronize()
    slots.clear()  # the slices pin the mmap's buffer export; it cannot close while they live
    host_mem.close()
    return rows


def bench_cpu(shape: Shape, iters: int, layers: int | None, threads: int | None) -> list[dict]:
    """CPU timings, interleaved round-robin so that noise from other processes on a small
    shared host hits the ceiling and the kernels alike; the table shows the best of `iters`
    (the least disturbed run), the JSON also has the median. Slots and sources rotate through
    more memory than the L3 holds, as a real SHM pool would."""
    if layers:
        shape = Shape(shape.name, min(layers, shape.layers), shape.heads, shape.content,
                      shape.block_size, shape.split)
    per_chunk = CHUNK_TOKENS // shape.block_size
    split = "planes" if shape.split == "packed" else "mla"  # vLLM's CPU backend: LBHNC planes
    num_blocks = 4 * per_chunk
    views = make_views(shape, num_blocks, "cpu", split, "LBHNC")
    layout = ops.layout_from_vllm_views(views, shape.content // 2, split)
    nbytes = layout.slot_bytes(per_chunk)
    sets = id_sets(num_blocks, per_chunk, 8)
    slots = [torch.ones(nbytes, dtype=torch.uint8) for _ in range(4)]
    sources = [torch.ones(nbytes, dtype=torch.uint8) for _ in range(4)]
    native = ops.KVTransfer(layout, views, backend="native", num_threads=threads)
    fallback = ops.KVTransfer(layout, views, backend="torch")
    cases = {
        ("copy", "ceiling: libc memcpy (1 thread)"):
            lambda i: ctypes.memmove(slots[i % 4].data_ptr(), sources[i % 4].data_ptr(), nbytes),
        ("copy", "ceiling: torch copy_ (parallel)"): lambda i: slots[i % 4].copy_(sources[i % 4]),
        ("gather", f"native ({native.num_threads} thr)"):
            lambda i: native.gather(sets[i % 8], slots[i % 4]),
        ("scatter", f"native ({native.num_threads} thr)"):
            lambda i: native.scatter(slots[i % 4], sets[i % 8]),
        ("gather", "torch fallback"): lambda i: fallback.gather(sets[i % 8], slots[i % 4]),
        ("scatter", "torch fallback"): lambda i: fallback.scatter(slots[i % 4], sets[i % 8]),
    }
    times: dict = {key: [] for key in cases}
    for i in range(iters + 1):
        for key, fn in cases.items():
            if key[1] == "torch fallback" and i > max(2, iters // 3):
                continue  # slow; fewer samples are enough
            t0 = time.perf_counter()
            fn(i)
            if i > 0:  # first round is warm-up
                times[key].append(time.perf_counter() - t0)
    best = {key: min(v) for key, v in times.items()}
    ceiling = min(best[key] for key in cases if key[0] == "copy")
    return [{"shape": f"{shape.name} (L={shape.layers})", "device": "cpu", "direction": d,
             "impl": impl, "mbytes": nbytes / 2**20, "ms": t * 1e3, "gbps": nbytes / t / 1e9,
             "ceiling_gbps": nbytes / ceiling / 1e9,
             "median_ms": statistics.median(times[(d, impl)]) * 1e3}
            for (d, impl), t in best.items()]


def print_table(rows: list[dict]) -> None:
    head = f"{'shape':26} {'dir':8} {'impl':32} {'MiB':>6} {'ms':>8} {'GB/s':>7} {'%ceil':>6}"
    print(head)
    print("-" * len(head))
    for r in rows:
        pct = f"{100 * r['gbps'] / r['ceiling_gbps']:5.1f}%" if r["ceiling_gbps"] else "   -  "
        print(f"{r['shape']:26} {r['direction']:8} {r['impl']:32} {r['mbytes']:6.1f} "
              f"{r['ms']:8.3f} {r['gbps']:7.2f} {pct:>6}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--cpu-layers", type=int, default=None,
                    help="cap the layer count on CPU (reported in the shape column)")
    ap.add_argument("--cpu-threads", type=int, default=None,
                    help="threads of the native CPU library (default: its own choice)")
    ap.add_argument("--sweep-ctas", action="store_true", help="GPU: also sweep max_ctas")
    ap.add_argument("--json", default=None, help="write all rows to this file")
    args = ap.parse_args()
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    info = ops.backend_info()
    print(f"# backend={info['backend']} cpu_lib={info['cpu_library']['loaded']} "
          f"cuda_lib={info['cuda_library']['loaded']} torch={torch.__version__}")
    if device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA GPU", file=sys.stderr)
        return 2
    if device == "cuda":
        print(f"# GPU: {torch.cuda.get_device_name()}")
    else:
        print(f"# CPU threads: torch={torch.get_num_threads()}")
    rows = []
    for shape in SHAPES:
        if device == "cuda":
            rows += bench_gpu(shape, args.iters or 30, args.sweep_ctas)
        else:
            rows += bench_cpu(shape, args.iters or 12, args.cpu_layers, args.cpu_threads)
    print_table(rows)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": device, "info": info, "rows": rows}, fh, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
