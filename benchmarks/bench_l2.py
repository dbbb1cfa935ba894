"""TTFT of a hit from LMCache's L2 tier (a real Redis) vs an L1 hit vs recompute.

The scale-out layout of the README's "Sharing a cache across nodes": two LMCache servers
with the same ``resp`` L2 adapter on one ``redis-server``, our connector on every engine,
one random-weight model, the same prompts everywhere, in one run:

* recompute: a fresh engine without a connector (and, on that engine, a second run of each
  prompt that hits vLLM's own prefix cache: the floor, nothing copied);
* engine A on server 1 stores the prompts; the run waits until Redis holds every chunk
  (LMCache copies L1 to L2 in the background);
* L1 hit: a fresh engine on server 1, whose L1 holds the chunks;
* L2 hit: a fresh engine on a freshly started server 2, whose L1 is empty: its lookup
  fetches the chunks from Redis into L1 before it answers (server 2's log counts them).

Each repeat starts a new server 2, so every L2 figure is a cold L1. TTFT is the wall time
of a 1-token generation, median over prompts and repeats; ``wait`` is queued-until-scheduled
(lookup, the L2 fetch, the asynchronous load), ``prefill`` the forward of the uncached tail.
Float32 (see ``bench_e2e.py``). Needs ``redis-server`` (``scripts/setup_env.sh`` installs it).

``python benchmarks/bench_l2.py [--preset bench] [--prompts 4] [--prefix 1024] [--repeats 2]``
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Sibling modules (benchmarks run as scripts).
from bench_e2e import add_prompt_args

from _report import save
from kvconn_plugin.demo import make_prompts
from kvconn_plugin.tools.run_engine import run_engine
from kvconn_plugin.tools.tiny_model import PRESETS, write_tiny_llama
from tests.conftest import LMCacheServer
from tests.helpers.connector_config import kv_transfer_config
from tests.helpers.redis_server import RedisServer, redis_server_binary

CHUNK = 256  # the servers' default chunk size
# LMCache's INFO line for each lookup that hit (how many chunks came from L1 and from L2).
PREFETCH_RE = re.compile(r"Prefetch request completed \(L1\+L2\): (\d+)/\d+ retained keys "
                         r"\((\d+) L1, (\d+) L2\)")


def _median(runs: list[dict], key: str, skip: int) -> float | None:
    values = [r[key] for run in runs for r in run["results"][skip:] if r.get(key) is not None]
    return statistics.median(values) if values else None


def _wait_for_l2(redis: RedisServer, n_keys: int, timeout: float = 120) -> int:
    """L1 -> L2 copies are asynchronous: wait until Redis holds every stored chunk."""
    deadline = time.monotonic() + timeout
    while True:
        n = redis.dbsize()
        if n >= n_keys or time.monotonic() > deadline:
            return n
        time.sleep(0.2)


def _l2_chunks(log: Path, since: int) -> tuple[int, int]:
    """Chunks server 2's lookups reported from L1 and from L2, in its log past ``since``."""
    l1 = l2 = 0
    for m in PREFETCH_RE.finditer(log.read_text(errors="replace")[since:]):
        l1, l2 = l1 + int(m.group(2)), l2 + int(m.group(3))
    return l1, l2


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_prompt_args(ap)
    ap.add_argument("--repeats", type=int, default=2,
                    help="L1-hit and L2-hit engines each (a new server 2 per L2 engine)")
    ap.add_argument("--out", default="benchmarks/results/bench_l2.txt")
    args = ap.parse_args(argv)
    binary = redis_server_binary()
    if binary is None:
        print("bench_l2: redis-server is not installed (scripts/setup_env.sh installs it)")
        return 2
    t_start = time.time()
    engine_args = {"dtype": args.dtype}
    timed = {"timestamps": True, "time_local_hit": True}
    with tempfile.TemporaryDirectory(prefix="kvconn-bench-l2-") as tmp_name:
        tmp = Path(tmp_name)
        model = write_tiny_llama(tmp / "model", dtype=args.dtype, **PRESETS[args.preset])
        vocab = PRESETS[args.preset]["vocab_size"]
        prompts = [p for i in range(args.warmup + args.prompts)
                   for p in make_prompts(1, args.prefix, 16, vocab, seed=300 + i)]
        # Whole chunks each prompt can hit: the prefix plus 16 tokens, the last token never.
        chunks = sum((len(p) - 1) // CHUNK for p in prompts)
        log = tmp / "engines.log"
        redis = RedisServer(binary, parent_dir=tmp).start()
        l2 = json.dumps({"type": "resp", "host": redis.host, "port": redis.port})
        servers: list[LMCacheServer] = []

        def start_server() -> LMCacheServer:
            server = LMCacheServer(l1_size_gb=2, extra_args=("--l2-adapter", l2), log_dir=tmp)
            servers.append(server.start())
            return server

        def engine(server: LMCacheServer | None, timed_run: bool = True) -> dict:
            kvt = None if server is None else kv_transfer_config(
                server.url, **{"kvconn.impl": "builtin"})
            return run_engine(model, prompts, kv_transfer_config=kvt, max_tokens=1,
                              log_path=log, engine_args=engine_args,
                              **(timed if timed_run else {}))

        l1_runs: list[dict] = []
        l2_runs: list[dict] = []
        fetched: list[tuple[int, int]] = []
        try:
            base = engine(None)
            server1 = start_server()
            engine(server1, timed_run=False)  # engine A stores
            in_redis = _wait_for_l2(redis, chunks)
            for _ in range(args.repeats):
                l1_runs.append(engine(server1))
                server2 = start_server()
                since = server2.log_path.stat().st_size
                l2_runs.append(engine(server2))
                fetched.append(_l2_chunks(server2.log_path, since))
                server2.kill()
                servers.remove(server2)
        finally:
            for server in servers:
                server.kill()
            redis.stop()
    skip = args.warmup
    recompute = _median([base], "ttft_s", skip)
    rows = [("recompute (no connector)", [base], "ttft_s"),
            ("local hit (vLLM's own cache, same engine)", [base], "local_hit_ttft_s"),
            ("L1 hit (server 1, which stored them)", l1_runs, "ttft_s"),
            ("L2 hit (fresh server 2, Redis)", l2_runs, "ttft_s")]
    lines = [
        f"bench_l2: preset {args.preset} {args.dtype}, {args.prompts} timed prompts after "
        f"{args.warmup} warm-up, {args.prefix}-token prefix + 16, two LMCache servers sharing "
        f"a redis-server L2 (resp adapter), {args.repeats} engine(s) per hit path, "
        "TTFT = 1-token generation, median over prompts and engines (ms)",
        f"{'path':<42} {'TTFT':>9} {'wait':>8} {'prefill':>8}   vs recompute",
        "-" * 86,
    ]
    for name, runs, key in rows:
        ttft = _median(runs, key, skip)
        if key == "ttft_s":
            wait, prefill = _median(runs, "wait_s", skip), _median(runs, "prefill_s", skip)
            split = (f"{wait * 1e3:8.1f} {prefill * 1e3:8.1f}" if wait is not None
                     and prefill is not None else f"{'-':>8} {'-':>8}")
        else:
            split = " " * 17
        extra = ""
        if runs is l1_runs or runs is l2_runs:
            # What the connector adds over vLLM's own cache on the same engines: the
            # same prompts run again right after, hitting vLLM's prefix cache.
            over = statistics.median(r["ttft_s"] - r["local_hit_ttft_s"] for run in runs
                                     for r in run["results"][skip:])
            extra = f"   (hit - local hit, same engines: {over * 1e3:.1f} ms)"
        lines.append(f"{name:<42} {ttft * 1e3:9.1f} {split}   {ttft / recompute:.2f}x{extra}")
    hit_tokens = {name: min(r["num_cached_tokens"] for run in runs for r in run["results"][skip:])
                  for name, runs, key in rows[2:]}
    lines += [
        "min cached tokens per timed prompt: " + ", ".join(
            f"{name.split(' (')[0]} {n}" for name, n in hit_tokens.items()),
        f"Redis held {in_redis} keys for {chunks} stored chunks; server 2's lookups per "
        "engine (chunks from L1, from L2): " + ", ".join(f"({a}, {b})" for a, b in fetched),
        "L2 hit / L1 hit: "
        f"{_median(l2_runs, 'ttft_s', skip) / _median(l1_runs, 'ttft_s', skip):.2f}",
        f"(total {time.time() - t_start:.0f}s)",
    ]
    save(args.out, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
