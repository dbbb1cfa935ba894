"""Prometheus metrics for ``vllm serve``'s /metrics (built in the API-server process).

vLLM hands each engine's aggregated ``KVConnStats`` dict to :meth:`observe` once per
logging interval; counters accumulate, the degraded flag and the last interval's GB/s are
gauges, lookup latencies go into a histogram.
"""

from __future__ import annotations

from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics

from kvconn_plugin.stats import COUNTERS

_DOCS = {
    "lookups": "Lookups sent to the LMCache server",
    "lookup_hits": "Lookups that found at least one chunk",
    "lookup_timeouts": "Lookups treated as misses because the server was too slow",
    "hit_tokens": "Prompt tokens loaded from LMCache instead of computed",
    "loaded_bytes": "Bytes copied from LMCache into vLLM's KV cache",
    "loaded_chunks": "LMCache chunks loaded",
    "load_seconds": "Seconds spent loading",
    "stored_bytes": "Bytes copied from vLLM's KV cache into LMCache",
    "stored_chunks": "LMCache chunks stored",
    "store_seconds": "Seconds spent storing",
    "load_failures": "Loads that failed (vLLM recomputed them)",
    "store_failures": "Stores that were dropped",
    "stores_staged": "Stores copied into staging because the server had not lent slots yet",
    "store_orphaned_chunks": "Chunks the server may hold write-reserved for dropped stores "
                             "(LMCache cannot cancel them; its write TTL frees them)",
    "server_errors": "Failed or timed-out server calls",
}
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class KVConnPromMetrics(KVConnectorPromMetrics):
    def __init__(self, vllm_config: Any, metric_types: dict, labelnames: list[str],
                 per_engine_labelvalues: dict[int, list[object]]):
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._counters = {
            name: self._per_engine(self._counter_cls(
                name=f"vllm:kvconn_{name}", documentation=_DOCS[name], labelnames=labelnames))
            for name in COUNTERS
        }
        self._degraded = self._per_engine(self._gauge_cls(
            name="vllm:kvconn_degraded", documentation="1 while the LMCache server is unusable",
            labelnames=labelnames, multiprocess_mode="mostrecent"))
        self._gbps = {
            d: self._per_engine(self._gauge_cls(
                name=f"vllm:kvconn_{d}_gbps", documentation=f"GB/s of the last interval's {d}s",
                labelnames=labelnames, multiprocess_mode="mostrecent"))
            for d in ("load", "store")
        }
        self._lookup_latency = self._per_engine(self._histogram_cls(
            name="vllm:kvconn_lookup_latency_seconds", documentation="Lookup round trip",
            labelnames=labelnames, buckets=LATENCY_BUCKETS))

    def _per_engine(self, metric: Any) -> dict[int, Any]:
        return {idx: metric.labels(*values) for idx, values in self.per_engine_labelvalues.items()}

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        data = transfer_stats_data or {}
        for name, metric in self._counters.items():
            value = data.get(name)
            if isinstance(value, (int, float)) and value > 0:
                metric[engine_idx].inc(value)
        if "degraded" in data:
            self._degraded[engine_idx].set(1 if data["degraded"] else 0)
        for d, (b, s) in {"load": ("loaded_bytes", "load_seconds"),
                          "store": ("stored_bytes", "store_seconds")}.items():
            if data.get(s):
                self._gbps[d][engine_idx].set(data.get(b, 0) / data[s] / 1e9)
        for sample in data.get("lookup_latency_s", ()) or ():
            self._lookup_latency[engine_idx].observe(sample)
