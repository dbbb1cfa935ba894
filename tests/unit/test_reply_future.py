"""ReplyFuture: the lean future every server call returns."""

from __future__ import annotations

import threading
import time

import pytest

from kvconn_plugin.client.reply_future import ReplyFuture
from kvconn_plugin.errors import KVConnTimeout


def test_settles_once_and_reports_value():
    f = ReplyFuture()
    assert not f.done() and not f.cancelled()
    assert f.set_result(3)
    assert not f.set_result(4) and not f.set_exception(RuntimeError())
    assert f.done() and f.result() == 3 and f.exception() is None


def test_exception_is_raised_by_result():
    f = ReplyFuture()
    f.set_exception(KVConnTimeout("late"))
    assert isinstance(f.exception(), KVConnTimeout)
    with pytest.raises(KVConnTimeout):
        f.result()


def test_callbacks_run_once_before_and_after_settling():
    f, seen = ReplyFuture(), []
    f.add_done_callback(lambda x: seen.append(("early", x.result())))
    f.set_result("v")
    f.add_done_callback(lambda x: seen.append(("late", x.result())))
    assert seen == [("early", "v"), ("late", "v")]


def test_a_failing_callback_does_not_stop_the_others():
    f, seen = ReplyFuture(), []
    f.add_done_callback(lambda x: 1 / 0)
    f.add_done_callback(lambda x: seen.append(1))
    assert f.set_result(None)
    assert seen == [1]


def test_wait_times_out_then_wakes_on_settle_from_another_thread():
    f = ReplyFuture()
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        f.result(timeout=0.05)
    assert time.monotonic() - t0 < 2
    timer = threading.Timer(0.05, f.set_result, args=(7,))
    timer.start()
    try:
        assert f.result(timeout=5) == 7
    finally:
        timer.join()


def test_concurrent_callback_registration_and_settle_never_loses_a_callback():
    for _ in range(200):
        f, seen = ReplyFuture(), []
        t = threading.Thread(target=f.set_result, args=(1,))
        t.start()
        f.add_done_callback(lambda x, seen=seen: seen.append(1))
        t.join()
        assert seen == [1]
