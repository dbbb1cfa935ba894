"""Our copy of the server's chunk naming (checked against a live server in
tests/integration/test_event_stream.py)."""

from __future__ import annotations

from kvconn_plugin.client.chunk_hash import NONE_HASH, chunk_hashes


def test_seed_is_the_documented_none_hash():
    assert NONE_HASH.hex() == "7e3eff9ef7613a50340eb12677ee03b83ac759fcba9bb32705f07248d56d473b"


def test_incremental_equals_whole_and_only_whole_chunks():
    toks = list(range(1000, 1000 + 900))
    whole = chunk_hashes(toks, 256, [])
    assert len(whole) == 3  # 900 tokens: three whole chunks
    known: list[bytes] = []
    chunk_hashes(toks[:300], 256, known)
    assert len(known) == 1
    assert chunk_hashes(toks, 256, known, end=512) == whole[:2]  # stops at end
    assert chunk_hashes(toks, 256, known) == whole
    assert len(set(whole)) == 3
    # Prefix semantics: a changed early token changes every later hash.
    other = chunk_hashes([7, *toks[1:]], 256, [])
    assert all(a != b for a, b in zip(other, whole, strict=True))
