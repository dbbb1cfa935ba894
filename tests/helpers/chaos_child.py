"""The engine side of the chaos harness: one child process holding two ``AsyncLLM`` engines
with the same arguments, one through our connector (pointed at the fault proxy) and one
without any connector (the baseline), serving episodes on command.

Protocol: ``python -m tests.helpers.chaos_child SPEC.json``; commands arrive as JSON lines
on stdin, each answered by one JSON line on the file descriptor named by
``CHAOS_REPLY_FD`` (stdout and stderr are vLLM's log). Commands:

* ``baseline``: greedy tokens of ``prompts`` on the no-connector engine.
* ``episode``: run ``requests`` concurrently through the connector engine, each started after
  its ``delay_s``, some aborted by us after ``abort_after_tokens`` tokens or
  ``abort_after_s`` seconds, all under ``bound_s``; a canary request decodes throughout, and
  the largest gap between two of its tokens is the episode's engine-step stall.
* ``reset_prefix_cache``, ``pids``, ``shutdown``.

Why a canary: the engine step is where a blocking connector call would stall everyone; a
short-prompt request that only decodes gets one token per step, so its longest
inter-token gap bounds the longest step (a request merely waiting for its own load does
not stall it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

CANARY_PROMPT = [11, 12, 13, 14, 15, 16, 17, 18]


def _engine_args(spec: dict[str, Any], with_connector: bool):
    from vllm.config import KVTransferConfig
    from vllm.engine.arg_utils import AsyncEngineArgs

    kw = dict(spec["engine_args"])
    if with_connector:
        kw["kv_transfer_config"] = KVTransferConfig(**spec["kv_transfer_config"])
    return AsyncEngineArgs(model=spec["model"], **kw)


def _preemption_counter():
    """A vLLM stat logger (front end) that counts preempted requests, per engine step, with
    the time (``time.monotonic``, comparable across processes on one host) of each step
    that preempted, and sums the connector's counters (``kv_connector_stats``: hit tokens,
    staged stores, ...)."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class PreemptionCounter(StatLoggerBase):
        total = 0
        times: list[float] = []  # noqa: RUF012 - class-level on purpose, like ``total``
        connector: dict[str, float] = {}  # noqa: RUF012

        def __init__(self, vllm_config: Any, engine_index: int = 0):
            pass

        def record(self, scheduler_stats: Any, iteration_stats: Any,
                   mm_cache_stats: Any = None, engine_idx: int = 0) -> None:
            if iteration_stats is not None and iteration_stats.num_preempted_reqs:
                PreemptionCounter.total += iteration_stats.num_preempted_reqs
                if len(PreemptionCounter.times) < 100000:
                    PreemptionCounter.times.append(time.monotonic())
            kv = getattr(scheduler_stats, "kv_connector_stats", None) or {}
            for k, v in kv.items():
                if isinstance(v, (int, float)) and k != "degraded":
                    PreemptionCounter.connector[k] = PreemptionCounter.connector.get(k, 0) + v

        def log_engine_initialized(self) -> None:
            pass

    return PreemptionCounter


