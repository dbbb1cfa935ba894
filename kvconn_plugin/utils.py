"""Small shared helpers."""

from __future__ import annotations

import logging
import threading
import time


class RateLimitedLog:
    """Log a repeated condition at most once per ``interval`` seconds per tag, counting
    what was suppressed, so a dead server cannot flood vLLM's log."""

    def __init__(self, logger: logging.Logger, interval: float = 30.0):
        self._logger = logger
        self._interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self._lock = threading.Lock()

    def warning(self, tag: str, msg: str, *args: object) -> None:
        self._log(logging.WARNING, tag, msg, args)

    def error(self, tag: str, msg: str, *args: object) -> None:
        self._log(logging.ERROR, tag, msg, args)

    def _log(self, level: int, tag: str, msg: str, args: tuple) -> None:
        now = time.monotonic()
        with self._lock:
            last = self._last.get(tag)
            if last is not None and now - last < self._interval:
                self._suppressed[tag] = self._suppressed.get(tag, 0) + 1
                return
            self._last[tag] = now
            dropped = self._suppressed.pop(tag, 0)
        if dropped:
            msg += " (%d similar messages suppressed)"
            args = (*args, dropped)
        self._logger.log(level, msg, *args)


class PeriodicTask:
    """Run ``fn`` on a daemon thread every ``interval`` seconds, or sooner after :meth:`poke`.

    Used for the server health checks on both sides; ``fn`` must bound its own waits (it
    gets ``interval`` as its deadline by convention) and must not raise.
    """

    def __init__(self, name: str, interval: float, fn):
        self.interval = interval
        self._fn = fn
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def poke(self) -> None:
        """Run as soon as possible (e.g. right after a call failed)."""
        self._wake.set()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=timeout)

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.interval)
            self._wake.clear()
            if self._stop.is_set():
                return
            self._fn()
