"""The one figure of ``bench_serving.py``, drawn with Pillow.

Why Pillow and not matplotlib: Pillow is already installed (a vLLM dependency), while
matplotlib would be a new dependency of the shared environment for three simple charts.
Three panels: TTFT p50/p99 per configuration, output tokens/s per configuration, and TTFT
p50 per round (one line per configuration).
"""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

PANEL_W, PANEL_H, MARGIN = 520, 420, 70
COLORS = {"none": (120, 120, 120), "native": (230, 140, 30), "lmcache": (50, 110, 200),
          "ours": (40, 160, 80)}
EXTRA_COLORS = [(170, 60, 160), (200, 60, 60), (20, 150, 160)]
BLACK, GRID = (0, 0, 0), (225, 225, 225)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def _nice_max(v: float) -> tuple[float, float]:
    """An axis top >= v and a tick step (1, 2 or 5 times a power of ten)."""
    if v <= 0:
        return 1.0, 0.25
    raw = v / 4
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    return step * math.ceil(v / step), step


class _Panel:
    """One chart area with a y axis from 0 to a nice maximum."""

    def __init__(self, draw: ImageDraw.ImageDraw, x0: int, title: str, ylabel: str,
                 ymax: float):
        self.d, self.font = draw, _font(13)
        self.left, self.right = x0 + MARGIN, x0 + PANEL_W - 15
        self.top, self.bottom = 45, PANEL_H - 60
        self.ymax, step = _nice_max(ymax)
        draw.text((x0 + PANEL_W // 2, 18), title, fill=BLACK, font=_font(15), anchor="mm")
        draw.text((x0 + 8, self.top - 22), ylabel, fill=BLACK, font=self.font)
        tick = 0.0
        while tick <= self.ymax + 1e-9:
            y = self.y(tick)
            draw.line([(self.left, y), (self.right, y)], fill=GRID)
            draw.text((self.left - 6, y), f"{tick:g}", fill=BLACK, font=self.font, anchor="rm")
            tick += step
        draw.line([(self.left, self.top), (self.left, self.bottom), (self.right, self.bottom)],
                  fill=BLACK)

    def y(self, v: float) -> float:
        return self.bottom - (self.bottom - self.top) * min(v, self.ymax) / self.ymax

    def label(self, x: float, text: str) -> None:
        self.d.text((x, self.bottom + 8), text, fill=BLACK, font=self.font, anchor="ma")


def _color(name: str, i: int) -> tuple[int, int, int]:
    return COLORS.get(name) or EXTRA_COLORS[i % len(EXTRA_COLORS)]


def _ttft_panel(draw: ImageDraw.ImageDraw, x0: int, summaries: dict[str, dict]) -> None:
    vals = [(n, s["ttft_p50_ms"] or 0.0, s["ttft_p99_ms"] or 0.0) for n, s in summaries.items()]
    p = _Panel(draw, x0, "TTFT per configuration", "ms (solid p50, light p99)",
               max((v[2] for v in vals), default=1.0))
    slot = (p.right - p.left) / max(1, len(vals))
    for i, (name, p50, p99) in enumerate(vals):
        cx, color = p.left + slot * (i + 0.5), _color(name, i)
        light = tuple(c + (255 - c) // 2 for c in color)
        for dx, v, fill in ((-slot * 0.2, p50, color), (slot * 0.2, p99, light)):
            draw.rectangle([cx + dx - slot * 0.18, p.y(v), cx + dx + slot * 0.18, p.bottom],
                           fill=fill, outline=BLACK)
        p.label(cx, name)


def _throughput_panel(draw: ImageDraw.ImageDraw, x0: int, summaries: dict[str, dict]) -> None:
    vals = [(n, s["output_tokens_per_s"] or 0.0) for n, s in summaries.items()]
    p = _Panel(draw, x0, "Throughput", "output tokens/s", max((v for _, v in vals), default=1))
    slot = (p.right - p.left) / max(1, len(vals))
    for i, (name, v) in enumerate(vals):
        cx = p.left + slot * (i + 0.5)
        draw.rectangle([cx - slot * 0.3, p.y(v), cx + slot * 0.3, p.bottom],
                       fill=_color(name, i), outline=BLACK)
        draw.text((cx, p.y(v) - 4), f"{v:.1f}", fill=BLACK, font=p.font, anchor="mb")
        p.label(cx, name)


def _rounds_panel(draw: ImageDraw.ImageDraw, x0: int, summaries: dict[str, dict]) -> None:
    series = {n: {int(r): v["p50_ms"] for r, v in s["ttft_per_round"].items()
                  if v["p50_ms"] is not None} for n, s in summaries.items()}
    rounds = sorted({r for pts in series.values() for r in pts})
    top = max((v for pts in series.values() for v in pts.values()), default=1.0)
    p = _Panel(draw, x0, "TTFT p50 per round", "ms", top)
    span = max(1, len(rounds) - 1)

    def x(r: int) -> float:
        return p.left + 25 + (p.right - p.left - 50) * (rounds.index(r) / span)

    for r in rounds:
        p.label(x(r), f"round {r}")
    for i, (name, pts) in enumerate(series.items()):
        xy = [(x(r), p.y(v)) for r, v in sorted(pts.items())]
        color = _color(name, i)
        if len(xy) > 1:
            draw.line(xy, fill=color, width=3)
        for cx, cy in xy:
            draw.ellipse([cx - 4, cy - 4, cx + 4, cy + 4], fill=color)
        lx, ly = p.left + 90 * i, p.bottom + 30  # legend in a row under the axis
        draw.rectangle([lx, ly, lx + 12, ly + 12], fill=color)
        draw.text((lx + 18, ly - 1), name, fill=BLACK, font=p.font)


def draw_png(summaries: dict[str, dict], path: str | Path, caption: str = "") -> Path:
    """Write the three panels for the configurations that ran; returns ``path``."""
    img = Image.new("RGB", (3 * PANEL_W, PANEL_H + 20), "white")
    draw = ImageDraw.Draw(img)
    _ttft_panel(draw, 0, summaries)
    _throughput_panel(draw, PANEL_W, summaries)
    _rounds_panel(draw, 2 * PANEL_W, summaries)
    if caption:
        draw.text((10, PANEL_H - 5), caption, fill=BLACK, font=_font(12))
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out)
    return out
