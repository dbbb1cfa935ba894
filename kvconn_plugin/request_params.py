"""Per-request control through ``kv_transfer_params`` (OpenAI ``extra_body``).

vLLM hands a request's ``kv_transfer_params`` to the connector as
``request.kv_transfer_params``, and returns whatever ``request_finished`` gives back as the
request's output ``kv_transfer_params``. We accept LMCache's own keys, so one request body
works with either connector:

* ``lmcache.skip_save`` (bool): store nothing of this request;
* ``lmcache.max_offload_tokens`` (int >= 0): store at most this many leading tokens (whole
  chunks);
* ``kvconn.skip_load`` (bool): no lookup and no load; the request computes its prompt;
* ``max_offload_tokens`` / ``max_load_tokens`` (int >= 0), vLLM's OffloadingConnector keys:
  store / load at most this many leading tokens (whole chunks);
* ``cached_token_stats`` (present and not ``false``): ``request_finished`` returns
  ``{"cached_token_stats": {"num_vllm_cached_tokens", "num_lmcache_cached_tokens",
  "num_lmcache_extra_cached_tokens"}}`` as LMCache's connector does.

Other ``lmcache.*`` keys (tags, LMCache's server-side options) are accepted and ignored.
Everything here comes from a client: a value of the wrong type or out of range is ignored
with a rate-limited warning, never an error for the request or the engine.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kvconn_plugin.utils import RateLimitedLog

logger = logging.getLogger(__name__)
_warn = RateLimitedLog(logger, interval=60.0)

SKIP_SAVE = "lmcache.skip_save"
MAX_OFFLOAD_TOKENS = "lmcache.max_offload_tokens"
SKIP_LOAD = "kvconn.skip_load"
CACHED_TOKEN_STATS = "cached_token_stats"
VLLM_MAX_OFFLOAD_TOKENS = "max_offload_tokens"  # vLLM OffloadingConnector's keys
VLLM_MAX_LOAD_TOKENS = "max_load_tokens"
OUR_KEYS = frozenset({SKIP_LOAD})
MAX_TOKENS = 1 << 40  # far beyond any context; bounds what a client can make us compute with
SCAN_KEYS = 64  # unknown-key warnings look at this many keys at most

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


@dataclass(frozen=True, slots=True)
class RequestParams:
    skip_save: bool = False
    skip_load: bool = False
    max_offload_tokens: int | None = None
    max_load_tokens: int | None = None
    want_stats: bool = False

    @property
    def store_limit(self) -> int | None:
        """Tokens that may be stored (None: no limit)."""
        if self.skip_save:
            return 0
        return self.max_offload_tokens

    @property
    def load_limit(self) -> int | None:
        """Tokens that may be loaded (None: no limit)."""
        if self.skip_load:
            return 0
        return self.max_load_tokens


DEFAULT = RequestParams()


def parse_request_params(raw: Any, request_id: str = "?") -> RequestParams:
    """Typed, bounded view of one request's ``kv_transfer_params``; never raises."""
    if raw is None:
        return DEFAULT
    if not isinstance(raw, Mapping):
        _warn.warning("type", "kvconn: request %s: kv_transfer_params must be an object, got "
                      "%s; ignored", request_id, type(raw).__name__)
        return DEFAULT
    for i, key in enumerate(raw):
        if i >= SCAN_KEYS:
            break
        if isinstance(key, str) and key.startswith("kvconn.") and key not in OUR_KEYS:
            _warn.warning("unknown", "kvconn: request %s: unknown kv_transfer_params key %r "
                          "ignored (accepted: %s)", request_id, key[:64],
                          ", ".join(sorted(OUR_KEYS | {SKIP_SAVE, MAX_OFFLOAD_TOKENS,
                                                       CACHED_TOKEN_STATS,
                                                       VLLM_MAX_OFFLOAD_TOKENS,
                                                       VLLM_MAX_LOAD_TOKENS})))
    return RequestParams(
        skip_save=_flag(raw, SKIP_SAVE, request_id),
        skip_load=_flag(raw, SKIP_LOAD, request_id),
        max_offload_tokens=_least(_tokens(raw, MAX_OFFLOAD_TOKENS, request_id),
                                  _tokens(raw, VLLM_MAX_OFFLOAD_TOKENS, request_id)),
        max_load_tokens=_tokens(raw, VLLM_MAX_LOAD_TOKENS, request_id),
        # LMCache answers whenever the key is present; an explicit false opts out.
        want_stats=CACHED_TOKEN_STATS in raw and raw[CACHED_TOKEN_STATS] is not False,
    )


