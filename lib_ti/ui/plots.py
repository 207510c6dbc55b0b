"""Small inline SVG plots (loss curves, vector norms): no plotting library, same on every gradio."""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence

WIDTH, HEIGHT, PAD = 560, 220, 40
COLORS = ("#3b82f6", "#f97316", "#10b981", "#a855f7", "#ef4444")


def _finite(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    return [(float(x), float(y)) for x, y in points if math.isfinite(x) and math.isfinite(y)]


def _thin(points: list[tuple[float, float]], limit: int = 400) -> list[tuple[float, float]]:
    if len(points) <= limit:
        return points
    step = len(points) / limit
    return [points[int(i * step)] for i in range(limit)] + [points[-1]]


def smooth(values: Sequence[float], beta: float = 0.9) -> list[float]:
    """Exponential moving average with bias correction (what the loss readout shows)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta**i))
    return out


def line_plot(
    series: Mapping[str, Sequence[tuple[float, float]]], title: str = "", elem_class: str = "ti-plot"
) -> str:
    """An SVG with one line per series (name -> [(x, y)]), shared axes, and a legend."""
    data = {k: _thin(_finite(v)) for k, v in series.items()}
    data = {k: v for k, v in data.items() if v}
    head = f"<div class='{elem_class}'>" + (
        f"<div class='ti-plot-title'>{html.escape(title)}</div>" if title else ""
    )
    if not data:
        return head + "<div class='ti-plot-empty'>no data yet</div></div>"
    xs = [x for pts in data.values() for x, _ in pts]
    ys = [y for pts in data.values() for _, y in pts]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:
        y0, y1 = y0 - 0.5 * abs(y0 or 1), y1 + 0.5 * abs(y1 or 1)

    def sx(x: float) -> float:
        return PAD + (x - x0) / (x1 - x0) * (WIDTH - 2 * PAD)

    def sy(y: float) -> float:
        return HEIGHT - PAD + (y - y0) / (y1 - y0) * (2 * PAD - HEIGHT)

    parts = [
        f"<svg xmlns='http://www.w3.org/2000/svg' viewBox='0 0 {WIDTH} {HEIGHT}' width='100%' role='img'>",
        (
            f"<rect x='{PAD}' y='{PAD // 2}' width='{WIDTH - 2 * PAD}' height='{HEIGHT - 1.5 * PAD}' "
            "fill='none' stroke='currentColor' stroke-opacity='0.3'/>"
        ),
    ]
    for frac in (0.0, 0.5, 1.0):
        y = y0 + frac * (y1 - y0)
        parts.append(
            f"<text x='{PAD - 4}' y='{sy(y) + 4:.1f}' font-size='11' text-anchor='end' fill='currentColor'>{y:.4g}</text>"
        )
    for x in (x0, x1):
        parts.append(
            f"<text x='{sx(x):.1f}' y='{HEIGHT - PAD + 16}' font-size='11' text-anchor='middle' fill='currentColor'>{x:.0f}</text>"
        )
    for i, (name, pts) in enumerate(data.items()):
        color = COLORS[i % len(COLORS)]
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        if len(pts) == 1:
            parts.append(f"<circle cx='{sx(pts[0][0]):.1f}' cy='{sy(pts[0][1]):.1f}' r='3' fill='{color}'/>")
        else:
            parts.append(f"<polyline points='{path}' fill='none' stroke='{color}' stroke-width='1.5'/>")
        parts.append(
            f"<text x='{PAD + 8 + 120 * i}' y='{PAD // 2 + 14}' font-size='12' fill='{color}'>{html.escape(name)}</text>"
        )
    parts.append("</svg>")
    return head + "".join(parts) + "</div>"


def bar_plot(groups: Mapping[str, Sequence[float]], title: str = "", elem_class: str = "ti-plot") -> str:
    """Bars per group (encoder -> values per vector), e.g. the norm of each vector."""
    data = {k: [float(v) for v in vals] for k, vals in groups.items() if len(vals)}
    head = f"<div class='{elem_class}'>" + (
        f"<div class='ti-plot-title'>{html.escape(title)}</div>" if title else ""
    )
    if not data:
        return head + "<div class='ti-plot-empty'>no data</div></div>"
    top = max((v for vals in data.values() for v in vals if math.isfinite(v)), default=1.0) or 1.0
    n = max(len(v) for v in data.values())
    slot = (WIDTH - 2 * PAD) / max(n, 1)
    bar = slot / (len(data) + 1)
    parts = [
        f"<svg xmlns='http://www.w3.org/2000/svg' viewBox='0 0 {WIDTH} {HEIGHT}' width='100%' role='img'>"
    ]
    for g, (name, vals) in enumerate(data.items()):
        color = COLORS[g % len(COLORS)]
        for i, v in enumerate(vals):
            h = (v / top if math.isfinite(v) else 0) * (HEIGHT - 2 * PAD)
            x = PAD + i * slot + g * bar
            parts.append(
                f"<rect x='{x:.1f}' y='{HEIGHT - PAD - h:.1f}' width='{bar * 0.9:.1f}' height='{h:.1f}' fill='{color}'>"
                f"<title>{html.escape(name)} vector {i}: {v:.4g}</title></rect>"
            )
        parts.append(
            f"<text x='{PAD + 120 * g}' y='{PAD // 2 + 4}' font-size='12' fill='{color}'>{html.escape(name)}</text>"
        )
    parts.append(
        f"<text x='{PAD - 4}' y='{PAD + 4}' font-size='11' text-anchor='end' fill='currentColor'>{top:.3g}</text>"
    )
    parts.append(
        f"<text x='{PAD - 4}' y='{HEIGHT - PAD + 4}' font-size='11' text-anchor='end' fill='currentColor'>0</text>"
    )
    parts.append("</svg>")
    return head + "".join(parts) + "</div>"
