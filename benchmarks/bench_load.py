"""Scheduler-side overhead of the connector per engine step, under load.

vLLM's real Scheduler (CPU build, simulated model) keeps ``--running`` requests decoding while
finished ones are replaced by new arrivals, so lookups are always in flight against a real
LMCache server. A third of the prompts share one of 16 cached prefixes, so loads and stores
happen too. The model's forward pass is simulated by sleeping ``--forward-ms`` between
``schedule()`` and ``update_from_output()``: that is when a real engine waits on its workers,
and when the server and our I/O thread get the CPU.

Measured: the time spent inside the connector's scheduler-side hooks per step (what it adds
to the scheduler), p50/p99/max, plus lookup latency in wall time and how many lookups were in
flight. Target: p99 <= 1 ms.

By default the server process is pinned to its own CPU and the benchmark to the others, as
a deployment would give it its own cores; ``--no-pin`` shares them (noisier on small boxes).

``python benchmarks/bench_load.py [--steps 600] [--running 256] [--forward-ms 10] [--no-pin]``
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _report import percentile, save  # sibling module (run as a script)
from tests.conftest import LMCacheServer
from tests.helpers.sched_harness import SchedHarness, step
from tests.helpers.seed import seed_server

# isort: split
# vLLM after tests.helpers.sched_harness, which sets HF_HUB_OFFLINE before vLLM loads
from vllm.v1.request import RequestStatus

WAITING_KV = RequestStatus.WAITING_FOR_REMOTE_KVS
HOOKS = ("get_num_new_matched_tokens", "update_state_after_alloc", "build_connector_meta",
         "request_finished", "update_connector_output", "on_new_request")


class GCClock:
    """Total time spent in garbage collection so far (all generations, whole process)."""

    def __init__(self) -> None:
        self.total = 0.0
        self._t0 = 0.0
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            self.total += time.perf_counter() - self._t0


GC = GCClock()


def instrument(connector) -> list[float]:
    """Wrap the scheduler-side hooks; returns ``[seconds in hooks, of which in GC]``."""
    acc = [0.0, 0.0]
    for name in HOOKS:
        fn = getattr(connector, name)

        def timed(*a, _fn=fn, **kw):
            t, g = time.perf_counter(), GC.total
            try:
                return _fn(*a, **kw)
            finally:
                acc[0] += time.perf_counter() - t
                acc[1] += GC.total - g
        setattr(connector, name, timed)
    return acc


class LookupClock:
    """Wall time from a request's first ``get_num_new_matched_tokens`` to its first answer."""

    def __init__(self, connector) -> None:
        self.first: dict[str, float] = {}
        self.latency: list[float] = []
        self.pending = 0
        self.hit_tokens = 0
        fn = connector.get_num_new_matched_tokens

        def clocked(request, *a, **kw):
            out = fn(request, *a, **kw)
            rid = request.request_id
            t0 = self.first.setdefault(rid, time.perf_counter())
            if out[0] is None:
                self.pending += 1
            elif t0 >= 0:
                self.latency.append(time.perf_counter() - t0)
                self.hit_tokens += out[0]
                self.first[rid] = -1.0
            return out
        connector.get_num_new_matched_tokens = clocked


def shared_prefixes(seed: int) -> list[list[int]]:
    rng = random.Random(seed + 1)
    return [[rng.randrange(10, 30000) for _ in range(512)] for _ in range(16)]


def settle_heap() -> None:
    """Collect and freeze the start-up heap, as vLLM's EngineCore does after init: without
    it a full collection over vLLM's and torch's objects (~0.4 s here) lands in a random step."""
    gc.collect()
    gc.freeze()


def io_thread_clock(connector) -> int | None:
    """CPU clock of our client's I/O thread: its work happens between hooks, mostly while the
    engine waits on the model, but it still shares the process (and the GIL)."""
    thread = getattr(getattr(getattr(getattr(connector, "_scheduler", None), "client", None),
                             "transport", None), "_thread", None)
    return time.pthread_getcpuclockid(thread.ident) if thread is not None else None


def run(h: SchedHarness, steps: int, running: int, forward_s: float, seed: int,
        measure: bool) -> dict[str, list[float]]:
    settle_heap()
    rng = random.Random(seed)
    conn = h.connector if measure else None
    clock = LookupClock(conn) if conn is not None else None
    acc = instrument(conn) if conn is not None else None
    prefixes = shared_prefixes(seed)
    out: dict[str, list[float]] = {"step": [], "hooks": [], "hooks_gc": [], "in_flight": [],
                                   "running": []}
    n = 0
    recving: set[str] = set()
    reported: set[str] = set()
    sched = h.scheduler
    io_clock = io_thread_clock(conn) if conn is not None else None
    io_start = time.clock_gettime(io_clock) if io_clock is not None else 0.0
    for _ in range(steps):
        while len(sched.requests) < running:
            base = rng.choice(prefixes) if rng.random() < 0.33 else []
            toks = base + [rng.randrange(10, 30000) for _ in range(rng.randrange(64, 1100))]
            h.add(h.request(f"q{n}", toks, max_tokens=rng.randrange(16, 128), ignore_eos=True))
            n += 1
        if acc is not None:
            acc[0] = acc[1] = 0.0
            clock.pending = 0
        t = time.perf_counter()
        _so, _ = step(sched, finished_recving=recving, forward_s=forward_s)
        out["step"].append(time.perf_counter() - t - forward_s)
        out["running"].append(len(sched.running))
        if acc is not None:
            out["hooks"].append(acc[0])
            out["hooks_gc"].append(acc[1])
            out["in_flight"].append(clock.pending)
        # Workers would report each async load done by the next step.
        recving = {rid for rid, req in sched.requests.items()
                   if req.status is WAITING_KV and rid not in reported}
        reported |= recving
    if io_clock is not None:
        out["io_cpu_per_step"] = [(time.clock_gettime(io_clock) - io_start) / steps]
    if clock is not None:
        out["lookup"] = clock.latency
        out["hit_tokens"] = [float(clock.hit_tokens)]
    return out


