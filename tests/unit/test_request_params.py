"""Per-request ``kv_transfer_params``: LMCache's keys, typed and bounded, never an error."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from kvconn_plugin.request_params import (
    DEFAULT,
    RequestControls,
    RequestParams,
    parse_request_params,
)


def _req(rid: str, params) -> SimpleNamespace:
    return SimpleNamespace(request_id=rid, kv_transfer_params=params)


@pytest.mark.parametrize("raw, expected", [
    (None, DEFAULT),
    ({}, DEFAULT),
    ({"lmcache.skip_save": True}, RequestParams(skip_save=True)),
    ({"lmcache.skip_save": "true"}, RequestParams(skip_save=True)),
    ({"lmcache.skip_save": 0}, RequestParams()),
    ({"kvconn.skip_load": True}, RequestParams(skip_load=True)),
    ({"lmcache.max_offload_tokens": 512}, RequestParams(max_offload_tokens=512)),
    ({"lmcache.max_offload_tokens": "256"}, RequestParams(max_offload_tokens=256)),
    ({"lmcache.max_offload_tokens": 300.0}, RequestParams(max_offload_tokens=300)),
    ({"max_offload_tokens": 100, "lmcache.max_offload_tokens": 300},  # vLLM's key too
     RequestParams(max_offload_tokens=100)),
    ({"max_load_tokens": 256}, RequestParams(max_load_tokens=256)),
    ({"cached_token_stats": True}, RequestParams(want_stats=True)),
    ({"cached_token_stats": None}, RequestParams(want_stats=True)),  # present: LMCache answers
    ({"cached_token_stats": False}, RequestParams()),
    ({"lmcache.tag.user": "x", "do_remote_prefill": True}, DEFAULT),  # others' keys: ignored
])
def test_parse_accepts_lmcache_keys(raw, expected):
    assert parse_request_params(raw) == expected


@pytest.mark.parametrize("raw", [
    "skip",  # not an object
    ["lmcache.skip_save"],
    {"lmcache.skip_save": "maybe"},
    {"lmcache.skip_save": 2},
    {"lmcache.skip_save": {"nested": True}},
    {"lmcache.max_offload_tokens": -1},
    {"lmcache.max_offload_tokens": True},
    {"lmcache.max_offload_tokens": 1.5},
    {"lmcache.max_offload_tokens": "1e9"},
    {"lmcache.max_offload_tokens": 10**30},
    {"lmcache.max_offload_tokens": "9" * 400},
    {"kvconn.skip_lod": True},  # a typo of ours
])
def test_bad_values_are_ignored_with_a_warning(raw, caplog):
    from kvconn_plugin import request_params

    request_params._warn._last.clear()  # each case gets its own (rate-limited) warning
    with caplog.at_level(logging.WARNING, logger="kvconn_plugin.request_params"):
        params = parse_request_params(raw, "r1")
    assert params == DEFAULT
    assert any("r1" in rec.getMessage() for rec in caplog.records)


def test_warnings_are_rate_limited(caplog):
    from kvconn_plugin import request_params

    request_params._warn._last.clear()
    with caplog.at_level(logging.WARNING, logger="kvconn_plugin.request_params"):
        for i in range(100):
            parse_request_params({"lmcache.skip_save": "nope"}, f"r{i}")
    assert len(caplog.records) == 1


def test_many_keys_are_bounded():
    raw = {f"kvconn.k{i}": i for i in range(100_000)}
    raw["lmcache.skip_save"] = True
    assert parse_request_params(raw).skip_save


def test_controls_store_cap_and_skip_load():
    c = RequestControls()
    plain = _req("a", None)
    assert c.store_cap(plain, 256) is None and c.load_cap(plain, 256) is None
    assert c.finish(plain) is None
    assert len(c) == 0  # requests without params leave nothing behind
    limited = _req("b", {"lmcache.max_offload_tokens": 700})
    assert c.store_cap(limited, 256) == 512  # whole chunks only
    skip = _req("c", {"lmcache.skip_save": True, "kvconn.skip_load": True})
    assert c.store_cap(skip, 256) == 0 and c.load_cap(skip, 256) == 0
    loads = _req("d", {"max_load_tokens": 600})
    assert c.load_cap(loads, 256) == 512 and c.store_cap(loads, 256) is None
    assert all(c.finish(r) is None for r in (limited, skip, loads))
    assert len(c) == 0


def test_cached_token_stats_shape_matches_lmcache():
    c = RequestControls()
    r = _req("s", {"cached_token_stats": True})
    c.note_hits(r, vllm_tokens=256, lmcache_tokens=768)
    assert c.finish(r) == {"cached_token_stats": {
        "num_vllm_cached_tokens": 256,
        "num_lmcache_cached_tokens": 768,
        "num_lmcache_extra_cached_tokens": 512,
    }}
    assert len(c) == 0
    # Finished before any lookup: zeros, still the same shape.
    r2 = _req("t", {"cached_token_stats": 1})
    assert c.finish(r2) == {"cached_token_stats": {
        "num_vllm_cached_tokens": 0, "num_lmcache_cached_tokens": 0,
        "num_lmcache_extra_cached_tokens": 0}}
    # vLLM hit more than LMCache: no negative extra.
    r3 = _req("u", {"cached_token_stats": True})
    c.note_hits(r3, 512, 256)
    assert c.finish(r3)["cached_token_stats"]["num_lmcache_extra_cached_tokens"] == 0
