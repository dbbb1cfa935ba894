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

Where the hit's time goes, from vLLM's own request timestamps: ``wait`` (queued until first
scheduled for a forward, so the connector's lookup and any asynchronous load) and
``prefill`` (scheduled until the first token: the forward of the uncached tail, plus any
synchronous load). The floor of a hit is measured on the same engine: right after its timed
hit, each prompt runs once more and hits vLLM's own prefix cache (same cached tokens, same
tail forward, nothing copied). ``hit - local`` is then what the connector adds: lookup,
scheduling steps and the copy of the hit bytes (``bench_transfer.py`` times that copy alone).

Float32 by default: on CPUs without AVX-512 bfloat16 matmuls are emulated and ~60x slower,
which would make the tail forward, not the connector, decide every figure.

``python benchmarks/bench_e2e.py [--preset bench] [--prompts 4] [--prefix 1024] [--dtype float32]
[--repeats 3]``: with repeats, several fresh engines #2 per connector, interleaved, pooled.
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


def _median(result: dict, key: str, skip: int = 0) -> float | None:
    """Median of one per-prompt figure past the ``skip`` warm-up prompts (None if absent)."""
    values = [r[key] for r in result["results"][skip:] if r.get(key) is not None]
    return statistics.median(values) if values else None


def _median_ttft(result: dict, skip: int = 0) -> float | None:
    return _median(result, "ttft_s", skip)


def _split(result: dict, skip: int) -> str:
    wait, prefill = _median(result, "wait_s", skip), _median(result, "prefill_s", skip)
    if wait is None or prefill is None:
        return f"{'-':>8} {'-':>8}"
    return f"{wait * 1e3:8.1f} {prefill * 1e3:8.1f}"


