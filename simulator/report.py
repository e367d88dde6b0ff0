"""Reports of simulated and replayed runs: terminal table, ``results.json``, PNG plots, HTML.

Input is a list of result objects (``RunMetrics.summary()`` plus ``ttft_cdf`` and ``load``
series), one per (policy, backend count). ``results.json`` holds exactly that list, so a report
can be rebuilt from it and simulated and live runs sit side by side. Plots use matplotlib's Agg
backend (imported only when plotting); the HTML embeds them as base64 data URIs so the file is
self-contained. Must not import ``router``.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["capacity_lines", "format_table", "write_report"]

_COLUMNS: tuple[tuple[str, str, str], ...] = (
    # (key, header, format)
    ("policy", "policy", "s"),
    ("backends", "N", "d"),
    ("requests", "reqs", "d"),
    ("hit_rate", "hit%", "pct"),
    ("oracle_hit_rate", "oracle%", "pct"),
    ("ttft_p50_s", "ttft p50", "s3"),
    ("ttft_p90_s", "p90", "s3"),
    ("ttft_p99_s", "p99", "s3"),
    ("tpot_p50_s", "tpot p50", "s3"),
    ("e2e_p50_s", "e2e p50", "s3"),
    ("imbalance", "imbal", "f2"),
    ("slo_attainment_ratio", "slo%", "pct"),
    ("goodput_rps", "goodput/s", "f2"),
    ("prefill_gpu_s", "prefill GPU-s", "f1"),
)


def _cell(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if fmt == "pct":
        return f"{100 * value:.1f}"
    if fmt == "s3":
        return f"{value:.3f}"
    if fmt == "f2":
        return f"{value:.2f}"
    if fmt == "f1":
        return f"{value:.1f}"
    return str(value)


def format_table(results: Sequence[dict[str, Any]]) -> str:
    """A fixed-width comparison table (latencies in seconds, rates in percent)."""
    rows = [[h for _k, h, _f in _COLUMNS]]
    rows += [[_cell(r.get(k), f) for k, _h, f in _COLUMNS] for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    lines = []
    for n, row in enumerate(rows):
        cells = [
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _label(r: dict[str, Any], many_sizes: bool) -> str:
    return f"{r['policy']} (N={r['backends']})" if many_sizes else str(r["policy"])


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return buf.getvalue()


def _plots(results: Sequence[dict[str, Any]]) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r["backends"] for r in results})
    many = len(sizes) > 1
    pngs: dict[str, bytes] = {}

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        cdf = r.get("ttft_cdf") or {}
        if cdf.get("s"):
            ax.plot(cdf["s"], cdf["ratio"], label=_label(r, many))
    ax.set_xscale("symlog", linthresh=0.01)
    ax.set_xlabel("TTFT (s)")
    ax.set_ylabel("fraction of requests")
    ax.set_title("TTFT CDF")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    pngs["ttft_cdf.png"] = _png(fig)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    labels = [_label(r, many) for r in results]
    xs = range(len(results))
    ax.bar([x - 0.2 for x in xs], [100 * r["hit_rate"] for r in results], 0.4, label="hit rate")
    oracle = [100 * (r.get("oracle_hit_rate") or 0.0) for r in results]
    ax.bar([x + 0.2 for x in xs], oracle, 0.4, label="oracle (pooled LRU)")
    ax.set_xticks(list(xs), labels, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("prefix-cache hit rate (% of prompt tokens)")
    ax.set_title("Hit rate vs oracle")
    ax.legend(fontsize=7)
    pngs["hit_rate.png"] = _png(fig)
    plt.close(fig)

    loaded = [r for r in results if (r.get("load") or {}).get("utilisation")]
    if loaded:
        fig, axes = plt.subplots(
            len(loaded), 1, figsize=(7, 1.6 * len(loaded) + 0.6), squeeze=False
        )
        for ax, r in zip(axes[:, 0], loaded, strict=True):
            load = r["load"]
            image = ax.imshow(
                load["utilisation"],
                aspect="auto",
                interpolation="nearest",
                vmin=0,
                vmax=1,
                extent=(
                    0,
                    load["bucket_s"] * len(load["utilisation"][0]),
                    len(load["utilisation"]),
                    0,
                ),
            )
            ax.set_ylabel(_label(r, many), fontsize=7)
        axes[-1, 0].set_xlabel("time (s); colour = busy fraction per backend")
        fig.colorbar(image, ax=axes[:, 0].tolist(), shrink=0.6)
        fig.suptitle("Per-backend load over time")
        pngs["load.png"] = _png(fig)
        plt.close(fig)

    if many:
        fig, ax = plt.subplots(figsize=(7, 4))
        for policy in dict.fromkeys(r["policy"] for r in results):
            rows = sorted(
                (r for r in results if r["policy"] == policy), key=lambda r: r["backends"]
            )
            ax.plot(
                [r["backends"] for r in rows],
                [r["ttft_p99_s"] for r in rows],
                marker="o",
                label=policy,
            )
        slo = results[0].get("slo_ttft_s")
        if slo:
            ax.axhline(slo, color="grey", linestyle="--", label="TTFT SLO")
        ax.set_yscale("log")
        ax.set_xlabel("backends")
        ax.set_ylabel("TTFT p99 (s)")
        ax.set_title("Capacity: TTFT p99 vs backend count")
        ax.legend(fontsize=7)
        pngs["capacity.png"] = _png(fig)
        plt.close(fig)
    return pngs


def capacity_lines(results: Sequence[dict[str, Any]]) -> list[str]:
    """For a sweep: the fewest backends at which each policy holds the TTFT SLO at p99."""
    lines = []
    for policy in dict.fromkeys(r["policy"] for r in results):
        rows = sorted((r for r in results if r["policy"] == policy), key=lambda r: r["backends"])
        ok = [r["backends"] for r in rows if r["ttft_p99_s"] <= r.get("slo_ttft_s", math.inf)]
        lines.append(
            f"{policy}: "
            + (f"{ok[0]} backends hold TTFT p99 <= SLO" if ok else "SLO not held at any size tried")
        )
    return lines


def write_report(
    out_dir: Path, results: Sequence[dict[str, Any]], title: str, meta: dict[str, Any] | None = None
) -> Path:
    """Write results.json, the PNGs and report.html into ``out_dir``; return the HTML path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    clean = [_nan_to_none(r) for r in results]
    (out_dir / "results.json").write_text(json.dumps(clean, indent=1, allow_nan=False))
    pngs = _plots(results)
    for name, data in pngs.items():
        (out_dir / name).write_bytes(data)
    sweep = len({r["backends"] for r in results}) > 1
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:1000px;margin:2em auto}"
        "pre{background:#f4f4f4;padding:1em;overflow-x:auto}img{max-width:100%}</style>",
        f"</head><body><h1>{html.escape(title)}</h1>",
    ]
    if meta:
        parts.append("<pre>" + html.escape(json.dumps(meta, indent=1, default=str)) + "</pre>")
    parts.append("<h2>Comparison</h2><pre>" + html.escape(format_table(results)) + "</pre>")
    if sweep:
        parts.append("<pre>" + html.escape("\n".join(capacity_lines(results))) + "</pre>")
    for name, data in pngs.items():
        uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
        parts.append(
            f"<h2>{html.escape(name[:-4].replace('_', ' '))}</h2><img alt='{name}' src='{uri}'>"
        )
    parts.append("</body></html>")
    path = out_dir / "report.html"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def _nan_to_none(value: Any) -> Any:
    """JSON has no NaN: a percentile of nothing is written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_nan_to_none(v) for v in value]
    return value
