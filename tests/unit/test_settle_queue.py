"""Order rules of the settle queues (a recorded client stands in for the server; the real
server's behaviour is in tests/integration/test_unsettled_loads.py and the twin-load tests of
test_server_failures.py)."""

from __future__ import annotations

import pytest

from kvconn_plugin.client.protocol import CacheKey
from kvconn_plugin.errors import KVConnTimeout
from kvconn_plugin.worker.settle_queue import MAX_ATTEMPTS, key_identity
from kvconn_plugin.worker.unsettled_loads import UnsettledLoads, UnsettledRetrieveCommits


class _Recorder:
    def __init__(self, fail: int = 0):
        self.calls: list[tuple[str, str]] = []
        self.fail = fail  # calls that time out first

    def _call(self, op: str, key: CacheKey):
        self.calls.append((op, key.request_id))
        if self.fail:
            self.fail -= 1
            raise KVConnTimeout("no reply")

    def prepare_retrieve_within(self, key, instance_id, timeout):
        self._call("prepare", key)
        return type("Reply", (), {"success": True})()

    def commit_retrieve_within(self, key, instance_id, timeout):
        self._call("commit", key)
        return True


def _ids(queue) -> list[str]:
    return [k.request_id for k in queue.keys()]  # noqa: SIM118 (a list, not a dict)


def _key(rid: str, tokens=(1, 2, 3, 4), start=0) -> CacheKey:
    return CacheKey(model_name="m", world_size=1, worker_id=0, token_ids=list(tokens),
                    start=start, end=start + 4, request_id=rid)


def test_settle_matching_settles_only_that_identity_in_order():
    q = UnsettledLoads()
    q.add(_key("a"))
    q.add(_key("other", tokens=(9, 9, 9, 9)))
    q.add(_key("b"))
    client = _Recorder()
    q.settle_matching(key_identity(_key("x")), client, 1, 1.0)
    assert client.calls == [("prepare", "a"), ("commit", "a"), ("prepare", "b"), ("commit", "b")]
    assert _ids(q) == ["other"]


def test_a_failed_settle_matching_raises_and_keeps_the_rest_queued():
    q = UnsettledRetrieveCommits()
    q.add(_key("a"))
    q.add(_key("b"))
    with pytest.raises(KVConnTimeout):
        q.settle_matching(key_identity(_key("x")), _Recorder(fail=1), 1, 1.0)
    assert _ids(q) == ["a", "b"]
    # Each try counts: after MAX_ATTEMPTS the key is left to the server's TTL.
    for _ in range(MAX_ATTEMPTS - 1):
        with pytest.raises(KVConnTimeout):
            q.settle_matching(key_identity(_key("x")), _Recorder(fail=1), 1, 1.0)
    assert _ids(q) == ["b"]


def test_a_blocked_identity_stays_queued_and_the_others_settle():
    q = UnsettledLoads()
    q.add(_key("blocked"))
    q.add(_key("free", tokens=(5, 6, 7, 8)))
    client = _Recorder()
    blocked = key_identity(_key("x"))
    assert q.settle(client, 1, 1.0, blocked=lambda ident: ident == blocked) == 1
    assert client.calls == [("prepare", "free"), ("commit", "free")]
    assert _ids(q) == ["blocked"]
    assert q.owes(blocked) and not q.owes(key_identity(_key("free", tokens=(5, 6, 7, 8))))
