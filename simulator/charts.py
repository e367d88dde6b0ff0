"""Small inline-SVG charts for the HTML reports: line charts, grouped bars and load strips.

Why our own ~200 lines and not matplotlib: reports are part of every ``simulate``, ``replay``,
``tune`` and ``demo`` run, so they must work with the default install; matplotlib (with numpy
and pillow) would be the heaviest dependency of a router that never plots. SVG text also stays
sharp, scales with the page (``viewBox`` + ``max-width:100%``) and is searchable.

Each function returns one ``<svg>`` element as a string; values are escaped. Pure and
synchronous: must not import ``router``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from html import escape

__all__ = ["PALETTE", "bar_chart", "line_chart", "load_strips"]

# Tableau 10: distinguishable, and what readers of matplotlib plots are used to.
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf")

_W, _H = 800, 360
_LEFT, _RIGHT, _TOP, _BOTTOM = 64, 190, 28, 48  # the legend sits in the right margin
_FONT = "font-family='sans-serif' font-size='11'"


def _fmt(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1000 or abs(value) < 0.01:
        return f"{value:.0e}".replace("e+0", "e").replace("e-0", "e-")
    return f"{value:.3g}"


def _open(width: int, height: int, title: str) -> list[str]:
    return [
        f"<svg xmlns='http://www.w3.org/2000/svg' viewBox='0 0 {width} {height}' "
        f"width='{width}' height='{height}' role='img' aria-label='{escape(title)}' "
        "style='max-width:100%;height:auto'>",
        f"<text x='{width / 2}' y='16' text-anchor='middle' {_FONT} font-weight='bold'>"
        f"{escape(title)}</text>",
    ]


def _scale(lo: float, hi: float, px_lo: float, px_hi: float,
           log: bool) -> Callable[[float], float]:
    if log:
        lo, hi = math.log10(lo), math.log10(hi)
    span = (hi - lo) or 1.0

    def to_px(v: float) -> float:
        x = math.log10(max(v, 1e-300)) if log else v
        return px_lo + (x - lo) / span * (px_hi - px_lo)

    return to_px


def _ticks(lo: float, hi: float, log: bool) -> list[float]:
    if log:
        decades = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
        # Fewer than three decades: 1-2-5 steps, or a chart could show a single tick.
        steps = (1,) if len(decades) > 3 else (1, 2, 5)
        return [m * 10.0 ** e for e in decades for m in steps if lo <= m * 10.0 ** e <= hi * 1.0001]
    step = 10 ** math.floor(math.log10((hi - lo) or 1.0))
    for mult in (1, 2, 5, 10):
        if (hi - lo) / (step * mult) <= 6:
            step *= mult
            break
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _legend(labels: Sequence[str], x: float, y: float) -> list[str]:
    out = []
    for i, label in enumerate(labels):
        color = PALETTE[i % len(PALETTE)]
        ly = y + 14 * i
        out.append(f"<rect x='{x}' y='{ly - 8}' width='10' height='10' fill='{color}'/>"
                   f"<text x='{x + 14}' y='{ly + 1}' {_FONT}>{escape(label)}</text>")
    return out


def _axes(x_px: Callable[[float], float], y_px: Callable[[float], float], x_ticks: list[float],
          y_ticks: list[float], x_label: str, y_label: str, width: int, height: int) -> list[str]:
    bottom, left = height - _BOTTOM, _LEFT
    out = [f"<rect x='{left}' y='{_TOP}' width='{width - left - _RIGHT}' "
           f"height='{bottom - _TOP}' fill='none' stroke='#888'/>"]
    for t in x_ticks:
        px = x_px(t)
        out.append(f"<line x1='{px:.1f}' y1='{_TOP}' x2='{px:.1f}' y2='{bottom}' stroke='#eee'/>"
                   f"<text x='{px:.1f}' y='{bottom + 14}' text-anchor='middle' {_FONT}>"
                   f"{_fmt(t)}</text>")
    for t in y_ticks:
        py = y_px(t)
        out.append(f"<line x1='{left}' y1='{py:.1f}' x2='{width - _RIGHT}' y2='{py:.1f}' "
                   f"stroke='#eee'/><text x='{left - 4}' y='{py + 4:.1f}' text-anchor='end' "
                   f"{_FONT}>{_fmt(t)}</text>")
    out.append(f"<text x='{(left + width - _RIGHT) / 2}' y='{height - 12}' text-anchor='middle' "
               f"{_FONT}>{escape(x_label)}</text>")
    mid = (_TOP + bottom) / 2
    out.append(f"<text x='14' y='{mid}' text-anchor='middle' transform='rotate(-90 14 {mid})' "
               f"{_FONT}>{escape(y_label)}</text>")
    return out


def line_chart(series: Sequence[tuple[str, Sequence[float], Sequence[float]]], *, title: str,
               x_label: str, y_label: str, x_log: bool = False, y_log: bool = False,
               markers: bool = False, hline: tuple[float, str] | None = None) -> str:
    """One line per ``(label, xs, ys)``; log axes drop values <= 0; ``hline`` = (y, label)."""
    def keep(v: float, log: bool) -> bool:
        return math.isfinite(v) and (v > 0 or not log)

    clean = [(label, [(x, y) for x, y in zip(xs, ys, strict=False)
                      if keep(x, x_log) and keep(y, y_log)]) for label, xs, ys in series]
    xs_all = [x for _l, pts in clean for x, _y in pts]
    ys_all = [y for _l, pts in clean for _x, y in pts] + ([hline[0]] if hline else [])
    out = _open(_W, _H, title)
    if not xs_all:
        out.append(f"<text x='{_W / 2}' y='{_H / 2}' text-anchor='middle' {_FONT}>no data</text>")
        return "".join(out) + "</svg>"
    x_lo, x_hi = min(xs_all), max(xs_all)
    y_lo, y_hi = min(ys_all), max(ys_all)
    if not y_log:
        y_lo = min(y_lo, 0.0)
    if x_hi == x_lo:
        x_lo, x_hi = (x_lo / 2, x_hi * 2) if x_log else (x_lo - 1, x_hi + 1)
    if y_hi == y_lo:
        y_lo, y_hi = (y_lo / 2, y_hi * 2) if y_log else (y_lo - 1, y_hi + 1)
    x_px = _scale(x_lo, x_hi, _LEFT, _W - _RIGHT, x_log)
    y_px = _scale(y_lo, y_hi, _H - _BOTTOM, _TOP, y_log)
    out += _axes(x_px, y_px, _ticks(x_lo, x_hi, x_log), _ticks(y_lo, y_hi, y_log), x_label,
                 y_label, _W, _H)
    for i, (_label, pts) in enumerate(clean):
        color = PALETTE[i % len(PALETTE)]
        path = " ".join(f"{x_px(x):.1f},{y_px(y):.1f}" for x, y in pts)
        out.append(f"<polyline points='{path}' fill='none' stroke='{color}' stroke-width='1.5'/>")
        if markers:
            out += [f"<circle cx='{x_px(x):.1f}' cy='{y_px(y):.1f}' r='3' fill='{color}'/>"
                    for x, y in pts]
    if hline:
        py = y_px(hline[0])
        out.append(f"<line x1='{_LEFT}' y1='{py:.1f}' x2='{_W - _RIGHT}' y2='{py:.1f}' "
                   f"stroke='#555' stroke-dasharray='5,4'/><text x='{_W - _RIGHT - 4}' "
                   f"y='{py - 4:.1f}' text-anchor='end' {_FONT}>{escape(hline[1])}</text>")
    out += _legend([label for label, _pts in clean], _W - _RIGHT + 12, _TOP + 10)
    return "".join(out) + "</svg>"


def bar_chart(groups: Sequence[str], series: Sequence[tuple[str, Sequence[float | None]]], *,
              title: str, y_label: str) -> str:
    """Grouped vertical bars: one group per entry of ``groups``, one bar per series."""
    values = [v for _l, vs in series for v in vs if v is not None and math.isfinite(v)]
    y_hi = 1.1 * max([*values, 0.0]) or 1.0
    height = _H + 40  # room for slanted group labels
    bottom = height - _BOTTOM - 40
    out = _open(_W, height, title)
    y_px = _scale(0.0, y_hi, bottom, _TOP, False)
    out.append(f"<rect x='{_LEFT}' y='{_TOP}' width='{_W - _LEFT - _RIGHT}' "
               f"height='{bottom - _TOP}' fill='none' stroke='#888'/>")
    for t in _ticks(0.0, y_hi, False):
        py = y_px(t)
        out.append(f"<line x1='{_LEFT}' y1='{py:.1f}' x2='{_W - _RIGHT}' y2='{py:.1f}' "
                   f"stroke='#eee'/><text x='{_LEFT - 4}' y='{py + 4:.1f}' text-anchor='end' "
                   f"{_FONT}>{_fmt(t)}</text>")
    mid = (_TOP + bottom) / 2
    out.append(f"<text x='14' y='{mid}' text-anchor='middle' transform='rotate(-90 14 {mid})' "
               f"{_FONT}>{escape(y_label)}</text>")
    slot = (_W - _LEFT - _RIGHT) / max(len(groups), 1)
    bar = slot * 0.8 / max(len(series), 1)
    for g, group in enumerate(groups):
        x0 = _LEFT + g * slot + slot * 0.1
        for s, (_label, vs) in enumerate(series):
            v = vs[g] if g < len(vs) else None
            if v is None or not math.isfinite(v):
                continue
            top = y_px(v)
            out.append(f"<rect x='{x0 + s * bar:.1f}' y='{top:.1f}' width='{bar * 0.95:.1f}' "
                       f"height='{bottom - top:.1f}' fill='{PALETTE[s % len(PALETTE)]}'>"
                       f"<title>{escape(_label)}: {_fmt(v)}</title></rect>")
        cx = x0 + slot * 0.4
        out.append(f"<text x='{cx:.1f}' y='{bottom + 14}' text-anchor='end' "
                   f"transform='rotate(-25 {cx:.1f} {bottom + 14})' {_FONT}>{escape(group)}</text>")
    out += _legend([label for label, _vs in series], _W - _RIGHT + 12, _TOP + 10)
    return "".join(out) + "</svg>"


def load_strips(rows: Sequence[tuple[str, float, Sequence[Sequence[float]]]], *,
                title: str) -> str:
    """Per-backend busy fraction over time, one strip per ``(label, bucket_s, matrix)``.

    Every strip shares one time axis (the longest run's), so strips compare at a glance."""
    span_s = max((bucket_s * max((len(r) for r in m), default=0) for _l, bucket_s, m in rows),
                 default=0.0) or 1.0
    strip_h, gap = 60, 18
    left = 150
    height = _TOP + len(rows) * (strip_h + gap) + 40
    out = _open(_W, height, title)
    x_px = _scale(0.0, span_s, left, _W - 16, False)
    y = float(_TOP)
    for label, bucket_s, matrix in rows:
        n = max(len(matrix), 1)
        cell_h = strip_h / n
        for b, row in enumerate(matrix):
            for t, value in enumerate(row):
                if value <= 0:
                    continue
                shade = max(0, min(255, round(255 * (1 - min(value, 1.0)))))
                x = x_px(t * bucket_s)
                w = x_px((t + 1) * bucket_s) - x
                out.append(f"<rect x='{x:.1f}' y='{y + b * cell_h:.1f}' width='{w + 0.3:.1f}' "
                           f"height='{cell_h:.1f}' fill='rgb({shade},{shade},255)'/>")
        out.append(f"<rect x='{left}' y='{y}' width='{_W - 16 - left}' height='{strip_h}' "
                   f"fill='none' stroke='#888'/><text x='{left - 6}' y='{y + strip_h / 2 + 4}' "
                   f"text-anchor='end' {_FONT}>{escape(label)}</text>")
        y += strip_h + gap
    for tick in _ticks(0.0, span_s, False):
        out.append(f"<text x='{x_px(tick):.1f}' y='{y}' text-anchor='middle' {_FONT}>"
                   f"{_fmt(tick)}</text>")
    out.append(f"<text x='{(left + _W) / 2}' y='{y + 18}' text-anchor='middle' {_FONT}>"
               "time (s); one row per backend; darker = busier (white idle, blue 100% busy)"
               "</text>")
    return "".join(out) + "</svg>"