class Child:
    def __init__(self, spec: dict[str, Any]):
        from vllm.v1.engine.async_llm import AsyncLLM

        self.spec = spec
        self.preemptions = _preemption_counter()
        self.base = AsyncLLM.from_engine_args(_engine_args(spec, with_connector=False))
        self.llm = AsyncLLM.from_engine_args(_engine_args(spec, with_connector=True),
                                             stat_loggers=[self.preemptions])
        self.n = 0

    def _rid(self, tag: str) -> str:
        self.n += 1
        return f"{tag}-{self.n}"

    async def baseline(self, prompts: list[list[int]], max_tokens: int) -> list[dict]:
        """Greedy tokens of each prompt alone, with the margin (top-1 minus top-2 logprob)
        at every position: where it is tiny, batch composition alone can flip the token."""
        from vllm import SamplingParams

        sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=2)

        async def one(p: list[int]) -> dict:
            last = None
            async for out in self.base.generate({"prompt_token_ids": p}, sp, self._rid("base")):
                last = out
            margins = []
            for pos in last.outputs[0].logprobs or []:
                vals = sorted((lp.logprob for lp in pos.values()), reverse=True)
                margins.append(vals[0] - vals[1] if len(vals) > 1 else 1e9)
            return {"tokens": list(last.outputs[0].token_ids), "margins": margins}

        # One at a time: a baseline that does not depend on what ran beside it.
        return [await one(p) for p in prompts]

    async def episode(self, cmd: dict[str, Any]) -> dict[str, Any]:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        bound = float(cmd["bound_s"])
        llm = self.base if cmd.get("engine") == "base" else self.llm
        t0 = time.monotonic()
        preempted0 = self.preemptions.total
        times0 = len(self.preemptions.times)
        connector0 = dict(self.preemptions.connector)
        canary_stop = asyncio.Event()
        canary: dict[str, Any] = {"gaps": [], "tokens": 0, "restarts": 0, "error": None}

        async def run_canary() -> None:
            sp = SamplingParams(temperature=0.0, max_tokens=cmd.get("canary_tokens", 1000),
                                output_kind=RequestOutputKind.DELTA)
            while not canary_stop.is_set():
                rid = self._rid("canary")
                last = None
                try:
                    async for out in llm.generate({"prompt_token_ids": CANARY_PROMPT},
                                                       sp, rid):
                        now = time.monotonic()
                        if last is not None and out.outputs[0].token_ids:
                            canary["gaps"].append(now - last)
                        last = now
                        canary["tokens"] += len(out.outputs[0].token_ids)
                        if canary_stop.is_set():
                            await llm.abort(rid)
                            return
                except Exception as exc:  # engine dead: reported with the requests
                    canary["error"] = repr(exc)
                    return
                canary["restarts"] += 1

        async def run_one(r: dict[str, Any]) -> dict[str, Any]:
            await asyncio.sleep(r.get("delay_s", 0.0))
            rid = self._rid(r["id"])
            sp = SamplingParams(temperature=0.0, max_tokens=r["max_tokens"],
                                output_kind=RequestOutputKind.DELTA)
            res: dict[str, Any] = {"id": r["id"], "tokens": [], "status": "running",
                                   "t_submit": time.monotonic() - t0, "gaps_max": 0.0,
                                   "cached": None}
            submit = time.monotonic()
            last = submit
            abort_at = r.get("abort_after_tokens")
            abort_s = r.get("abort_after_s")

            async def stream() -> None:
                nonlocal last
                async for out in llm.generate({"prompt_token_ids": r["prompt"]}, sp, rid):
                    now = time.monotonic()
                    if res["tokens"]:
                        res["gaps_max"] = max(res["gaps_max"], now - last)
                    else:
                        res["ttft"] = now - submit
                    last = now
                    res["tokens"] += list(out.outputs[0].token_ids)
                    if out.num_cached_tokens is not None:
                        res["cached"] = out.num_cached_tokens
                    if out.finished:
                        res["status"] = "finished"
                        res["finish_reason"] = out.outputs[0].finish_reason
                        return
                    if abort_at is not None and len(res["tokens"]) >= abort_at:
                        await llm.abort(rid)
                        res["status"] = "aborted"
                        return

            limit = bound if abort_s is None else min(bound, abort_s)
            try:
                await asyncio.wait_for(stream(), timeout=limit)
            except asyncio.TimeoutError:
                res["status"] = "aborted" if abort_s is not None and abort_s < bound else "hung"
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(llm.abort(rid), 10)
            except Exception as exc:
                res["status"] = "failed"
                res["error"] = "".join(traceback.format_exception_only(exc)).strip()[-2000:]
            res["latency"] = time.monotonic() - submit
            return res

        if not cmd.get("canary", True):
            canary_stop.set()
        canary_task = asyncio.ensure_future(run_canary())
        results = await asyncio.gather(*(run_one(r) for r in cmd["requests"]))
        canary_stop.set()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(canary_task, 30)
        if not canary_task.done():
            canary_task.cancel()
            canary["error"] = canary["error"] or "canary did not stop within 30 s"
        return {"requests": results, "elapsed": time.monotonic() - t0,
                "stall": max(canary["gaps"], default=0.0), "canary_tokens": canary["tokens"],
                "canary_error": canary["error"], "engine_dead": llm.errored,
                "preemptions": self.preemptions.total - preempted0,
                "preemption_times": self.preemptions.times[times0:],
                "connector_stats": {k: v - connector0.get(k, 0)
                                    for k, v in self.preemptions.connector.items()
                                    if v != connector0.get(k, 0)}}

    async def reset_prefix_cache(self) -> bool:
        return bool(await self.llm.reset_prefix_cache())

    def shutdown(self) -> None:
        for eng in (self.llm, self.base):
            with contextlib.suppress(Exception):
                eng.shutdown()


async def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    reply = os.fdopen(int(os.environ["CHAOS_REPLY_FD"]), "w", buffering=1)
    loop = asyncio.get_running_loop()

    def send(obj: dict[str, Any]) -> None:
        reply.write(json.dumps(obj) + "\n")

    child = Child(spec)
    send({"ready": True, "pid": os.getpid()})
    try:
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                return
            cmd = json.loads(line)
            try:
                if cmd["cmd"] == "baseline":
                    send({"tokens": await child.baseline(cmd["prompts"], cmd["max_tokens"])})
                elif cmd["cmd"] == "episode":
                    send(await child.episode(cmd))
                elif cmd["cmd"] == "reset_prefix_cache":
                    send({"ok": await child.reset_prefix_cache()})
                elif cmd["cmd"] == "shutdown":
                    send({"ok": True})
                    return
                else:
                    send({"error": f"unknown command {cmd['cmd']!r}"})
            except Exception as exc:
                send({"error": "".join(traceback.format_exception(exc))[-4000:]})
    finally:
        child.shutdown()
        reply.close()


if __name__ == "__main__":  # vLLM's CPU platform spawns its engine processes
    asyncio.run(main(sys.argv[1]))
