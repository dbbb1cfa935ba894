"""PeriodicTask: the thread behind both sides' server health checks."""

from __future__ import annotations

import threading

from kvconn_plugin.utils import PeriodicTask


def test_runs_on_poke_and_stops_promptly():
    ran = threading.Event()
    task = PeriodicTask("t-periodic", 3600.0, ran.set)
    task.start()
    try:
        assert not ran.wait(0.1)  # nothing before the interval...
        task.poke()
        assert ran.wait(5)        # ...but at once when poked
    finally:
        task.stop()
    assert task.stopped and not task._thread.is_alive()


def test_runs_every_interval_and_stop_before_start_is_harmless():
    count = threading.Semaphore(0)
    task = PeriodicTask("t-periodic2", 0.01, count.release)
    task.start()
    try:
        for _ in range(3):
            assert count.acquire(timeout=5)
    finally:
        task.stop()
    PeriodicTask("t-never", 1.0, lambda: None).stop()
