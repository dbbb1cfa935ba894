"""The lookup state machine when a call's outcome is unknown (timed out, or lost in flight):
the tracker sends one more QUERY to learn when the server's prefetch is over, counts the
lookup as a miss, and flags it so the scheduler frees its whole range."""

from __future__ import annotations

import pytest

from kvconn_plugin.client.reply_future import ReplyFuture
from kvconn_plugin.errors import KVConnClosed, KVConnInFlightLost, KVConnTimeout, KVConnUnavailable
from kvconn_plugin.scheduler.tracker import (
    MAX_RECOVERY_QUERIES,
    RECOVERY_WINDOW_S,
    LookupState,
    RequestTracker,
)


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
    tr.started_at -= RECOVERY_WINDOW_S  # the recovery window is over as well
    q.sent[-1].set_exception(KVConnTimeout("late"))
    tr.advance(q)
    assert tr.state is LookupState.FAILED and tr.outcome_unknown  # the TTL takes it from here


def test_recovery_outlasts_a_stopped_server_within_its_window():
    """With no connection (the server stopped, the heartbeat dropped the connection) the
    recovery QUERY fails at once, but the LOOKUP may still be carried out when the server
    resumes: keep asking, past the count, until the window closes."""
    tr, q = _tracker(), Queries()
    tr.on_ack(_done(exc=KVConnTimeout("stopped")), q)
    for _ in range(3 * MAX_RECOVERY_QUERIES):
        q.sent[-1].set_exception(KVConnTimeout("still stopped"))
        tr.advance(q)
        q.sent[-1].set_exception(KVConnUnavailable("connection dropped"))
        tr.advance(q)
        assert tr.state is LookupState.QUERYING
    q.sent[-1].set_result(3)  # the server answers: its prefetch is over
    tr.advance(q)
    assert tr.state is LookupState.FAILED and tr.outcome_unknown  # freed whole, exactly once
    tr2, q2 = _tracker(), Queries()
    tr2.on_ack(_done(exc=KVConnTimeout("stopped")), q2)
    tr2.started_at -= RECOVERY_WINDOW_S
    q2.sent[-1].set_exception(KVConnUnavailable("connection dropped"))
    tr2.advance(q2)
    assert tr2.state is LookupState.FAILED


def test_no_connection_for_the_first_query_is_a_plain_miss():
    tr, q = _tracker(), Queries()
    tr.on_ack(_done(None), q)
    q.sent[-1].set_exception(KVConnUnavailable("never sent"))
    tr.advance(q)
    assert tr.state is LookupState.FAILED and not tr.outcome_unknown
    tr.on_ack(_done(exc=KVConnClosed("closing")), q)
    assert tr.state is LookupState.FAILED
