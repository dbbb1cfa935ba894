"""Parsing an LMCache server's HTTP status page: another process's reply, checked field by
field (the live page is exercised in tests/integration/test_doctor.py)."""

from __future__ import annotations

import pytest

from kvconn_plugin.errors import KVConnProtocolError, KVConnUnavailable
from kvconn_plugin.server.status import default_status_url, fetch_status, parse_status
from tests.conftest import free_port


def test_a_status_with_tiers_and_locks():
    st = parse_status({"is_healthy": True, "chunk_size": 256, "storage_manager": {
        "l1_manager": {"read_locked_count": 4, "write_locked_count": 0},
        "l2_adapters": [{"type": "FSL2Adapter", "is_healthy": True, "base_path": "/x"},
                        {"type": "RESPL2Adapter", "is_healthy": False}]}})
    assert st.healthy and st.chunk_size == 256 and (st.read_locked, st.write_locked) == (4, 0)
    assert [t.describe() for t in st.l2] == ["FSL2Adapter (healthy, /x)",
                                             "RESPL2Adapter (NOT healthy)"]


@pytest.mark.parametrize("doc", [[], "x", {"is_healthy": True}, None])
def test_what_is_not_a_status_is_refused(doc):
    with pytest.raises(KVConnProtocolError):
        parse_status(doc)


def test_odd_fields_are_ignored_not_trusted():
    st = parse_status({"is_healthy": "yes", "chunk_size": True, "storage_manager": {
        "l1_manager": {"read_locked_count": -3, "write_locked_count": "7"},
        "l2_adapters": ["x", {"type": None, "is_healthy": 1}]}})
    assert not st.healthy and st.chunk_size is None
    assert (st.read_locked, st.write_locked) == (0, 0)
    assert [t.describe() for t in st.l2] == ["unknown (NOT healthy)"]


def test_no_page_is_unavailable_and_the_default_url_keeps_the_host():
    with pytest.raises(KVConnUnavailable):
        fetch_status(f"http://127.0.0.1:{free_port()}/status", timeout=1.0)
    assert default_status_url("tcp://10.0.0.7:5555") == "http://10.0.0.7:8080/status"
    assert default_status_url("localhost:5555") == "http://localhost:8080/status"
