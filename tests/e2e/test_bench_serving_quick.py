"""The serving benchmark stays runnable: ``bench_serving.py --quick`` with the no-connector
baseline and our connector, against a real LMCache server and real ``vllm serve`` engines.
Only the exit status and the output comparison are checked, never timings."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers.engine import REPO_ROOT, child_env

pytestmark = [pytest.mark.engine, pytest.mark.lmcache_server, pytest.mark.bench_smoke,
              pytest.mark.slow]


def test_quick_serving_benchmark_runs_and_ours_answers_like_no_connector(tmp_path):
    out = tmp_path / "bench_serving.json"
    proc = subprocess.run(
        [sys.executable, "benchmarks/bench_serving.py", "--quick", "--configs", "none,ours",
         "--out", str(out)],
        cwd=REPO_ROOT, env=child_env(), capture_output=True, text=True, timeout=540,
        check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["correctness"]["equal"] is True
    assert {n: c["status"] for n, c in report["configs"].items()} == {"none": "ran",
                                                                       "ours": "ran"}
    assert out.with_suffix(".png").stat().st_size > 0
