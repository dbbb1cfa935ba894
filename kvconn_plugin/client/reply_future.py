"""A lean future for replies from the LMCache server.

``concurrent.futures.Future`` builds a ``threading.Condition`` per instance; the scheduler
creates several futures per request on its hot path and almost never blocks on them (it
polls ``done()``). This one costs a few slots, shares one module lock for the rare
cross-thread hand-offs, and creates an ``Event`` only when somebody actually waits.
It implements the subset of the ``Future`` API this package uses.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

_PENDING, _OK, _FAILED = 0, 1, 2
# Guards callbacks/event against a concurrent settle; held for a few bytecodes only.
_LOCK = threading.Lock()


class ReplyFuture:
    __slots__ = ("_callbacks", "_event", "_state", "_value")

    def __init__(self) -> None:
        self._state = _PENDING
        self._value: Any = None
        self._callbacks: list[Callable[[ReplyFuture], Any]] | None = None
        self._event: threading.Event | None = None

    # ------------------------------------------------------------------ reader side

    def done(self) -> bool:
        return self._state != _PENDING

    def cancelled(self) -> bool:
        return False  # replies are never cancelled; they succeed, fail or time out

    def result(self, timeout: float | None = None) -> Any:
        """The reply; raises the call's error, or ``TimeoutError`` after ``timeout``."""
        if self._state == _PENDING:
            self._wait(timeout)
        if self._state == _FAILED:
            raise self._value
        return self._value

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if self._state == _PENDING:
            self._wait(timeout)
        return self._value if self._state == _FAILED else None

    def add_done_callback(self, fn: Callable[[ReplyFuture], Any]) -> None:
        """Call ``fn(self)`` once settled: on the settling thread, or now if already done."""
        with _LOCK:
            if self._state == _PENDING:
                if self._callbacks is None:
                    self._callbacks = [fn]
                else:
                    self._callbacks.append(fn)
                return
        self._run(fn)

    def _wait(self, timeout: float | None) -> None:
        with _LOCK:
            if self._state != _PENDING:
                return
            if self._event is None:
                self._event = threading.Event()
            event = self._event
        if not event.wait(timeout):
            raise TimeoutError("no reply yet")

    # ------------------------------------------------------------------ writer side

    def set_result(self, value: Any) -> bool:
        return self._settle(_OK, value)

    def set_exception(self, exc: BaseException) -> bool:
        return self._settle(_FAILED, exc)

    def _settle(self, state: int, value: Any) -> bool:
        """Settle once; later calls are ignored (False)."""
        with _LOCK:
            if self._state != _PENDING:
                return False
            self._value = value  # before the state: lock-free readers check the state first
            self._state = state
            callbacks, event = self._callbacks, self._event
            self._callbacks = None
        if event is not None:
            event.set()
        for fn in callbacks or ():
            self._run(fn)
        return True

    def _run(self, fn: Callable[[ReplyFuture], Any]) -> None:
        try:
            fn(self)
        except Exception:  # a callback must not break the settling thread
            logger.exception("kvconn: reply callback %r failed", fn)
