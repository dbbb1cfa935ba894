"""What ``bench_serving.py`` computes from its runs: latency statistics, vLLM's cache
counters, the output comparison against the no-connector run, and the text report."""

from __future__ import annotations

import statistics
import urllib.request
from collections.abc import Sequence

from _report import percentile
from _serving_workload import RequestResult

# vLLM 0.32's /metrics counters (per engine, summed over their labels here): local prefix
# cache, the KV connector's ("external") hits, and where prompt tokens came from.
PREFIX_Q, PREFIX_H = "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total"
EXT_Q, EXT_H = "vllm:external_prefix_cache_queries_total", "vllm:external_prefix_cache_hits_total"
BY_SOURCE = ("vllm:prompt_tokens_by_source_total", "vllm:prompt_tokens_cached_by_source_total")
# Connector-specific counter families worth keeping (ours, LMCache's, vLLM's offloading).
CONNECTOR_MARKERS = ("kvconn_", "lmcache", "offload")
KEPT = (PREFIX_Q, PREFIX_H, EXT_Q, EXT_H, "vllm:num_preemptions_total",
        "vllm:prompt_tokens_total", "vllm:prompt_tokens_cached_total")


def parse_metrics(text: str) -> dict[str, float]:
    """Counters of interest from a Prometheus text page, summed over labels (the
    ``by_source`` families keep their ``source`` label in the key)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if not s.name.endswith("_total"):
                continue  # _created timestamps, histogram parts, gauges
            if s.name in BY_SOURCE:
                key = f"{s.name}{{source={s.labels.get('source', '?')}}}"
            elif s.name in KEPT or any(m in s.name for m in CONNECTOR_MARKERS):
                key = s.name
            else:
                continue
            out[key] = out.get(key, 0.0) + float(s.value)
    return out


def scrape_metrics(base_url: str, timeout: float = 10.0) -> dict[str, float]:
    with urllib.request.urlopen(f"{base_url}/metrics", timeout=timeout) as r:
        return parse_metrics(r.read().decode("utf-8", "replace"))


def metrics_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """What the timed run added (the warm-up request is in ``before``)."""
    return {k: v - before.get(k, 0.0) for k, v in sorted(after.items())}


def _ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num is not None and den else None


def _ms(values: Sequence[float], q: float) -> float | None:
    return percentile(values, q) * 1e3 if values else None


def _stalls(itl: Sequence[float]) -> int | None:
    if not itl:
        return None
    bound = 10 * percentile(itl, 0.5)
    return sum(x > bound for x in itl)


def summarize(results: Sequence[RequestResult], wall: float,
              metrics: dict[str, float]) -> dict:
    """Throughput, TTFT/ITL percentiles (ms), TTFT per round and hit ratios of one run."""
    ok = [r for r in results if r.ok]
    ttft = [r.ttft for r in ok if r.ttft is not None]
    itl = [x for r in ok for x in r.itl]
    out_tokens = sum(len(r.output_ids) for r in ok)
    rounds = sorted({r.round for r in results})
    per_round = {}
    for rnd in rounds:
        vals = [r.ttft for r in ok if r.round == rnd and r.ttft is not None]
        per_round[str(rnd)] = {"p50_ms": _ms(vals, 0.5), "n": len(vals)}
    cached = [r for r in ok if r.cached_tokens is not None]
    return {
        "requests": len(results), "failed": len(results) - len(ok),
        "wall_s": wall,
        "requests_per_s": len(ok) / wall if wall > 0 else None,
        "output_tokens_per_s": out_tokens / wall if wall > 0 else None,
        "ttft_p50_ms": _ms(ttft, 0.5), "ttft_p90_ms": _ms(ttft, 0.9),
        "ttft_p99_ms": _ms(ttft, 0.99),
        "itl_p50_ms": _ms(itl, 0.5), "itl_p99_ms": _ms(itl, 0.99),
        # Decode steps stalled behind another request's prefill: ITL p99 sits on the edge
        # of these when they are about 1 % of all gaps, so their count is the steadier figure.
        "itl_stalls": _stalls(itl),
        "itl_count": len(itl),
        "ttft_per_round": per_round,
        # All prefix hits (vLLM's own cache + the connector), as the API reports per request.
        "cached_token_ratio": _ratio(sum(r.cached_tokens or 0 for r in cached),
                                     sum(r.prompt_len for r in cached)) if cached else None,
        "local_hit_ratio": _ratio(metrics.get(PREFIX_H), metrics.get(PREFIX_Q)),
        "external_hit_ratio": _ratio(metrics.get(EXT_H), metrics.get(EXT_Q)),
        "external_hit_tokens": metrics.get(EXT_H),
        "preemptions": metrics.get("vllm:num_preemptions_total"),
        # Share of prompt tokens the engine had to compute (neither cache had them).
        "recomputed_token_ratio": _ratio(
            metrics.get(f"{BY_SOURCE[0]}{{source=local_compute}}"),
            sum(v for k, v in metrics.items() if k.startswith(BY_SOURCE[0] + "{")) or None),
    }  # fmt: skip


RATIO_KEYS = ("ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "output_tokens_per_s")


def _median(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return statistics.median(kept) if kept else None


def median_summary(summaries: Sequence[dict]) -> dict:
    """Field-wise median of several runs' summaries (TTFT per round too); counts such as
    ``failed`` and ``requests`` are summed, so a failure in any run shows."""
    if len(summaries) == 1:
        return dict(summaries[0])
    out: dict = {}
    for key, first in summaries[0].items():
        values = [s.get(key) for s in summaries]
        if key in ("requests", "failed"):
            out[key] = sum(v or 0 for v in values)
        elif key == "ttft_per_round":
            out[key] = {rnd: {"p50_ms": _median([v.get(rnd, {}).get("p50_ms") for v in values]),
                              "n": sum(v.get(rnd, {}).get("n", 0) for v in values)}
                        for rnd in first}
        else:
            out[key] = _median(values)
    out["runs"] = len(summaries)
    return out


def ratios(summaries: dict[str, dict], base: str) -> dict[str, dict[str, float | None]]:
    """Each configuration's key figures divided by ``base``'s (empty if base did not run)."""
    ref = summaries.get(base)
    if ref is None:
        return {}
    return {name: {k: _ratio(s.get(k), ref.get(k)) for k in RATIO_KEYS}
            for name, s in summaries.items()}


def first_difference(reference: Sequence[RequestResult],
                     other: Sequence[RequestResult]) -> str | None:
    """Where ``other``'s outputs first differ from ``reference``'s, or None if equal.

    Later rounds of a user are built from its earlier answers, so only the first
    difference per user means anything: this names the earliest one overall."""
    ref = {(r.user, r.round): r for r in reference}
    got = {(r.user, r.round): r for r in other}
    for key in sorted(ref.keys() | got.keys(), key=lambda k: (k[1], k[0])):
        a, b = ref.get(key), got.get(key)
        where = f"user {key[0]} round {key[1]}"
        if a is None or not a.ok:
            return f"{where}: the reference has no output ({a.error if a else 'missing'})"
        if b is None or not b.ok:
            return f"{where}: no output ({b.error if b else 'missing'})"
        if a.output_ids != b.output_ids:
            i = next((i for i, (x, y) in enumerate(zip(a.output_ids, b.output_ids,
                                                       strict=False)) if x != y),
                     min(len(a.output_ids), len(b.output_ids)))
            return (f"{where}: token {i} differs (expected "
                    f"{a.output_ids[i:i + 4]}..., got {b.output_ids[i:i + 4]}...)")
    return None


def _fmt(v: float | None, spec: str = "8.1f") -> str:
    return format(v, spec) if v is not None else f"{'-':>{len(format(0.0, spec))}}"


def format_report(report: dict) -> str:
    """The human-readable table written next to the JSON (and printed)."""
    wl, configs = report["workload"], report["configs"]
    lines = [
        f"bench_serving: {wl['users']} users x {wl['rounds']} rounds, concurrency "
        f"{wl['concurrency']}, system {wl['system_len']} + doc {wl['doc_len']} tokens, "
        f"questions {wl['question_len']}, answers {wl['max_tokens']} tokens; model "
        f"{report['model']['preset']} {report['model']['dtype']}; vLLM KV cache "
        f"{report['kv_cache_tokens']} tokens = {report['kv_cache_fraction']:.0%} of all "
        f"users' contexts",
        f"{'config':<9}{'req/s':>7}{'out tok/s':>10}{'TTFT p50':>9}{'p90':>8}{'p99':>8}"
        f"{'ITL p50':>8}{'p99':>7}{'stalls':>7}{'ext hit':>8}{'cached':>7}{'recomp':>7}"
        f"{'failed':>7}",
    ]
    for name, c in configs.items():
        s = c.get("summary")
        if s is None:
            lines.append(f"{name:<9}{c['status']}: {c.get('reason', '')}")
            continue
        lines.append(
            f"{name:<9}{_fmt(s['requests_per_s'], '7.3f')}{_fmt(s['output_tokens_per_s'], '10.1f')}"
            f"{_fmt(s['ttft_p50_ms'], '9.0f')}{_fmt(s['ttft_p90_ms'], '8.0f')}"
            f"{_fmt(s['ttft_p99_ms'], '8.0f')}{_fmt(s['itl_p50_ms'], '8.1f')}"
            f"{_fmt(s['itl_p99_ms'], '7.1f')}{_fmt(s.get('itl_stalls'), '7.0f')}"
            f"{_fmt(s['external_hit_ratio'], '8.2f')}"
            f"{_fmt(s['cached_token_ratio'], '7.2f')}"
            f"{_fmt(s['recomputed_token_ratio'], '7.2f')}{s['failed']:>7d}")
    lines.append("(ms; stalls = inter-token gaps over 10x the ITL p50; ext hit = vLLM's "
                 "external_prefix_cache hits/queries; cached = prompt tokens from either "
                 "cache; recomp = prompt tokens computed)")
    runs = max((len(c.get("repeats") or []) for c in configs.values()), default=0)
    if runs > 1:
        lines.append(f"(each figure is the median of {runs} runs; per run, TTFT p50 / p99 ms "
                     "and out tok/s:)")
        for name, c in configs.items():
            if c.get("repeats"):
                lines.append(f"  {name:<9}" + "  ".join(
                    f"{_fmt(s['ttft_p50_ms'], '.0f')}/{_fmt(s['ttft_p99_ms'], '.0f')}"
                    f" {_fmt(s['output_tokens_per_s'], '.1f')}" for s in c["repeats"]))
    rounds = sorted({k for c in configs.values() if c.get("summary")
                     for k in c["summary"]["ttft_per_round"]}, key=int)
    if rounds:
        lines.append("TTFT p50 per round (ms): " + " ".join(f"{'r' + r:>7}" for r in rounds))
        for name, c in configs.items():
            if c.get("summary"):
                pr = c["summary"]["ttft_per_round"]
                lines.append(f"  {name:<23}" + " ".join(
                    _fmt(pr.get(r, {}).get("p50_ms"), "7.0f") for r in rounds))
    for base, table in report["ratios"].items():
        if not table:
            continue
        lines.append(f"ratios {base} (TTFT p50, TTFT p99, ITL p50, out tok/s):")
        for name, r in table.items():
            lines.append(f"  {name:<9}" + " ".join(_fmt(r[k], "7.2f") for k in RATIO_KEYS))
    corr = report["correctness"]
    if corr["equal"] is None:
        lines.append("outputs: not compared (no 'none' run)")
    elif corr["equal"]:
        lines.append("outputs: every configuration equals 'none', token for token")
    else:
        lines.append("outputs DIFFER: " + "; ".join(
            f"{k}: {v}" for k, v in corr["differences"].items()))
    lines.append(f"(total {report['elapsed_s']:.0f}s)")
    return "\n".join(lines)