def add_prompt_args(ap: argparse.ArgumentParser) -> None:
    """The model and prompts of the benchmarks that time engines (``bench_l2.py`` too)."""
    ap.add_argument("--preset", default="bench", choices=sorted(PRESETS))
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--prefix", type=int, default=1024)
    ap.add_argument("--warmup", type=int, default=1,
                    help="untimed prompts each engine serves first (0: time the cold start)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_prompt_args(ap)
    ap.add_argument("--repeats", type=int, default=1,
                    help="fresh engines #2 per connector, interleaved; figures pool them")
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
    engine_args = {"dtype": args.dtype, **({} if args.tp == 1 else
                   {"tensor_parallel_size": args.tp, "distributed_executor_backend": "mp"})}
    timed = {"timestamps": True, "time_local_hit": True}
    env = {} if args.tp == 1 else {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}
    t_start = time.time()
    rows: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory(prefix="kvconn-bench-e2e-") as tmp:
        model = write_tiny_llama(Path(tmp) / "model", dtype=args.dtype,
                                 **PRESETS[args.preset])
        vocab = PRESETS[args.preset]["vocab_size"]
        # Distinct prefixes per prompt: every timed prompt is a cold vLLM miss.
        prompts = [p for i in range(args.warmup + args.prompts)
                   for p in make_prompts(1, args.prefix, 16, vocab, seed=100 + i)]
        log = Path(tmp) / "engines.log"
        base = run_engine(model, prompts, max_tokens=1, log_path=log,
                          engine_args=engine_args, env=env, **timed)
        recompute = _median_ttft(base, args.warmup)
        rows.append(("recompute (no connector)",
                     f"{recompute * 1e3:9.1f} {_split(base, args.warmup)}   1.00x"))
        local = _median(base, "local_hit_ttft_s", args.warmup)
        rows.append(("  local hit, same engine (vLLM's own cache)",
                     f"{local * 1e3:9.1f} {'':17}   {local / recompute:.2f}x"))
        port = free_port()

        def _kvt_for(impl: str) -> dict:
            return _kvt(port, impl, args.lookup_timeout if impl == "builtin" else None)

        server = maybe_autostart(parse_config({"lmcache.mp.autostart.server_args":
                                               "--l1-size-gb 2 --eviction-policy LRU"}),
                                 f"tcp://127.0.0.1:{port}")
        names = {"builtin": "ours (KVConnPluginConnector)",
                 "lmcache": "lmcache's LMCacheMPConnector"}
        runs: dict[str, list[dict]] = {}
        try:
            for impl, name in names.items():  # engine #1 of each stores the prompts
                try:
                    run_engine(model, prompts, kv_transfer_config=_kvt_for(impl), max_tokens=1,
                               log_path=log, engine_args=engine_args, env=env)
                    runs[impl] = []
                except RuntimeError as exc:
                    rows.append((name, f"n/a ({str(exc).splitlines()[0][:80]})"))
            for _ in range(args.repeats):  # fresh engines #2, interleaved
                for impl in list(runs):
                    runs[impl].append(run_engine(
                        model, prompts, kv_transfer_config=_kvt_for(impl), max_tokens=1,
                        log_path=log, engine_args=engine_args, env=env, **timed))
        finally:
            if server is not None:
                server.stop()
        hits: dict[str, float] = {}
        floors: dict[str, float] = {}
        for impl, engines in runs.items():
            pooled = {"results": [r for e in engines for r in e["results"][args.warmup:]]}
            hit_tokens = min(r["num_cached_tokens"] for r in pooled["results"])
            hits[impl] = _median_ttft(pooled)
            rows.append((f"hit via {names[impl]}",
                         f"{hits[impl] * 1e3:9.1f} {_split(pooled, 0)}   "
                         f"{hits[impl] / recompute:.2f}x   (min hit tokens {hit_tokens})"))
            floors[impl] = _median(pooled, "local_hit_ttft_s")
            over = statistics.median(r["ttft_s"] - r["local_hit_ttft_s"]
                                     for r in pooled["results"])
            # The floor only means something if it reused as many tokens as the hit did.
            local_tokens = min(r["local_hit_tokens"] for r in pooled["results"])
            rows.append(("  local hit, same engines",
                         f"{floors[impl] * 1e3:9.1f} {'':17}   "
                         f"{floors[impl] / recompute:.2f}x   (hit - local: {over * 1e3:.1f} ms, "
                         f"min local hit tokens {local_tokens})"))
    lines = [
        f"bench_e2e: preset {args.preset} {args.dtype}, TP={args.tp}, {args.prompts} timed "
        f"prompts after {args.warmup} "
        f"warm-up, {args.prefix}-token prefix + 16, {args.repeats} fresh engine(s) #2 per "
        "connector, TTFT = 1-token generation, median over prompts and engines (ms)",
        f"{'path':<44} {'TTFT':>9} {'wait':>8} {'prefill':>8}   vs recompute",
        "-" * 90,
        *(f"{a:<44} {b}" for a, b in rows),
    ]
    if "builtin" in hits and "lmcache" in hits:
        lines.append(f"ours / lmcache hit TTFT: {hits['builtin'] / hits['lmcache']:.2f} "
                     "(<= 1.00 means ours is not slower)")
        lines.append("hit / local hit on the same engines: ours "
                     f"{hits['builtin'] / floors['builtin']:.2f}, lmcache "
                     f"{hits['lmcache'] / floors['lmcache']:.2f}; lmcache's local hit / "
                     f"lmcache's hit: {floors['lmcache'] / hits['lmcache']:.2f} (no connector "
                     "can beat that ratio)")
        if args.repeats > 1:
            per = [_median_ttft(a, args.warmup) / _median_ttft(b, args.warmup)
                   for a, b in zip(runs["builtin"], runs["lmcache"], strict=True)]
            lines.append("ours / lmcache per engine pair: " + " ".join(f"{x:.2f}" for x in per))
    lines.append(f"(total {time.time() - t_start:.0f}s)")
    save(out, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
