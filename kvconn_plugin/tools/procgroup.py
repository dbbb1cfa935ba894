"""Stop a child process group the way a vLLM engine needs: gracefully, and completely.

A vLLM engine is several processes (front end, EngineCore, workers, multiprocessing's resource
tracker) that share /dev/shm message queues and semaphores. Killing only the leader, or
SIGKILLing everything at once, leaks those entries; this module is the one place that knows the
right order. Used by the engine runner (demo, benchmarks, tests) and the test helpers.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time


def _pgid(pid: int | str) -> int | None:
    """Process group of ``pid`` while it runs; None once it has exited (zombies included)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()  # after "pid (comm)"
        state, pgid = fields[0], int(fields[2])
    except (OSError, IndexError, ValueError):
        return None  # exited meanwhile
    return None if state in ("Z", "X") else pgid


def is_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie counts as gone); it need not be our child."""
    return _pgid(pid) is not None


def group_members(pgid: int) -> dict[int, str]:
    """Live (non-zombie) processes of process group ``pgid``: pid -> command line."""
    members: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        if _pgid(entry) != pgid:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                members[int(entry)] = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # exited meanwhile
    return members


def _wait_group(proc: subprocess.Popen, timeout: float) -> dict[int, str]:
    """Wait until the group has no live member; return what is still alive at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        proc.poll()  # reap the leader, or it stays a (zombie) member
        members = group_members(proc.pid)
        if not members or time.monotonic() > deadline:
            return members
        time.sleep(0.1)


def stop_process_group(proc: subprocess.Popen, grace_s: float = 20.0) -> None:
    """Stop a child started with ``start_new_session=True`` and everything in its group.

    Also call it after a normal exit: stragglers may still be cleaning up. SIGTERM the group,
    then wait for the whole group (not just the leader) for ``grace_s``: EngineCore and workers
    unlink their ``psm_*`` queues and ``sem.mp-*`` lock on the way out, and when vLLM itself
    SIGKILLs a slow EngineCore the resource tracker unlinks them once every process sharing it
    is gone. Whatever is still alive then is SIGKILLed, the resource tracker last (it ignores
    SIGTERM and must outlive the others to clean up after them).
    """
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if proc.poll() is None or group_members(proc.pid):
            os.killpg(proc.pid, signal.SIGTERM)
    left = _wait_group(proc, grace_s)
    if left:
        for pid, cmd in left.items():
            if "multiprocessing.resource_tracker" not in cmd:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        left = _wait_group(proc, 5.0)  # the tracker sees EOF and unlinks what was left
    if left:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)
