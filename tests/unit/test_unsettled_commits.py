"""UnsettledCommits: which lost COMMIT_STOREs are retried, and how often."""

from __future__ import annotations

from kvconn_plugin.client.protocol import CacheKey
from kvconn_plugin.errors import KVConnClosed, KVConnInFlightLost, KVConnTimeout
from kvconn_plugin.worker.unsettled_commits import MAX_ATTEMPTS, UnsettledCommits


def _key(rid: str, start: int = 0, end: int = 512) -> CacheKey:
    return CacheKey(model_name="m", world_size=1, worker_id=0, token_ids=list(range(end)),
                    start=start, end=end, request_id=rid)


class _Client:
    def __init__(self, answers):
        self.answers, self.calls = list(answers), []

    def commit_store_within(self, key, instance_id, timeout):
        self.calls.append(key.request_id)
        a = self.answers.pop(0)
        if isinstance(a, BaseException):
            raise a
        return a


def test_a_key_prepared_again_is_never_committed_blindly():
    u = UnsettledCommits()
    u.add(_key("a"), KVConnTimeout("lost"))
    u.add(_key("b"), KVConnInFlightLost("dropped"))
    u.forget(_key("a"))  # a new PREPARE_STORE of the same key: its reservation is not ours
    c = _Client([True])
    assert u.settle(c, 1, 1.0) == 1
    assert c.calls == ["b"] and u.recovered == 1 and len(u) == 0


def test_each_key_once_and_false_means_nothing_was_pending():
    u = UnsettledCommits()
    u.add(_key("a"), KVConnTimeout("lost"))
    u.add(_key("a"), KVConnTimeout("again"))
    u.add(_key("closing"), KVConnClosed("shutting down"))
    c = _Client([False])
    assert u.settle(c, 1, 1.0) == 1
    assert c.calls == ["a"] and u.recovered == 0


def test_retried_a_bounded_number_of_times_then_left_to_the_ttl():
    u = UnsettledCommits()
    u.add(_key("a"), KVConnTimeout("lost"))
    c = _Client([KVConnTimeout("no answer")] * MAX_ATTEMPTS)
    for _ in range(MAX_ATTEMPTS + 2):
        u.settle(c, 1, 1.0)  # one attempt per heartbeat: the server stopped answering
    assert len(c.calls) == MAX_ATTEMPTS and len(u) == 0
