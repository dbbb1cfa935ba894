"""The benchmarks stay runnable: tiny bench_load and bench_lookup_flood runs end to end (no
figures checked)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.lmcache_server
ROOT = Path(__file__).resolve().parents[2]


def _run_bench(script: str, *args: str) -> None:
    env = dict(os.environ, LMCACHE_TRACK_USAGE="false", DO_NOT_TRACK="1")
    proc = subprocess.run([sys.executable, f"benchmarks/{script}", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def test_bench_load_runs_and_writes_its_report(tmp_path):
    out = tmp_path / "bench_load.txt"
    _run_bench("bench_load.py", "--steps", "40", "--running", "32", "--forward-ms", "2",
               "--no-pin", "--out", str(out))
    text = out.read_text()
    for row in ("connector time per step p99 (ms)", "lookups answered", "hit tokens"):
        assert row in text


def test_bench_lookup_flood_runs_and_writes_its_report(tmp_path):
    out = tmp_path / "bench_lookup_flood.txt"
    _run_bench("bench_lookup_flood.py", "--burst", "20", "--tokens", "512", "--rounds", "1",
               "--workers", "1", "--out", str(out))
    assert "lookups/s" in out.read_text()
