"""How long a ping waits behind a burst of lookups, and whether more server threads help.

The server runs LOOKUP, QUERY_PREFETCH_STATUS, FREE_LOOKUP_LOCKS, END_SESSION and PING in one
thread pool (``--max-cpu-workers``, default 1) fed by one FIFO queue. A burst of lookups
therefore delays every ping queued after it: the scheduler's health check can then time out
and the connector goes degraded (stops sending lookups) until the server catches up. This
measures, for each ``--max-cpu-workers`` value, in the same run against real servers:

  * the server's lookup throughput (lookups/s while draining a burst of ``--burst`` lookups of
    ``--tokens`` cached tokens each);
  * how long a ping sent right behind the burst waits (median and worst of ``--rounds``);
  * the ratio of that wait to the burst's own drain time (1.0 = the ping waited for all of it).

``python benchmarks/bench_lookup_flood.py [--burst 300] [--tokens 4096] [--workers 1 4]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _report import save  # sibling module (run as a script)
from kvconn_plugin.client.api import LMCacheClient
from kvconn_plugin.client.protocol import CacheKey
from tests.conftest import LMCacheServer
from tests.helpers.seed import seed_server

MODEL = "flood"


def measure(workers: int, burst: int, tokens: int, rounds: int) -> dict[str, float]:
    log_dir = Path(tempfile.mkdtemp(prefix="kvconn-bench-flood-"))
    server = LMCacheServer(log_dir=log_dir,
                           extra_args=("--max-cpu-workers", str(workers))).start()
    try:
        ids = list(range(1, tokens + 1))
        seed_server(server.url, MODEL, ids)
        waits, drains = [], []
        with LMCacheClient(server.url, control_timeout=120) as client:
            # Async lookups fail fast while no connection is up; a blocking ping waits for it.
            client.ping(None, timeout=120)
            for r in range(rounds + 1):  # round 0 warms the server up
                pending = []
                t0 = time.perf_counter()
                for i in range(burst):
                    rid = f"flood-{r}-{i}-{uuid.uuid4().hex[:8]}"
                    key = CacheKey(model_name=MODEL, world_size=1, worker_id=None,
                                   token_ids=ids, start=0, end=tokens, request_id=rid)
                    pending.append((rid, key, client.lookup_async(key)))
                t_ping = time.perf_counter()
                client.ping(None, timeout=120)
                wait = time.perf_counter() - t_ping
                for _, _, fut in pending:
                    fut.result(120)
                drain = time.perf_counter() - t0
                for rid, key, _ in pending:  # every lookup read-locked its hits
                    client.free_lookup_locks_async(key, 1)
                    client.end_session_async(rid)
                client.ping(None, timeout=120)  # queued behind the releases: all done
                if r:
                    waits.append(wait)
                    drains.append(drain)
    finally:
        server.kill()  # also unlinks its SHM pool
    return {
        "lookups_per_s": burst / statistics.median(drains),
        "ping_wait_p50_ms": statistics.median(waits) * 1e3,
        "ping_wait_max_ms": max(waits) * 1e3,
        "wait_over_drain": statistics.median(w / d for w, d in zip(waits, drains, strict=True)),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--burst", type=int, default=300, help="lookups sent back to back")
    ap.add_argument("--tokens", type=int, default=4096, help="cached tokens per lookup")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 4],
                    help="--max-cpu-workers values to compare")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" /
                                         "bench_lookup_flood.txt"))
    args = ap.parse_args()
    t0 = time.perf_counter()
    lines = [f"ping behind a burst of {args.burst} lookups x {args.tokens} cached tokens, "
             f"{args.rounds} rounds per server",
             f"{'max-cpu-workers':>16} {'lookups/s':>10} {'ping wait p50 ms':>17} "
             f"{'max ms':>8} {'wait/drain':>11}"]
    for w in args.workers:
        m = measure(w, args.burst, args.tokens, args.rounds)
        lines.append(f"{w:>16} {m['lookups_per_s']:>10.0f} {m['ping_wait_p50_ms']:>17.0f} "
                     f"{m['ping_wait_max_ms']:>8.0f} {m['wait_over_drain']:>11.2f}")
    lines.append(f"run time {time.perf_counter() - t0:.0f} s")
    save(args.out, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
