"""Which FREE_LOOKUP_LOCKS are sent again (never sent) and which are not (may have arrived)."""

from __future__ import annotations

import logging

import pytest

from kvconn_plugin.client import lock_frees
from kvconn_plugin.client.lock_frees import LockFrees
from kvconn_plugin.client.protocol import CacheKey
from kvconn_plugin.client.reply_future import ReplyFuture
from kvconn_plugin.errors import (
    KVConnClosed,
    KVConnInFlightLost,
    KVConnTimeout,
    KVConnUnavailable,
)


def _key(sid: str, end: int = 512) -> CacheKey:
    return CacheKey(model_name="m", world_size=1, worker_id=None, token_ids=list(range(end)),
                    start=0, end=end, request_id=sid, num_kv_readers=1)


class Server:
    """Records what was submitted; ``outcome`` decides each FREE's future."""

    def __init__(self):
        self.sent: list[tuple[str, str]] = []
        self.outcome: BaseException | None = None
        self.refuse: BaseException | None = None
        self.hold = False  # leave each FREE's future pending, in ``held``
        self.held: list[ReplyFuture] = []

    def free(self, key: CacheKey, tp: int) -> ReplyFuture:
        if self.refuse is not None:
            raise self.refuse
        self.sent.append(("FREE", key.request_id))
        f = ReplyFuture()
        if self.hold:
            self.held.append(f)
        elif self.outcome is None:
            f.set_result(None)
        else:
            f.set_exception(self.outcome)
        return f

    def end(self, sid: str) -> ReplyFuture:
        self.sent.append(("END", sid))
        f = ReplyFuture()
        f.set_result(None)
        return f


@pytest.fixture
def srv():
    return Server()


@pytest.mark.parametrize("refused", [False, True])
def test_a_free_that_never_left_is_sent_again_before_its_end_session(srv, refused):
    frees = LockFrees(srv.free, srv.end)
    if refused:  # the transport refused it at once
        srv.refuse = KVConnUnavailable("no connection")
        with pytest.raises(KVConnUnavailable):
            frees.free(_key("a"), 1)
        srv.refuse = None
    else:  # failed later, still unsent
        srv.outcome = KVConnUnavailable("no LMCache server reachable")
        frees.free(_key("a"), 1)
        srv.outcome = None
    assert frees.pending() == 1
    assert frees.end_session("a").result() is None  # held behind the FREE
    frees.end_session("b")  # another session is not held
    frees.resend()
    assert srv.sent[-3:] == [("END", "b"), ("FREE", "a"), ("END", "a")]
    assert frees.pending() == 0


@pytest.mark.parametrize("exc", [KVConnInFlightLost("lost in flight"),
                                 KVConnTimeout("no reply in time")])
def test_a_free_that_may_have_arrived_is_never_sent_again(srv, exc, caplog):
    """A second FREE after one the server applied would release another request's locks."""
    frees = LockFrees(srv.free, srv.end)
    srv.outcome = exc
    with caplog.at_level(logging.INFO, logger=lock_frees.__name__):
        frees.free(_key("a", end=768), 1)
    assert frees.pending() == 0 and frees.lost_replies == 1
    assert "may keep 768 token(s) read-locked" in caplog.text
    srv.outcome = None
    frees.resend()
    assert srv.sent == [("FREE", "a")]


def test_a_closing_client_keeps_nothing(srv):
    frees = LockFrees(srv.free, srv.end)
    srv.refuse = KVConnClosed("closed")
    with pytest.raises(KVConnClosed):
        frees.free(_key("a"), 1)
    assert frees.pending() == 0


def test_a_free_kept_past_the_window_is_left_to_the_ttl(srv, monkeypatch):
    frees = LockFrees(srv.free, srv.end)
    srv.refuse = KVConnUnavailable("no connection")
    with pytest.raises(KVConnUnavailable):
        frees.free(_key("a"), 1, first_try=0.0)
    srv.refuse = None
    monkeypatch.setattr(lock_frees.time, "monotonic", lambda: lock_frees.RESEND_WINDOW_S + 1)
    frees.end_session("a")
    frees.resend()
    assert srv.sent == [("END", "a")]  # the session still ends


@pytest.mark.parametrize("outcome", [None, KVConnInFlightLost("lost in flight"),
                                     KVConnUnavailable("no LMCache server reachable")])
def test_an_end_session_never_overtakes_a_free_still_queued(srv, outcome):
    """Episode 1003 of the chaos run: FREE and END_SESSION queued while the server was
    away; the FREE expired unsent (kept for a resend), the END went out as the server came
    back, and the resent FREE found no lookup result left to release."""
    srv.hold = True
    sent, queued = srv.sent, srv.held
    frees = LockFrees(srv.free, srv.end)
    frees.free(_key("a"), 1)
    frees.end_session("a")
    assert sent == [("FREE", "a")]  # the END waits for the FREE's outcome
    if outcome is None:
        queued[0].set_result(None)
    else:
        queued[0].set_exception(outcome)
    if isinstance(outcome, KVConnUnavailable) and not isinstance(outcome, KVConnInFlightLost):
        assert sent == [("FREE", "a")] and frees.pending() == 1
        frees.resend()
        assert sent == [("FREE", "a"), ("FREE", "a")]  # still behind the resent FREE
        queued[1].set_result(None)
    assert sent[-1] == ("END", "a") and sent.count(("END", "a")) == 1
    assert frees.pending() == 0 and not frees._open and not frees._ends
