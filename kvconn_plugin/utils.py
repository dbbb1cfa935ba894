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
