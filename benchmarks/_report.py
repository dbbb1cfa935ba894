"""What every benchmark ends with: print the result and keep it under ``benchmarks/results/``."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in [0, 1]) of a non-empty sequence."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def save(path: str | Path, text: str) -> None:
    """Print ``text`` and write it to ``path`` (parents created)."""
    print(text)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text.rstrip("\n") + "\n")
    print(f"written to {out}")


def write_report(path: str | Path, header: str, rows: Iterable[tuple[str, float]],
                 notes: Iterable[str] = (), elapsed: float | None = None) -> None:
    """A header, one ``name value`` line per row, free-form notes, then the run time."""
    rows = list(rows)
    width = max(len(name) for name, _ in rows) + 2
    lines = [header, *(f"{name:<{width}}{value:10.3f}" for name, value in rows), *notes]
    if elapsed is not None:
        lines.append(f"(total {elapsed:.0f}s)")
    save(path, "\n".join(lines))
