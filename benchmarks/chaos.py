"""Chaos run: N seeded fault episodes against a real vLLM CPU engine, our connector, a fault
proxy and a real LMCache server (see ``tests/helpers/chaos.py`` for what one episode does
and checks). Many episodes share one engine process.

    python benchmarks/chaos.py --episodes 200 --seed 1000 --out chaos.json --write-table

Episode seeds are S, S+1, ..., S+N-1; ``--seed S --episodes 1`` replays episode S. Prints,
per fault kind: runs, how many fired, requests, max request latency, max engine-step stall
(longest gap between two tokens of a decode-only canary request), and failures (hung,
failed, changed tokens, leaked locks, engine died or hung). Exit status 1 if any failed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from _report import save  # sibling module (run as a script)
from tests.conftest import LMCacheServer
from tests.helpers.chaos import ChaosConfig, ChaosRig, format_table, summarize
from tests.helpers.chaos_plan import FAULT_KINDS, plan_episode

RESULTS = Path(__file__).parent / "results" / "chaos.txt"


def _phases(rec: dict) -> str:
    """Where an episode's time went: baseline, warm-up stores, requests, heal, lock wait."""
    keys = (("b", "baseline_s"), ("w", "warm_s"), ("e", "episode_s"), ("h", "heal_s"),
            ("l", "lock_wait_s"))
    return " ".join(f"{k}{rec[v]:.0f}" for k, v in keys if rec.get(v) is not None)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--episodes", type=int, default=20)
    ap.add_argument("--seed", type=int, default=1000, help="seed of the first episode")
    ap.add_argument("--kinds", default="", help="comma-separated fault kinds to force "
                    f"(default: random); known: {','.join(FAULT_KINDS)}")
    ap.add_argument("--bound", type=float, default=30.0, help="per-request bound (s)")
    ap.add_argument("--out", type=Path, help="write every episode's record as JSON")
    ap.add_argument("--write-table", action="store_true", help=f"also write {RESULTS}")
    ap.add_argument("--keep-logs", action="store_true", help="keep server/engine logs")
    ap.add_argument("--connector-config", type=json.loads, default={},
                    help="extra kv_connector_extra_config entries (JSON)")
    ap.add_argument("--dtype", default=ChaosConfig.dtype, help="engine dtype (float32: "
                    "exact token comparison; bfloat16 may need --tie-margin)")
    ap.add_argument("--tie-margin", type=float, default=ChaosConfig.tie_margin,
                    help="baseline top-1/top-2 logprob margin below which a changed token "
                    "counts as a numerical near-tie (default 0: every changed token is a failure)")
    ap.add_argument("--control", action="store_true", help="run each plan's requests on "
                    "the no-connector engine without faults instead (checks the checker)")
    ns = ap.parse_args(argv)
    os.environ.setdefault("LMCACHE_TRACK_USAGE", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    kinds = [k for k in ns.kinds.split(",") if k] or None
    workdir = Path(tempfile.mkdtemp(prefix="kvconn-chaos-"))
    cfg = ChaosConfig(bound_s=ns.bound, dtype=ns.dtype, tie_margin=ns.tie_margin,
                      extra_connector_config=ns.connector_config)
    t0 = time.monotonic()
    rig = ChaosRig(lambda: LMCacheServer(log_dir=workdir).start(), workdir, cfg)
    print(f"engine ready in {rig.engine_start_s:.0f}s; logs in {workdir}", flush=True)
    records = []
    try:
        for seed in range(ns.seed, ns.seed + ns.episodes):
            plan = plan_episode(seed, kinds=kinds, max_tokens=cfg.max_tokens)
            rec = rig.run_control(plan) if ns.control else rig.run_episode(plan)
            records.append(rec)
            fails = ", ".join(sorted({f["type"] for f in rec["failures"]})) or "ok"
            print(f"episode {seed} {plan.label:<28} fired={','.join(rec.get('fired', []))}"
                  f" reqs={rec.get('n_requests', 0)} max_lat={rec.get('max_latency_s', 0):.1f}s"
                  f" stall={rec.get('stall_s', 0):.2f}s pre={rec.get('preemptions', 0)}"
                  f" t={rec['total_s']:.0f}s ({_phases(rec)}): {fails}",
                  flush=True)
            for t in rec.get("near_ties", []):
                print(f"    near tie (not a failure): {t}", flush=True)
            for f in rec["failures"]:
                print(f"    {f['type']}: {f.get('request', '')} {str(f['detail'])[:300]}",
                      flush=True)
    finally:
        end_resources = rig.resources() if rig.engine is not None else None
        start_resources = rig.baseline_snapshot
        rig.close()
    elapsed = time.monotonic() - t0
    table = summarize(records)
    failed = [r for r in records if r["failures"]]
    text = "\n".join([
        f"chaos: {len(records)} episodes, seeds {ns.seed}..{ns.seed + ns.episodes - 1}, "
        f"bound {ns.bound:.0f}s, {len(failed)} with failures, {elapsed:.0f}s total "
        f"({rig.engine_starts} engine start(s), first {rig.engine_start_s:.0f}s)",
        format_table(table),
        f"engine resources after start-up: {start_resources}",
        f"engine resources at the end:     {end_resources}",
    ])
    if ns.write_table:
        save(RESULTS, text)
    else:
        print(text)
    if ns.out:
        ns.out.write_text(json.dumps({"args": vars(ns) | {"out": str(ns.out)},
                                      "elapsed_s": elapsed, "summary": table,
                                      "resources": {"start": start_resources,
                                                    "end": end_resources},
                                      "episodes": records}, indent=1, default=str))
    if not ns.keep_logs and not failed:
        shutil.rmtree(workdir, ignore_errors=True)
    elif failed:
        print(f"logs kept in {workdir}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
