"""Hand-written SVG charts (no plotting dependency).

`percentile_chart` draws latency by percentile, the x axis stretched towards the tail
(50%, 90%, 99%, 99.9% equally spaced), one line per series.
"""

from __future__ import annotations

import math
from html import escape

_W, _H = 720, 420
_LEFT, _RIGHT, _TOP, _BOTTOM = 64, 180, 40, 48
_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf")
_TICKS = (0.0, 50.0, 90.0, 99.0, 99.9)
_X_MAX = 3.3  # -log10(1 - 99.95%)


def _x_of(percentile: float) -> float:
    """Position of a percentile on the stretched axis: -log10(1 - p), capped."""
    stretched: float = -math.log10(max(1.0 - percentile / 100.0, 1e-9))
    return min(stretched, _X_MAX)


def _nice_max(value: float) -> float:
    if value <= 0:
        return 1.0
    magnitude = 10.0 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if value <= step * magnitude:
            return step * magnitude
    return 10 * magnitude


def percentile_chart(
    title: str,
    series: list[tuple[str, list[tuple[float, float]]]],
    *,
    y_label: str = "added latency (ms)",
    limit: tuple[str, float] | None = None,
) -> str:
    """An SVG of `series` (name, [(percentile, value)]) with an optional horizontal limit."""
    values = [v for _, points in series for _, v in points]
    if limit is not None:
        values.append(limit[1])
    y_max = _nice_max(max(values, default=1.0))
    plot_w, plot_h = _W - _LEFT - _RIGHT, _H - _TOP - _BOTTOM

    def sx(p: float) -> float:
        return _LEFT + _x_of(p) / _X_MAX * plot_w

    def sy(v: float) -> float:
        return _TOP + plot_h - min(v, y_max) / y_max * plot_h

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{_H}" '
        f'font-family="sans-serif" font-size="12">',
        f'<rect width="{_W}" height="{_H}" fill="white"/>',
        f'<text x="{_W / 2}" y="22" text-anchor="middle" font-size="15">{escape(title)}</text>',
    ]
    for i in range(6):
        v = y_max * i / 5
        y = sy(v)
        parts.append(
            f'<line x1="{_LEFT}" y1="{y:.1f}" x2="{_LEFT + plot_w}" y2="{y:.1f}" stroke="#ddd"/>'
            f'<text x="{_LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{v:g}</text>'
        )
    for p in _TICKS:
        x = sx(p)
        parts.append(
            f'<line x1="{x:.1f}" y1="{_TOP}" x2="{x:.1f}" y2="{_TOP + plot_h}" stroke="#ddd"/>'
            f'<text x="{x:.1f}" y="{_TOP + plot_h + 16}" text-anchor="middle">{p:g}%</text>'
        )
    parts.append(
        f'<text x="{_LEFT + plot_w / 2}" y="{_H - 10}" text-anchor="middle">percentile</text>'
        f'<text x="16" y="{_TOP + plot_h / 2}" text-anchor="middle" '
        f'transform="rotate(-90 16 {_TOP + plot_h / 2})">{escape(y_label)}</text>'
    )
    if limit is not None:
        y = sy(limit[1])
        parts.append(
            f'<line x1="{_LEFT}" y1="{y:.1f}" x2="{_LEFT + plot_w}" y2="{y:.1f}" '
            f'stroke="black" stroke-dasharray="6 4"/>'
            f'<text x="{_LEFT + 4}" y="{y - 4:.1f}">{escape(limit[0])}</text>'
        )
    for index, (name, points) in enumerate(series):
        colour = _COLOURS[index % len(_COLOURS)]
        path = " ".join(f"{sx(p):.1f},{sy(v):.1f}" for p, v in points)
        parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
        y = _TOP + 14 + index * 18
        parts.append(
            f'<line x1="{_W - _RIGHT + 12}" y1="{y - 4}" x2="{_W - _RIGHT + 32}" y2="{y - 4}" '
            f'stroke="{colour}" stroke-width="3"/>'
            f'<text x="{_W - _RIGHT + 38}" y="{y}">{escape(name)}</text>'
        )
    parts.append("</svg>")
    return "\n".join(parts) + "\n"
