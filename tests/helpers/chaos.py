"""The chaos rig: a real LMCache server, the fault proxy in front of it, and one engine child
(``chaos_child``) whose connector talks to the proxy. Episodes share the engine:

1. the plan's new prompts get their baseline tokens (no-connector engine, one at a time);
2. the warm prompts are stored without faults, then vLLM's prefix cache is reset, so hits
   in the episode come from LMCache;
3. the faults are armed and the requests run (aborts and preemptions included);
4. heal: proxy back to pass-through, a stopped server continued, a dead one restarted on
   the same port;
5. check: every request finished (or was aborted by us) within the bound, with the
   baseline's tokens; the engine lives; the server's read/write locks drop to 0.

Failures are recorded per episode with the fault log and the connector's log lines.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from kvconn_plugin.tools.procgroup import group_members, stop_process_group
from kvconn_plugin.tools.tiny_model import PRESETS, write_tiny_llama
from tests.helpers.chaos_plan import CHUNK, MAX_MODEL_LEN, EpisodePlan
from tests.helpers.connector_config import kv_transfer_config
from tests.helpers.engine import child_env
from tests.helpers.fault_proxy import Fault, FaultProxy
from tests.helpers.seed import server_lock_counts

# Orphaned write reservations are accepted only after this long (in-flight stores settle).
ORPHAN_SETTLE_S = 5.0


@dataclass
class ChaosConfig:
    bound_s: float = 30.0            # every request finishes (or is aborted) within this
    heartbeat_s: float = 1.0         # lmcache.mp.heartbeat_interval
    transfer_timeout_s: float = 5.0  # kvconn.transfer_timeout
    lookup_timeout_s: float = 1.0    # kvconn.lookup_timeout
    mq_timeout_s: float = 2.0        # lmcache.mp.mq_timeout
    max_tokens: int = 48
    kv_cache_bytes: int = 6 << 20    # 48 blocks of 128 tokens: preemptions under load
    max_num_seqs: int = 8
    lock_wait_s: float = 40.0        # > the scheduler's 30 s drain of unknown lookups
    engine_start_s: float = 420.0
    # float32: runs with and without a connector give the same greedy tokens (checked with
    # ``benchmarks/chaos.py --control``), so every changed token is a failure. In bfloat16
    # another batch composition alone can flip a near-tie.
    dtype: str = "float32"
    # Opt-in for bfloat16 runs only: a token that differs where the baseline's top-1/top-2
    # logprob margin is below this counts as a near-tie, not a changed token (0: off).
    tie_margin: float = 0.0
    extra_connector_config: dict[str, Any] = field(default_factory=dict)
    # More engine arguments for both engines (e.g. ``num_gpu_blocks_override``); they win.
    extra_engine_args: dict[str, Any] = field(default_factory=dict)


class EngineGone(RuntimeError):
    """The engine child died or stopped answering."""


class _EngineChild:
    def __init__(self, spec: dict[str, Any], workdir: Path, start_timeout: float):
        self.log_path = workdir / "engine.log"
        spec_path = workdir / "spec.json"
        spec_path.write_text(json.dumps(spec))
        r, w = os.pipe()
        env = child_env({"CHAOS_REPLY_FD": str(w), "VLLM_LOGGING_LEVEL": "INFO"})
        # When set, VLLM_CPU_KVCACHE_SPACE (whole GiB) overrides kv_cache_memory_bytes.
        env.pop("VLLM_CPU_KVCACHE_SPACE", None)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.helpers.chaos_child", str(spec_path)],
            stdin=subprocess.PIPE, stdout=self._log, stderr=subprocess.STDOUT, env=env,
            pass_fds=(w,), start_new_session=True)
        os.close(w)
        self._replies = os.fdopen(r, "r")
        self._lines: list[str] = []
        self._cv = threading.Condition()
        self._reader = threading.Thread(target=self._read, name="chaos-replies", daemon=True)
        self._reader.start()
        try:
            self.pid = self.request(None, start_timeout)["pid"]
        except BaseException:
            self.close()
            raise

    def _read(self) -> None:
        for line in self._replies:
            with self._cv:
                self._lines.append(line)
                self._cv.notify_all()
        with self._cv:
            self._lines.append("")  # EOF marker
            self._cv.notify_all()

    def request(self, cmd: dict[str, Any] | None, timeout: float) -> dict[str, Any]:
        if cmd is not None:
            try:
                self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
                self.proc.stdin.flush()
            except (BrokenPipeError, OSError) as exc:
                raise EngineGone(f"engine child gone: {exc!r}") from None
        deadline = time.monotonic() + timeout
        with self._cv:
            while not self._lines:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise EngineGone(f"no reply to {cmd and cmd['cmd']} within {timeout:.0f}s")
                self._cv.wait(min(left, 1.0))
            line = self._lines.pop(0)
        if not line:
            raise EngineGone(f"engine child exited ({self.proc.poll()})")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"engine child: {reply['error']}")
        return reply

    def log_offset(self) -> int:
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def log_since(self, offset: int) -> str:
        with open(self.log_path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            if self.proc.poll() is None:
                self.request({"cmd": "shutdown"}, 60)
        with contextlib.suppress(Exception):
            self.proc.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=60)
        stop_process_group(self.proc)
        self._reader.join(timeout=10)
        self._replies.close()
        self._log.close()


class ChaosRig:
    """Server + proxy + engine child. ``server_factory()`` returns a started
    ``tests.conftest.LMCacheServer`` (the fixture's factory, or a benchmark's own)."""

    def __init__(self, server_factory, workdir: Path, cfg: ChaosConfig | None = None):
        self.cfg = cfg or ChaosConfig()
        self.workdir = Path(workdir)
        self.server = server_factory()
        self.proxy = FaultProxy((self.server.host, self.server.port)).start()
        # Restarts mid-episode run on one long-lived thread: the server is started with a
        # parent-death signal, which Linux sends when the *thread* that forked it ends.
        self._restart_q: queue.Queue[bool] = queue.Queue()
        self._restart_idle = threading.Event()
        self._restart_idle.set()
        self.restart_errors: list[str] = []
        self._restarter = threading.Thread(target=self._restart_loop, name="chaos-restart",
                                           daemon=True)
        self._restarter.start()
        self.engine: _EngineChild | None = None
        self.baseline: dict[tuple[int, ...], list[int]] = {}
        self.engine_starts = 0
        try:
            self.model = write_tiny_llama(
                Path(os.environ.get("KVCONN_TEST_MODEL_CACHE", tempfile.gettempdir()))
                / "kvconn-tiny-llama-small", **PRESETS["small"])
            self.start_engine()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ lifecycle

    def spec(self) -> dict[str, Any]:
        c = self.cfg
        extra = {"lmcache.mp.heartbeat_interval": c.heartbeat_s,
                 "lmcache.mp.mq_timeout": c.mq_timeout_s,
                 "kvconn.transfer_timeout": c.transfer_timeout_s,
                 "kvconn.lookup_timeout": c.lookup_timeout_s, **c.extra_connector_config}
        return {"model": str(self.model),
                "kv_transfer_config": kv_transfer_config(self.proxy.url, **extra),
                "engine_args": {"dtype": c.dtype, "max_model_len": MAX_MODEL_LEN,
                                "enforce_eager": True, "seed": 0,
                                "max_num_seqs": c.max_num_seqs,
                                "kv_cache_memory_bytes": c.kv_cache_bytes,
                                **c.extra_engine_args}}

    def start_engine(self) -> None:
        t0 = time.monotonic()
        try:
            self.engine = _EngineChild(self.spec(), self.workdir, self.cfg.engine_start_s)
        except EngineGone as exc:
            tail = "\n".join(self.log_tail().splitlines()[-40:])
            raise EngineGone(f"{exc}; engine log tail:\n{tail}") from None
        self.engine_starts += 1
        self.engine_start_s = time.monotonic() - t0
        self.baseline_snapshot = self.resources()

    def log_tail(self) -> str:
        try:
            return (self.workdir / "engine.log").read_text(errors="replace")[-8000:]
        except OSError:
            return "(no engine log)"

    def close(self) -> None:
        self._restart_idle.wait(120)
        self._restart_q.put(False)
        self._restarter.join(timeout=10)
        if self.engine is not None:
            self.engine.close()
            self.engine = None
        self.proxy.close()
        self.server.kill()

    # ------------------------------------------------------------------ faults

    def _server_pid(self) -> int | None:
        proc = self.server.process
        return proc.pid if proc is not None and proc.poll() is None else None

    def _signal(self, sig: int) -> None:
        pid = self._server_pid()
        if pid is not None:
            os.killpg(pid, sig)

    def _restart_loop(self) -> None:
        while self._restart_q.get():
            try:
                self.server.kill()
                self.server.restart()
            except Exception as exc:  # heal() starts it again
                self.restart_errors.append(repr(exc))
            finally:
                self._restart_idle.set()

    def _restart_in_background(self) -> None:
        """kill -9 now, start again on the same port meanwhile (called on the proxy loop)."""
        self._signal(signal.SIGKILL)
        if self._restart_idle.is_set():
            self._restart_idle.clear()
            self._restart_q.put(True)

    def proxy_faults(self, specs: list[dict[str, Any]]) -> list[Fault]:
        out = []
        for s in specs:
            kw = {k: v for k, v in s.items() if k != "kind"}
            kind = s["kind"]
            if kind == "kill9":
                out.append(Fault("hook", label="kill9",
                                 action=lambda: self._signal(signal.SIGKILL), **kw))
            elif kind == "sigstop":
                out.append(Fault("hook", label="sigstop",
                                 action=lambda: self._signal(signal.SIGSTOP),
                                 undo=lambda: self._signal(signal.SIGCONT), **kw))
            elif kind == "restart":
                out.append(Fault("hook", label="restart", action=self._restart_in_background,
                                 **kw))
            else:
                out.append(Fault(kind, **kw))
        return out

    def heal(self) -> list[dict[str, Any]]:
        log = self.proxy.heal()
        self._restart_idle.wait(120)
        proc = self.server.process
        if proc is None or proc.poll() is not None:
            self.server.kill()      # reap the group, unlink the old pool
            self.server.restart()   # same port: the proxy's upstream stays valid
        if any(e["kind"] == "hook_ran" for e in log) or any(
                e["kind"] in ("reset", "close", "truncated", "freeze") for e in log):
            # Give the connector's heartbeat time to notice and re-register, so the next
            # episode's warm-up stores are not dropped for a reason of this one.
            time.sleep(3 * self.cfg.heartbeat_s)
        return log

    # ------------------------------------------------------------------ checks

    def lock_counts(self) -> tuple[int, int] | None:
        try:
            return server_lock_counts(self.server)
        except (Exception, pytest.skip.Exception):  # no answer (yet), or no lock counts
            return None

    def wait_locks_free(self, orphaned=lambda: (0, 0)) -> tuple[tuple[int, int] | None, float]:
        """Until the server holds no lock, or (after a settling time) only the locks
        ``orphaned()`` explains, or ``lock_wait_s``."""
        t0 = time.monotonic()
        while True:
            counts = self.lock_counts()
            waited = time.monotonic() - t0
            if counts == (0, 0) or waited > self.cfg.lock_wait_s:
                return counts, waited
            if counts is not None and waited > ORPHAN_SETTLE_S and explained(counts, orphaned()):
                return counts, waited
            time.sleep(0.25)

    def resources(self) -> dict[str, int]:
        """Threads, file descriptors and sockets of the engine's processes, live proxy
        connections and our /dev/shm entries: what must not grow episode after episode."""
        out = {"threads": 0, "fds": 0, "sockets": 0, "processes": 0}
        if self.engine is not None:
            for pid in group_members(self.engine.proc.pid):
                with contextlib.suppress(OSError):
                    out["threads"] += len(os.listdir(f"/proc/{pid}/task"))
                    fds = os.listdir(f"/proc/{pid}/fd")
                    out["fds"] += len(fds)
                    for fd in fds:
                        with contextlib.suppress(OSError):
                            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                                out["sockets"] += 1
                    out["processes"] += 1
        out["proxy_connections"] = self.proxy.live_connections()
        out["dev_shm"] = sum(1 for n in os.listdir("/dev/shm")
                             if n.startswith(("psm_", "sem.mp-", "mp-", "lmcache", "kvconn",
                                              "vllm", "torch_")))
        return out

    # ------------------------------------------------------------------ one episode

    def ensure_baseline(self, plan: EpisodePlan) -> None:
        """Baseline tokens (no connector, one prompt at a time) of the plan's new prompts."""
        new = [p for p in [*plan.warm, *(r["prompt"] for r in plan.requests)]
               if tuple(p) not in self.baseline]
        new = list({tuple(p): p for p in new}.values())
        if new:
            outs = self.engine.request({"cmd": "baseline", "prompts": new,
                                        "max_tokens": self.cfg.max_tokens},
                                       60 + 10 * len(new))["tokens"]
            self.baseline.update({tuple(p): o for p, o in zip(new, outs, strict=True)})

    def run_control(self, plan: EpisodePlan) -> dict[str, Any]:
        """The plan's requests, concurrently, on the no-connector engine, no faults: how
        often the comparison with the one-at-a-time baseline fails without our connector."""
        if self.engine is None:
            self.start_engine()
        t0 = time.monotonic()
        self.ensure_baseline(plan)
        rec: dict[str, Any] = {"seed": plan.seed, "kinds": ["control"], "faults": [],
                               "failures": [], "fired": []}
        out = self.engine.request({"cmd": "episode", "requests": plan.requests,
                                   "bound_s": self.cfg.bound_s, "engine": "base"},
                                  self.cfg.bound_s + 90)
        self.check_requests(plan, out, rec)
        rec["total_s"] = time.monotonic() - t0
        return rec

    def run_episode(self, plan: EpisodePlan) -> dict[str, Any]:
        cfg, t_start = self.cfg, time.monotonic()
        rec: dict[str, Any] = {"seed": plan.seed, "kinds": plan.kinds, "faults": plan.faults,
                               "failures": []}
        if self.engine is None:
            self.start_engine()
        engine = self.engine
        self.ensure_baseline(plan)
        rec["baseline_s"] = time.monotonic() - t_start
        warm = [{"id": f"w{plan.seed}x{i}", "prompt": p, "max_tokens": 1}
                for i, p in enumerate(plan.warm)]
        engine.request({"cmd": "episode", "requests": warm, "bound_s": cfg.bound_s,
                        "canary": False}, cfg.bound_s + 60)
        engine.request({"cmd": "reset_prefix_cache"}, 30)
        rec["warm_s"] = time.monotonic() - t_start - rec["baseline_s"]
        log_offset = engine.log_offset()
        self.proxy.arm(self.proxy_faults(plan.faults), seed=plan.seed)
        t_ep = time.monotonic()
        try:
            out = engine.request({"cmd": "episode", "requests": plan.requests,
                                  "bound_s": cfg.bound_s}, cfg.bound_s + 90)
        except EngineGone as exc:
            out = None
            rec["failures"].append({"type": "engine_hung_or_died", "detail": str(exc)})
        rec["episode_s"] = time.monotonic() - t_ep
        t_heal = time.monotonic()
        fault_log = self.heal()
        rec["heal_s"] = time.monotonic() - t_heal
        rec["fired"] = sorted({plan.faults[e["fault"]]["kind"] for e in fault_log
                               if e["kind"] == "triggered"})
        rec["fault_log"] = [e for e in fault_log if e["kind"] not in ("armed",)][:200]
        rec["messages"] = fault_log[-1].get("op_counts", {}) if fault_log else {}
        if out is not None:
            self.check_requests(plan, out, rec)
        counts, waited = self.wait_locks_free(lambda: orphaned_chunks(engine.log_since(log_offset)))
        rec["locks"], rec["lock_wait_s"] = counts, round(waited, 2)
        # LMCache can neither cancel a reservation nor take a FREE_LOOKUP_LOCKS twice safely:
        # the write locks of stores whose PREPARE_STORE the connector gave up on, and the read
        # locks of FREEs whose reply was lost, stay until the server's TTLs. The connector
        # logs each; any other lock, or more than those notes explain, is a leak.
        if (counts is not None and counts != (0, 0)
                and explained(counts, orphaned_chunks(engine.log_since(log_offset)))):
            rec["orphaned_read_locks"], rec["orphaned_write_locks"] = counts
            self.server.restart()  # the next episode starts from a clean server
        elif counts != (0, 0):
            lost = sorted({f"{e['kind']} {e.get('dir')} {e.get('op')}" for e in fault_log
                           if e["kind"] in ("dropped", "truncated")})
            rec["failures"].append({"type": "locks_leaked", "detail": f"(read, write) = {counts} "
                                    f"{cfg.lock_wait_s:.0f}s after healing; messages lost: "
                                    f"{lost or 'none dropped'}"})
            self.server.restart()  # the next episode starts from a clean server
        log_text = engine.log_since(log_offset)
        rec["connector_log"] = [ln[-300:] for ln in log_text.splitlines()
                                if "kvconn" in ln or "Traceback" in ln or "Error" in ln][-60:]
        if out is None or (out and out.get("engine_dead")):
            rec["engine_log_tail"] = log_text.splitlines()[-80:]
            with contextlib.suppress(Exception):
                engine.close()
            self.engine = None
        rec["resources"] = self.resources() if self.engine is not None else None
        rec["total_s"] = time.monotonic() - t_start
        return rec

    def check_requests(self, plan: EpisodePlan, out: dict[str, Any], rec: dict) -> None:
        """Record into ``rec`` the episode reply ``out`` of ``plan``: stall, preemptions,
        per-request status and latency; a failure for each hung, failed or changed request
        (tokens against ``self.baseline``)."""
        cfg = self.cfg
        rec["stall_s"] = out["stall"]
        rec["canary_tokens"] = out["canary_tokens"]
        rec["preemptions"] = out.get("preemptions", 0)
        reqs = out["requests"]
        rec["requests"] = [{k: r.get(k) for k in ("id", "status", "latency", "ttft", "cached",
                                                  "gaps_max")} for r in reqs]
        rec["n_requests"] = len(reqs)
        rec["max_latency_s"] = max((r["latency"] for r in reqs), default=0.0)
        if out.get("engine_dead"):
            rec["failures"].append({"type": "engine_died", "detail": "AsyncLLM errored"})
        if out.get("canary_error"):
            rec["failures"].append({"type": "failed", "detail": f"canary: {out['canary_error']}"})
        by_id = {r["id"]: r for r in plan.requests}
        rec["near_ties"] = []
        for r in reqs:
            want = self.baseline[tuple(by_id[r["id"]]["prompt"])]
            status, got = r["status"], r["tokens"]
            if status == "hung":
                rec["failures"].append({"type": "hung", "request": r["id"], "detail":
                                        f"not finished after {cfg.bound_s:.0f}s, "
                                        f"{len(got)} tokens streamed"})
                continue
            if status == "failed":
                rec["failures"].append({"type": "failed", "request": r["id"],
                                        "detail": r.get("error")})
                continue
            if status == "finished" and len(got) != by_id[r["id"]]["max_tokens"]:
                rec["failures"].append({"type": "changed_tokens", "request": r["id"], "detail":
                                        f"{len(got)} tokens, asked for "
                                        f"{by_id[r['id']]['max_tokens']}"})
                continue
            at = first_difference(got, want["tokens"])
            if at is None:
                continue
            margin = want["margins"][at] if at < len(want["margins"]) else 1e9
            if margin < cfg.tie_margin:
                # The baseline's top two tokens were nearly tied here: another batch
                # composition flips such a token without any connector (measured with the
                # connector's store and load off); what follows is no longer comparable.
                rec["near_ties"].append({"request": r["id"], "at": at,
                                         "margin": round(margin, 4)})
                continue
            rec["failures"].append({"type": "changed_tokens", "request": r["id"], "detail":
                                    f"{status}, token {at} of {len(got)} differs (baseline "
                                    f"margin {margin:.3f}): got {got[at:at + 8]} want "
                                    f"{want['tokens'][at:at + 8]}"})


