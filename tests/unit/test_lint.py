"""The tree stays clean under the project's ruff rules (pyproject.toml, [tool.ruff.lint]).

Part of the test run so lint debt cannot pile up again; skipped where ruff is not installed
(scripts/setup_env.sh installs the pinned version).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _ruff() -> str | None:
    beside = Path(sys.executable).with_name("ruff")
    return str(beside) if beside.is_file() else shutil.which("ruff")


@pytest.mark.skipif(_ruff() is None, reason="ruff not installed")
def test_ruff_check_is_clean():
    proc = subprocess.run([_ruff(), "check", "--no-cache", "--output-format", "concise", "."],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
