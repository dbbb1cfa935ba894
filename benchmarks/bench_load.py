"""Scheduler-side overhead of the connector per engine step, under load.

vLLM's real Scheduler (CPU build, mocked model output) runs the same request stream twice in
one process: without a connector, and with ``KVConnPluginConnector`` against a real LMCache
server. 256 requests run concurrently while new ones keep arriving, so lookups are always in
flight; a third of the prompts share cached prefixes, so loads and stores happen too. The
added time per step (schedule + update_from_output) is reported as p50/p99 differences.
Target: p99 added time <= 1 ms.

``python benchmarks/bench_load.py [--steps 600] [--running 256]``
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.conftest import LMCacheServer  # noqa: E402
from tests.helpers.sched_harness import SchedHarness  # noqa: E402


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


HOOKS = ("get_num_new_matched_tokens", "update_state_after_alloc", "build_connector_meta",
         "request_finished", "update_connector_output", "on_new_request")


def instrument(connector) -> list[float]:
    """Wrap the scheduler-side hooks; returns the accumulator of seconds spent in them."""
    acc = [0.0]
    for name in HOOKS:
        fn = getattr(connector, name)

        def timed(*a, _fn=fn, **kw):
            t = time.perf_counter()
            try:
                return _fn(*a, **kw)
            finally:
                acc[0] += time.perf_counter() - t
        setattr(connector, name, timed)
    return acc


def run(h: SchedHarness, steps: int, running: int, seed: int, prefix: str = "q",
        hook_times: list[float] | None = None) -> list[float]:
    rng = random.Random(seed)
    acc = instrument(h.connector) if h.connector is not None and hook_times is not None else None
    prefixes = [[rng.randrange(10, 500) for _ in range(512)] for _ in range(16)]
    times: list[float] = []
    n = 0
    recving: set[str] = set()
    for _ in range(steps):
        if acc is not None:
            acc[0] = 0.0
        while len(h.scheduler.requests) < running:
            base = rng.choice(prefixes) if rng.random() < 0.33 else []
            toks = base + [rng.randrange(10, 500) for _ in range(rng.randrange(64, 600))]
            h.add(h.request(f"{prefix}{n}", toks, max_tokens=rng.randrange(4, 32)))
            n += 1
        t = time.perf_counter()
        so, _ = h.step(finished_recving=recving)
        times.append(time.perf_counter() - t)
        if acc is not None:
            hook_times.append(acc[0])
        meta = so.kv_connector_metadata
        recving = {s.request_id for s in meta.loads} if meta is not None else set()
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--running", type=int, default=256)
    ap.add_argument("--out", default="benchmarks/results/bench_load.txt")
    args = ap.parse_args(argv)
    common = dict(num_blocks=20000, max_model_len=2048, max_num_batched_tokens=8192,
                  max_num_seqs=args.running)
    base = SchedHarness.create(connector=None, **common)
    t_base = run(base, args.steps, args.running, seed=0)
    server = LMCacheServer(log_dir=Path(tempfile.mkdtemp(prefix="kvconn-bench-load-"))).start()
    try:
        host, port = server.url.rsplit(":", 1)
        h = SchedHarness.create(connector="KVConnPluginConnector", module_path="kvconn_plugin.connector",
                                extra_config={"lmcache.mp.host": host, "lmcache.mp.port": int(port),
                                              "lmcache.mp.autostart": False}, **common)
        hook_times: list[float] = []
        t_conn = run(h, args.steps, args.running, seed=0, hook_times=hook_times)
        h.connector.shutdown()
    finally:
        server.kill()
    warm = args.steps // 10  # skip start-up steps (first lookups, allocator warm-up)
    tb, tc = t_base[warm:], t_conn[warm:]
    hk = hook_times[warm:]
    rows = [
        ("connector time per step p50 (ms)", _pct(hk, 0.5) * 1e3),
        ("connector time per step p99 (ms)", _pct(hk, 0.99) * 1e3),
        ("connector time per step max (ms)", max(hk) * 1e3),
        ("p50 step, no connector (ms)", _pct(tb, 0.5) * 1e3),
        ("p50 step, with connector (ms)", _pct(tc, 0.5) * 1e3),
        ("p99 step, no connector (ms)", _pct(tb, 0.99) * 1e3),
        ("p99 step, with connector (ms)", _pct(tc, 0.99) * 1e3),
    ]
    lines = [f"bench_load: {args.running} running requests, {args.steps} steps (first {warm} skipped), "
             "real Scheduler + real LMCache server",
             *(f"{name:<34} {val:8.3f}" for name, val in rows),
             "connector time = all scheduler-side hooks of a step (the overhead it adds); "
             "whole-step times differ also because hits shorten prefills",
             "target: connector time p99 <= 1 ms"]
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