def first_difference(got: list[int], want: list[int]) -> int | None:
    """Index of the first token of ``got`` that differs from ``want`` (``got`` may be a
    prefix: an aborted request), or None."""
    for i, tok in enumerate(got):
        if i >= len(want) or tok != want[i]:
            return i
    return None


_ORPHAN_WRITES = re.compile(r"holds (?:up to )?(\d+) chunk\(s\) write-reserved")
_ORPHAN_READS = re.compile(r"may keep (\d+) token\(s\) read-locked")


def orphaned_chunks(log_text: str) -> tuple[int, int]:
    """(read-locked, write-reserved) chunks the connector says the server may keep: those
    of FREE_LOOKUP_LOCKS whose reply was lost, and of stores it gave up on."""
    reads = sum(int(m.group(1)) // CHUNK for m in _ORPHAN_READS.finditer(log_text))
    writes = sum(int(m.group(1)) for m in _ORPHAN_WRITES.finditer(log_text))
    return reads, writes


def explained(counts: tuple[int, int], orphaned: tuple[int, int]) -> bool:
    """Whether the (read, write) lock counts are at most what the noted chunks explain
    (the server's status reports each locked object twice)."""
    return counts[0] <= 2 * orphaned[0] and counts[1] <= 2 * orphaned[1]


def summarize(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per fault kind (an episode counts for each of its kinds): runs, how many actually
    fired, requests, max request latency, max engine-step stall, failures by type."""
    table: dict[str, dict[str, Any]] = {}
    for rec in records:
        for kind in dict.fromkeys(rec["kinds"]):
            row = table.setdefault(kind, {"runs": 0, "fired": 0, "requests": 0,
                                          "max_latency_s": 0.0, "max_stall_s": 0.0,
                                          "hung": 0, "failed": 0, "changed_tokens": 0,
                                          "locks_leaked": 0, "engine": 0, "near_ties": 0,
                                          "orphaned_reads": 0, "orphaned_writes": 0})
            row["runs"] += 1
            row["fired"] += kind in rec.get("fired", []) or kind == "none"
            row["requests"] += rec.get("n_requests", 0)
            row["max_latency_s"] = max(row["max_latency_s"], rec.get("max_latency_s", 0.0))
            row["max_stall_s"] = max(row["max_stall_s"], rec.get("stall_s", 0.0))
            row["near_ties"] += len(rec.get("near_ties", []))
            row["orphaned_reads"] += rec.get("orphaned_read_locks", 0) // 2
            row["orphaned_writes"] += rec.get("orphaned_write_locks", 0) // 2
            for f in rec["failures"]:
                key = f["type"] if f["type"] in row else "engine"
                row[key] += 1
    return dict(sorted(table.items()))


def format_table(table: dict[str, dict[str, Any]]) -> str:
    cols = ("runs", "fired", "requests", "max_latency_s", "max_stall_s", "hung", "failed",
            "changed_tokens", "locks_leaked", "engine", "near_ties", "orphaned_reads",
            "orphaned_writes")
    head = f"{'fault kind':<16}" + "".join(f"{c:>15}" for c in cols)
    lines = [head, "-" * len(head)]
    for kind, row in table.items():
        cells = [f"{row[c]:>15.2f}" if isinstance(row[c], float) else f"{row[c]:>15d}"
                 for c in cols]
        lines.append(f"{kind:<16}" + "".join(cells))
    return "\n".join(lines)
