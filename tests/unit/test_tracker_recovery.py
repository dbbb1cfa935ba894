"""The lookup state machine when a call's outcome is unknown (timed out, or lost in flight):
the tracker sends one more QUERY to learn when the server's prefetch is over, counts the
lookup as a miss, and flags it so the scheduler frees its whole range."""

from __future__ import annotations

import pytest

from kvconn_plugin.client.reply_future import ReplyFuture
from kvconn_plugin.errors import KVConnClosed, KVConnInFlightLost, KVConnTimeout, KVConnUnavailable
from kvconn_plugin.scheduler.tracker import MAX_RECOVERY_QUERIES, LookupState, RequestTracker


def _done(value=None, exc=None) -> ReplyFuture:
    f = ReplyFuture()
    if exc is not None:
        f.set_exception(exc)
    else:
        f.set_result(value)
    return f


class Queries:
    """Stands in for query_prefetch_status_async: hands out futures the test settles."""

    def __init__(self):
        self.sent: list[ReplyFuture] = []

    def __call__(self, request_id: str) -> ReplyFuture:
        self.sent.append(ReplyFuture())
        return self.sent[-1]


def _tracker() -> RequestTracker:
    tr = RequestTracker("r", request=None, cache_salt="")
    tr.state = LookupState.WAIT_ACK
    return tr


def test_normal_lookup_reports_the_hit():
    tr, q = _tracker(), Queries()
    tr.on_ack(_done(None), q)
    q.sent[0].set_result(None)  # still prefetching
    tr.advance(q)
    q.sent[1].set_result(3)
    tr.advance(q)
    assert (tr.state, tr.hit_chunks, tr.outcome_unknown) == (LookupState.DONE, 3, False)


@pytest.mark.parametrize("exc", [KVConnTimeout("late"), KVConnInFlightLost("dropped")])
def test_unknown_ack_outcome_is_recovered_as_a_miss(exc):
    tr, q = _tracker(), Queries()
    tr.on_ack(_done(exc=exc), q)
    assert tr.state is LookupState.QUERYING and tr.outcome_unknown and len(q.sent) == 1
    q.sent[0].set_result(2)  # a real count, but it may as well have been consumed: a miss
    tr.advance(q)
    assert tr.state is LookupState.FAILED and tr.outcome_unknown and tr.hit_chunks == 0


@pytest.mark.parametrize("exc", [KVConnUnavailable("never sent"), KVConnClosed("closing")])
def test_a_call_that_never_reached_the_server_is_a_plain_miss(exc):
    tr, q = _tracker(), Queries()
    tr.on_ack(_done(exc=exc), q)
    assert tr.state is LookupState.FAILED and not tr.outcome_unknown and not q.sent


def test_a_timed_out_query_is_retried_a_bounded_number_of_times():
    tr, q = _tracker(), Queries()
    tr.on_ack(_done(None), q)
    for i in range(MAX_RECOVERY_QUERIES):
        q.sent[-1].set_exception(KVConnTimeout("late"))
        tr.advance(q)
        assert tr.state is LookupState.QUERYING and len(q.sent) == i + 2
    q.sent[-1].set_exception(KVConnTimeout("late"))
    tr.advance(q)
    assert tr.state is LookupState.FAILED and tr.outcome_unknown  # the TTL takes it from here
