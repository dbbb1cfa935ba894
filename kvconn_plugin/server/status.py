"""What an LMCache server's HTTP ``/status`` tells beyond its ZeroMQ port: its L2 tiers and
lock counts (``kvconn doctor``). The reply comes from another process: every field is
checked, and a reply that does not look like a status is an error, never a guess."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from kvconn_plugin.errors import KVConnProtocolError, KVConnUnavailable

# LMCache's own default for ``--http-port``.
DEFAULT_HTTP_PORT = 8080
# A status page is a few KiB; anything far larger is not one.
MAX_STATUS_BYTES = 4 * 2**20


@dataclass(frozen=True)
class L2Tier:
    kind: str         # the adapter's type, e.g. "FSL2Adapter"
    healthy: bool
    where: str        # base path, host, bucket... whatever the adapter reports, or ""

    def describe(self) -> str:
        state = "healthy" if self.healthy else "NOT healthy"
        return f"{self.kind} ({state}{', ' + self.where if self.where else ''})"


@dataclass(frozen=True)
class ServerStatus:
    healthy: bool
    chunk_size: int | None
    l2: tuple[L2Tier, ...]
    read_locked: int
    write_locked: int


def default_status_url(server_url: str) -> str:
    """The status page of the server at ``server_url`` if it kept LMCache's default port."""
    host = urlsplit(server_url if "://" in server_url else f"tcp://{server_url}").hostname
    return f"http://{host or 'localhost'}:{DEFAULT_HTTP_PORT}/status"


def fetch_status(url: str, timeout: float = 2.0) -> ServerStatus:
    """GET and parse a status page. Raises ``KVConnUnavailable`` when nothing answers and
    ``KVConnProtocolError`` when the answer is not an LMCache status."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            body = reply.read(MAX_STATUS_BYTES + 1)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise KVConnUnavailable(f"no status page at {url} ({exc})") from exc
    if len(body) > MAX_STATUS_BYTES:
        raise KVConnProtocolError(f"{url}: status page larger than {MAX_STATUS_BYTES} bytes")
    try:
        doc = json.loads(body)
    except ValueError as exc:
        raise KVConnProtocolError(f"{url}: status page is not JSON ({exc})") from exc
    return parse_status(doc, url)


def parse_status(doc: Any, where: str = "status") -> ServerStatus:
    if not isinstance(doc, dict) or "storage_manager" not in doc:
        raise KVConnProtocolError(f"{where}: not an LMCache server status")
    storage = doc.get("storage_manager")
    storage = storage if isinstance(storage, dict) else {}
    tiers = []
    for entry in storage.get("l2_adapters") or ():
        if not isinstance(entry, dict):
            continue
        kind = entry.get("type")
        loc = next((str(entry[k]) for k in ("base_path", "url", "host", "bucket", "endpoint")
                    if isinstance(entry.get(k), (str, int))), "")
        tiers.append(L2Tier(kind=str(kind)[:80] if kind else "unknown",
                            healthy=entry.get("is_healthy") is True, where=loc[:200]))
    chunk = doc.get("chunk_size")
    locks = storage.get("l1_manager")
    locks = locks if isinstance(locks, dict) else {}

    def count(name: str) -> int:
        v = locks.get(name)
        return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else 0

    return ServerStatus(
        healthy=doc.get("is_healthy") is True,
        chunk_size=chunk if isinstance(chunk, int) and not isinstance(chunk, bool) else None,
        l2=tuple(tiers),
        read_locked=count("read_locked_count"),
        write_locked=count("write_locked_count"),
    )