def pin_apart(server_pid: int) -> bool:
    """Server on the last CPU, this process (and the threads it starts later) on the others."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return False
    subprocess.run(["taskset", "-a", "-cp", str(cpus[-1]), str(server_pid)], check=True,
                   stdout=subprocess.DEVNULL)
    os.sched_setaffinity(0, cpus[:-1])
    return True


def summarize(r: dict[str, list[float]], warm: int) -> dict[str, float]:
    hk, hk_gc = r["hooks"][warm:], r["hooks_gc"][warm:]
    # A collection triggered inside a hook pays for every object the step allocated (most of
    # them vLLM's), so the time without GC pauses is shown as well.
    hk_no_gc = [a - b for a, b in zip(hk, hk_gc, strict=True)]
    lk = r["lookup"][len(r["lookup"]) // 10:] or [0.0]
    n = len(hk)
    return {
        "connector time per step p50 (ms)": percentile(hk, 0.5) * 1e3,
        "connector time per step p99 (ms)": percentile(hk, 0.99) * 1e3,
        "connector time per step max (ms)": max(hk) * 1e3,
        "  without GC pauses, p99 (ms)": percentile(hk_no_gc, 0.99) * 1e3,
        "  steps with a GC pause in a hook (%)": 100 * sum(1 for x in hk_gc if x) / n,
        "scheduler step p50, with connector (ms)": percentile(r["step"][warm:], 0.5) * 1e3,
        "I/O thread CPU per step, mean (ms)": r.get("io_cpu_per_step", [0.0])[0] * 1e3,
        "running requests per step (mean)": sum(r["running"][warm:]) / n,
        "lookups answered 'not yet' per step (mean)": sum(r["in_flight"][warm:]) / n,
        "lookup wall latency p50 (ms)": percentile(lk, 0.5) * 1e3,
        "lookup wall latency p99 (ms)": percentile(lk, 0.99) * 1e3,
        "lookups answered": float(len(r["lookup"])),
        "hit tokens": r["hit_tokens"][0],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--running", type=int, default=256)
    ap.add_argument("--forward-ms", type=float, default=10.0,
                    help="simulated model time per step (the scheduler process is idle then)")
    ap.add_argument("--no-pin", dest="pin", action="store_false",
                    help="let the server share CPUs with the scheduler (by default it gets its "
                         "own CPU, as in a deployment, when there are 2+)")
    ap.add_argument("--out", default="benchmarks/results/bench_load.txt")
    args = ap.parse_args(argv)
    fwd = args.forward_ms / 1e3
    common = {"num_blocks": 40000, "max_model_len": 2048, "max_num_batched_tokens": 8192,
              "max_num_seqs": args.running}
    t0 = time.perf_counter()
    base = SchedHarness.create(connector=None, **common)
    r_base = run(base, args.steps, args.running, fwd, seed=0, measure=False)
    server = LMCacheServer(log_dir=Path(tempfile.mkdtemp(prefix="kvconn-bench-load-"))).start()
    pinned = args.pin and pin_apart(server.process.pid)
    results = {}
    try:
        host, port = server.url.rsplit(":", 1)
        peers = [("ours", "KVConnPluginConnector", "kvconn_plugin.connector",
                  {"lmcache.mp.host": host, "lmcache.mp.port": int(port),
                   "lmcache.mp.autostart": False})]
        for name, cls, module, extra in peers:
            h = SchedHarness.create(connector=cls, module_path=module, extra_config=extra, **common)
            model = h.vllm_config.model_config.model
            for p in shared_prefixes(0):
                seed_server(server.url, model, p)
            results[name] = run(h, args.steps, args.running, fwd, seed=0, measure=True)
            h.connector.shutdown()
    finally:
        server.kill()
    warm = args.steps // 10  # skip start-up: the first requests' lookups arrive in one burst
    metrics = {name: summarize(res, warm) for name, res in results.items()}
    names = list(metrics)
    base = percentile(r_base["step"][warm:], 0.5) * 1e3
    lines = [f"bench_load: {args.running} running requests, {args.steps} steps "
             f"(first {warm} skipped), forward pass simulated as {args.forward_ms:g} ms; "
             "real Scheduler, real LMCache server"
             f"{' on its own CPU' if pinned else ''}",
             "", f"{'metric':<44}" + "".join(f"{n:>10}" for n in names)
             + ("  ours/lmcache" if "lmcache" in metrics else "")]
    for key in metrics["ours"]:
        vals = [metrics[n][key] for n in names]
        line = f"{key:<44}" + "".join(f"{v:10.3f}" for v in vals)
        if "lmcache" in metrics and key.endswith("(ms)") and metrics["lmcache"][key] > 0:
            line += f"  {metrics['ours'][key] / metrics['lmcache'][key]:12.2f}"
        lines.append(line)
    lines += [f"{'scheduler step p50, no connector (ms)':<44}{base:10.3f}", "",
              "connector time = all scheduler-side hooks of a step "
              "(what the connector adds to it);",
              "GC pauses = Python collections that started inside a hook (gc.callbacks).",
              "target: ours, connector time p99 <= 1 ms",
              f"(total {time.perf_counter() - t0:.0f}s)"]
    save(args.out, "\n".join(lines))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    finally:
        gc.unfreeze()  # frozen objects are never finalized: native modules then report leaks
