"""Chaos episodes on a real vLLM CPU engine: our connector talks to a real LMCache server
through the fault proxy, which drops, delays, reorders, resets, closes, freezes and truncates
at random points, while the server itself is killed (-9), stopped (SIGSTOP) or restarted.

One engine serves every episode (``tests/helpers/chaos.py``). Each episode is a fixed seed,
with one fault kind forced so that CI covers every kind; where and how the fault strikes
is drawn from the seed. Every episode must end with every request finished (or aborted by
us) within 30 s, the baseline's greedy tokens, a live engine, and the server's read/write
locks back to 0 once healed. ``benchmarks/chaos.py`` runs many random seeds.
"""

from __future__ import annotations

import json
import time

import pytest

from tests.helpers.chaos import ChaosConfig, ChaosRig
from tests.helpers.chaos_plan import FAULT_KINDS, plan_episode

pytestmark = [pytest.mark.engine, pytest.mark.lmcache_server, pytest.mark.chaos,
              pytest.mark.slow]

# (seed, forced kinds): every kind once, a control without faults, and two combinations.
CI_EPISODES = [(7100 + i, [kind]) for i, kind in enumerate(FAULT_KINDS)] + [
    (7200, []), (7201, ["reset", "kill9"]), (7202, ["delay_reply", "sigstop"])]


@pytest.fixture(scope="module")
def rig(lmcache_server_factory, tmp_path_factory):
    t0 = time.monotonic()
    r = ChaosRig(lambda: lmcache_server_factory(), tmp_path_factory.mktemp("chaos"),
                 ChaosConfig())
    r.timings = {"start_s": time.monotonic() - t0, "episodes_s": 0.0}
    yield r
    r.close()
    print(f"\nchaos rig: engine start {r.timings['start_s']:.0f}s, episodes "
          f"{r.timings['episodes_s']:.0f}s")


def _explain(rec: dict) -> str:
    keep = {k: rec.get(k) for k in ("seed", "faults", "fired", "failures", "locks",
                                    "max_latency_s", "stall_s")}
    return (json.dumps(keep, indent=1, default=str)
            + "\nfault log:\n" + "\n".join(json.dumps(e) for e in rec["fault_log"][:40])
            + "\nconnector log:\n" + "\n".join(rec.get("connector_log", [])[-30:])
            + f"\nreplay: python benchmarks/chaos.py --seed {rec['seed']} --episodes 1 "
            f"--kinds {','.join(k for k in rec['kinds'] if k != 'none')}")


@pytest.mark.parametrize(("seed", "kinds"), CI_EPISODES,
                         ids=[f"{'+'.join(k) or 'none'}-{s}" for s, k in CI_EPISODES])
def test_chaos_episode(rig, seed, kinds):
    plan = plan_episode(seed, kinds=kinds)
    t0 = time.monotonic()
    rec = rig.run_episode(plan)
    rig.timings["episodes_s"] += time.monotonic() - t0
    assert not rec["failures"], _explain(rec)
    assert rec["max_latency_s"] <= rig.cfg.bound_s


def test_nothing_leaks_across_episodes(rig):
    """Run after the episodes (file order): the engine's threads, descriptors and sockets
    did not grow with them, and no connection beyond the engine's own two is left."""
    if rig.engine is None:
        rig.start_engine()
    before, after = rig.baseline_snapshot, rig.resources()
    assert after["processes"] == before["processes"]
    assert after["threads"] <= before["threads"] + 8, (before, after)
    assert after["fds"] <= before["fds"] + 16, (before, after)
    assert after["sockets"] <= before["sockets"] + 4, (before, after)
    assert after["proxy_connections"] <= 2, after
