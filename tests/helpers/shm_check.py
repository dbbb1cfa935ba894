"""/dev/shm leak checks: per test and per module (conftest), and for a whole run
(``python -m tests.helpers.shm_check snapshot|check FILE``, used by ``make test`` when its two
test streams run side by side).

A leak is an entry of ours that appeared meanwhile and that no live process maps or holds
open after a grace period. Generic names (Python's shared memory and semaphores, torch's
tensor sharing) cannot be told apart between two concurrent pytest processes: with
``KVCONN_TEST_PARALLEL_STREAMS`` set, per-test checks leave them to the run-level check.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

SHM_DIR = Path("/dev/shm")
# Python shared_memory (vLLM's message queues), multiprocessing semaphores, LMCache pools,
# our autostarted servers' pools, torch tensor sharing.
SHM_PREFIXES = ("psm_", "sem.mp-", "mp-", "lmcache", "kvconn", "vllm", "torch_")
GENERIC_PREFIXES = ("psm_", "sem.mp-", "mp-", "torch_")
GRACE_S = 5.0  # exiting processes unlink their segments on the way out
PARALLEL_STREAMS = bool(os.environ.get("KVCONN_TEST_PARALLEL_STREAMS"))


def entries() -> set[str]:
    try:
        return {n for n in os.listdir(SHM_DIR) if n.startswith(SHM_PREFIXES)}
    except OSError:  # no /dev/shm (not Linux): nothing to check
        return set()


def in_use(names: set[str]) -> set[str]:
    """The subset of ``names`` some live process still maps or holds open (a running
    server's pool, a wider-scoped fixture's engine, another test run's queues): not leaks."""
    paths = {str(SHM_DIR / n): n for n in names}
    used: set[str] = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/maps", errors="replace") as f:
                for line in f:
                    _, sep, rest = line.rstrip("\n").partition("/dev/shm/")
                    if sep and sep + rest in paths:
                        used.add(paths[sep + rest])
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target in paths:
                    used.add(paths[target])
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if used == names:
            break
    return used


def leaked(before: set[str], *, pid: int | None = None, generic: bool = True) -> list[str]:
    """Entries that appeared since ``before``, are ours (our uid; with ``pid``, an LMCache
    pool of another pytest's fixtures is skipped; without ``generic``, generic names are
    skipped), and no live process holds, after ``GRACE_S``."""

    def candidates() -> set[str]:
        out = set()
        for name in entries() - before:
            m = re.match(r"lmcache_l1_pool_kvt(\d+)x", name)
            if pid is not None and m and int(m.group(1)) != pid:
                continue  # a concurrent test session's server
            if not generic and name.startswith(GENERIC_PREFIXES):
                continue
            try:
                if os.stat(SHM_DIR / name).st_uid != os.getuid():
                    continue
            except FileNotFoundError:
                continue
            out.add(name)
        return out

    deadline = time.monotonic() + GRACE_S
    while True:
        found = candidates()
        found -= in_use(found) if found else set()
        if not found or time.monotonic() > deadline:
            return sorted(found)
        time.sleep(0.2)


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("snapshot", "check"):
        print("usage: python -m tests.helpers.shm_check snapshot|check FILE")
        return 2
    path = Path(argv[1])
    if argv[0] == "snapshot":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(sorted(entries())))
        return 0
    found = leaked(set(json.loads(path.read_text())))
    if found:
        print(f"the test run leaked /dev/shm entries: {found}")
        return 1
    print("no /dev/shm entry leaked over the whole run")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
