"""Connector statistics in vLLM's ``KVConnectorStats`` shape.

Counters are summed across workers and steps; ``degraded`` is a flag (max). The data dict
is plain numbers so vLLM can serialize it between processes.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats

COUNTERS = (
    "lookups",
    "lookup_hits",
    "lookup_timeouts",
    "hit_tokens",
    "loaded_bytes",
    "loaded_chunks",
    "load_seconds",
    "stored_bytes",
    "stored_chunks",
    "store_seconds",
    "load_failures",
    "store_failures",
    "stores_staged",
    "store_orphaned_chunks",
    "server_errors",
)
FLAGS = ("degraded",)


@dataclass
class KVConnStats(KVConnectorStats):
    data: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()

    def record(self, name: str, value: float = 1) -> None:
        with self._lock:
            self.data[name] = self.data.get(name, 0) + value

    def sample(self, name: str, value: float, keep: int = 4096) -> None:
        """Append an observation (e.g. a lookup latency); bounded between takes."""
        with self._lock:
            series = self.data.setdefault(name, [])
            if len(series) < keep:
                series.append(value)

    def set_degraded(self, degraded: bool) -> None:
        with self._lock:
            self.data["degraded"] = 1 if degraded else 0

    def take(self) -> KVConnStats | None:
        """Hand out what was collected since the last call and start afresh."""
        with self._lock:
            if not any(self.data.get(k) for k in (*COUNTERS, "lookup_latency_s")) \
                    and "degraded" not in self.data:
                return None
            out = KVConnStats(data=dict(self.data))
            flag = self.data.get("degraded")
            self.data = {} if flag is None else {"degraded": flag}
        return out

    def reset(self) -> None:
        with self._lock:
            self.data = {}

    def aggregate(self, other: KVConnectorStats) -> KVConnStats:
        for k, v in (other.data or {}).items():
            if k in FLAGS:
                self.data[k] = max(self.data.get(k, 0), v)
            elif isinstance(v, list):
                self.data[k] = list(self.data.get(k, [])) + v
            elif isinstance(v, (int, float)):
                self.data[k] = self.data.get(k, 0) + v
        return self

    def reduce(self) -> dict[str, int | float]:
        d = self.data
        out: dict[str, int | float] = {k: d.get(k, 0) for k in COUNTERS if d.get(k)}
        if d.get("load_seconds"):
            out["load_GBps"] = round(d.get("loaded_bytes", 0) / d["load_seconds"] / 1e9, 3)
        if d.get("store_seconds"):
            out["store_GBps"] = round(d.get("stored_bytes", 0) / d["store_seconds"] / 1e9, 3)
        lat = sorted(d.get("lookup_latency_s") or ())
        if lat:
            out["lookup_p50_ms"] = round(lat[len(lat) // 2] * 1e3, 3)
        out["degraded"] = d.get("degraded", 0)
        return out

    def is_empty(self) -> bool:
        return not any(self.data.get(k) for k in COUNTERS)

    def __getstate__(self) -> dict:
        return {"data": {k: list(v) if isinstance(v, list) else v for k, v in self.data.items()}}

    def __setstate__(self, state: dict) -> None:
        self.data = state["data"]
        self._lock = threading.Lock()