def _least(*limits: int | None) -> int | None:
    given = [n for n in limits if n is not None]
    return min(given) if given else None


def _flag(raw: Mapping, key: str, request_id: str) -> bool:
    val = raw.get(key)
    if val is None or isinstance(val, bool):
        return bool(val)
    if isinstance(val, int) and val in (0, 1):
        return bool(val)
    if isinstance(val, str) and val.strip().lower() in _TRUE | _FALSE:
        return val.strip().lower() in _TRUE
    _warn.warning(f"bad-{key}", "kvconn: request %s: %s must be true or false, got %.40r; "
                  "ignored", request_id, key, val)
    return False


def _tokens(raw: Mapping, key: str, request_id: str) -> int | None:
    val = raw.get(key)
    if val is None:
        return None
    num: int | None = None
    if isinstance(val, int) and not isinstance(val, bool):
        num = val
    elif isinstance(val, float) and val.is_integer():
        num = int(val)
    elif isinstance(val, str) and val.strip().isdigit() and len(val.strip()) <= 15:
        num = int(val.strip())
    if num is None or not 0 <= num <= MAX_TOKENS:
        _warn.warning(f"bad-{key}", "kvconn: request %s: %s must be an integer 0..%d, got "
                      "%.40r; ignored", request_id, key, MAX_TOKENS, val)
        return None
    return num


@dataclass(slots=True)
class _Entry:
    params: RequestParams
    vllm_hit: int = 0
    lmcache_hit: int = 0


class RequestControls:
    """Scheduler side: each live request's parsed params and cached-token stats.

    Requests without ``kv_transfer_params`` (the common case) cost one attribute read and
    leave no entry behind; the others are parsed once and dropped by :meth:`finish`.
    """

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}

    def _entry(self, request: Any) -> _Entry | None:
        raw = getattr(request, "kv_transfer_params", None)
        if raw is None:
            return None
        rid = request.request_id
        entry = self._entries.get(rid)
        if entry is None:
            entry = self._entries[rid] = _Entry(parse_request_params(raw, rid))
        return entry

    def params(self, request: Any) -> RequestParams:
        entry = self._entry(request)
        return DEFAULT if entry is None else entry.params

    def load_cap(self, request: Any, chunk: int) -> int | None:
        """Chunk-aligned number of leading tokens this request may load (None: any)."""
        entry = self._entry(request)
        limit = None if entry is None else entry.params.load_limit
        return None if limit is None else limit // chunk * chunk

    def store_cap(self, request: Any, chunk: int) -> int | None:
        """Chunk-aligned number of leading tokens this request may store (None: any)."""
        entry = self._entry(request)
        limit = None if entry is None else entry.params.store_limit
        return None if limit is None else limit // chunk * chunk

    def note_hits(self, request: Any, vllm_tokens: int, lmcache_tokens: int) -> None:
        """The final answer of a lookup: vLLM's local prefix hit and the server's hit."""
        entry = self._entry(request)
        if entry is not None and entry.params.want_stats:
            entry.vllm_hit = max(0, int(vllm_tokens))
            entry.lmcache_hit = max(0, int(lmcache_tokens))

    def finish(self, request: Any) -> dict[str, Any] | None:
        """The output ``kv_transfer_params`` of a finished request (LMCache's shape), or None;
        forgets the request."""
        entry = self._entries.pop(request.request_id, None)
        if entry is None:
            entry = self._entry(request)  # finished before any hook parsed it
            self._entries.pop(request.request_id, None)
        if entry is None or not entry.params.want_stats:
            return None
        return {CACHED_TOKEN_STATS: {
            "num_vllm_cached_tokens": entry.vllm_hit,
            "num_lmcache_cached_tokens": entry.lmcache_hit,
            "num_lmcache_extra_cached_tokens": max(0, entry.lmcache_hit - entry.vllm_hit),
        }}

    def __len__(self) -> int:
        return len(self._entries)
