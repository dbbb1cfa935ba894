"""TTFT of an LMCache hit vs recompute, our connector vs LMCache's shipped one.

One LMCache server, one random-weight model big enough that recomputing a 1k-token prefix
takes over a second on a small CPU, the same prompts for everyone, in one run:

* recompute: a fresh engine without any connector;
* per connector: engine #1 stores the prompts, a fresh engine #2 is timed (its vLLM prefix
  cache is cold, so the prefix can only come from LMCache).

TTFT is the wall time of a 1-token generation per prompt (median over prompts). Each engine
first serves ``--warmup`` prompts of its own (stored by engine #1 too, so engine #2's warm-up
is a hit) that are not timed: an engine's first hit pays one-off costs (connections, first
transfer, first forward of a shape), and a connector paying more of them on its first
requests would otherwise look slower than it serves. Targets: hit TTFT <= 0.2x recompute,
ours no slower than LMCache's connector.

``python benchmarks/bench_e2e.py [--preset bench] [--prompts 4] [--prefix 1024]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _report import save  # sibling module (benchmarks run as scripts)
from kvconn_plugin.config import parse_config
from kvconn_plugin.demo import make_prompts
from kvconn_plugin.server.autostart import free_port, maybe_autostart
from kvconn_plugin.tools.run_engine import run_engine
from kvconn_plugin.tools.tiny_model import PRESETS, write_tiny_llama


def _kvt(port: int, impl: str, lookup_timeout: float | None = None) -> dict:
    return {
        "kv_connector": "KVConnPluginConnector" if impl == "builtin" else "LMCacheMPConnector",
        "kv_role": "kv_both",
        "kv_connector_module_path": "kvconn_plugin.connector",
        "kv_connector_extra_config": {
            "lmcache.mp.host": "tcp://127.0.0.1", "lmcache.mp.port": port,
            "lmcache.mp.autostart": False, "kvconn.impl": impl,
            "lmcache.mp.mp_transfer_mode": "engine_driven",
            **({"kvconn.lookup_timeout": lookup_timeout} if lookup_timeout else {}),
        },
    }


def _median_ttft(result: dict, skip: int = 0) -> float:
    """Median TTFT past the ``skip`` warm-up prompts."""
    return statistics.median([r["ttft_s"] for r in result["results"]][skip:])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="bench", choices=sorted(PRESETS))
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--prefix", type=int, default=1024)
    ap.add_argument("--warmup", type=int, default=1,
                    help="untimed prompts each engine serves first (0: time the cold start)")
    ap.add_argument("--tp", type=int, default=1, choices=(1, 2),
                    help="tensor parallel size (2: vLLM's mp executor, one core per rank)")
    ap.add_argument("--lookup-timeout", type=float, default=None,
                    help="kvconn.lookup_timeout for ours (default: the connector's)")
    ap.add_argument("--out", default=None,
                    help="default: benchmarks/results/bench_e2e.txt (bench_e2e_tp2.txt at TP=2)")
    args = ap.parse_args(argv)
    out = args.out or ("benchmarks/results/bench_e2e.txt" if args.tp == 1
                       else f"benchmarks/results/bench_e2e_tp{args.tp}.txt")
    # TP=2 on vLLM CPU: ranks bound by hand (its automatic binding needs NUMA nodes).
    engine_args = ({} if args.tp == 1 else
                   {"tensor_parallel_size": args.tp, "distributed_executor_backend": "mp"})
    env = {} if args.tp == 1 else {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}
    t_start = time.time()
    rows: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory(prefix="kvconn-bench-e2e-") as tmp:
        model = write_tiny_llama(Path(tmp) / "model", **PRESETS[args.preset])
        vocab = PRESETS[args.preset]["vocab_size"]
        # Distinct prefixes per prompt: every timed prompt is a cold vLLM miss.
        prompts = [p for i in range(args.warmup + args.prompts)
                   for p in make_prompts(1, args.prefix, 16, vocab, seed=100 + i)]
        log = Path(tmp) / "engines.log"
        base = run_engine(model, prompts, max_tokens=1, log_path=log,
                          engine_args=engine_args, env=env)
        recompute = _median_ttft(base, args.warmup)
        rows.append(("recompute (no connector)", f"{recompute * 1e3:9.1f} ms   1.00x"))
        port = free_port()
        server = maybe_autostart(parse_config({"lmcache.mp.autostart.server_args":
                                               "--l1-size-gb 2 --eviction-policy LRU"}),
                                 f"tcp://127.0.0.1:{port}")
        hits: dict[str, float] = {}
        try:
            for impl in ("builtin", "lmcache"):
                name = ("ours (KVConnPluginConnector)" if impl == "builtin"
                        else "lmcache's LMCacheMPConnector")
                try:
                    kvt = _kvt(port, impl, args.lookup_timeout if impl == "builtin" else None)
                    run_engine(model, prompts, kv_transfer_config=kvt, max_tokens=1,
                               log_path=log, engine_args=engine_args, env=env)
                    e2 = run_engine(model, prompts, kv_transfer_config=kvt, max_tokens=1,
                                    log_path=log, engine_args=engine_args, env=env)
                except RuntimeError as exc:
                    rows.append((name, f"n/a ({str(exc).splitlines()[0][:80]})"))
                    continue
                hit_tokens = min(r["num_cached_tokens"] for r in e2["results"][args.warmup:])
                hits[impl] = _median_ttft(e2, args.warmup)
                rows.append((f"hit via {name}",
                             f"{hits[impl] * 1e3:9.1f} ms   {hits[impl] / recompute:.2f}x   "
                             f"(min hit tokens {hit_tokens})"))
        finally:
            if server is not None:
                server.stop()
    lines = [
        f"bench_e2e: preset {args.preset}, TP={args.tp}, {args.prompts} timed prompts after "
        f"{args.warmup} "
        f"warm-up, {args.prefix}-token prefix + 16, "
        "TTFT = 1-token generation, median over prompts",
        f"{'path':<44} {'TTFT':>12}   vs recompute",
        "-" * 80,
        *(f"{a:<44} {b}" for a, b in rows),
    ]
    if "builtin" in hits and "lmcache" in hits:
        lines.append(f"ours / lmcache hit TTFT: {hits['builtin'] / hits['lmcache']:.2f} "
                     "(<= 1.00 means ours is not slower)")
    lines.append(f"(total {time.time() - t_start:.0f}s)")
    save(out, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
