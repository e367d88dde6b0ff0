"""Reports of simulated and replayed runs: terminal table, ``results.json``, SVG charts, HTML.

Input is a list of result objects (``RunMetrics.summary()`` plus ``ttft_cdf`` and ``load``
series), one per (policy, backend count). ``results.json`` holds exactly that list, so a report
can be rebuilt from it and simulated and live runs sit side by side. Charts are inline SVG drawn
by ``simulator.charts`` (no plotting library: reports work with the default install), so
``report.html`` is one self-contained file; each chart is also written as its own ``.svg``.
Every column carries its unit, and a glossary under the table says what each one measures.
Must not import ``router``.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from simulator import charts

__all__ = ["COLUMNS", "Column", "capacity_lines", "format_table", "short_name", "write_report"]


@dataclass(frozen=True, slots=True)
class Column:
    key: str
    header: str
    """Short header for the terminal; the unit is appended in brackets when there is one."""
    unit: str
    fmt: str
    meaning: str
    """One line for the report's glossary."""


COLUMNS: tuple[Column, ...] = (
    Column("policy", "policy", "", "s", "routing policy (with #N: tune trial N)"),
    Column("backends", "N", "", "d", "backends (engines) in the run"),
    Column("routers", "R", "", "d", "router replicas (simulate --routers; docs/scale-out.md)"),
    Column("sync", "sync", "", "onoff", "replica sync between the router replicas"),
    Column("in_flight_seen_ratio", "seen", "x", "f2",
           "router replicas: fleet in-flight requests a replica saw when deciding / the true "
           "count, mean over decisions (1.00 = one router's view; 1/R = blind to its peers)"),
    Column("requests", "reqs", "", "d", "requests that finished"),
    Column("failed", "failed", "", "d", "requests that got an error or no tokens"),
    Column("hit_rate", "hit", "%", "pct",
           "prefix-cache hit rate: prompt tokens served from an engine's cache / prompt tokens "
           "(replay and demo: the engines' usage.prompt_tokens_details.cached_tokens)"),
    Column("pod_hit_rate", "pod hit", "%", "pct",
           "the pods' own vllm:prefix_cache_hits / vllm:prefix_cache_queries counters (demo)"),
    Column("oracle_hit_rate", "oracle", "%", "pct",
           "hit rate of one ideal LRU cache pooling every backend's memory, fed the same prompts "
           "in arrival order: what routing could reach at best"),
    Column("cpu_hit_rate", "cpu hit", "%", "pct",
           "of the hit rate: prompt tokens loaded from the engines' CPU offload tier (tiered "
           "runs only)"),
    Column("shared_hit_rate", "shared hit", "%", "pct",
           "of the hit rate: prompt tokens loaded from the fleet-shared KV store (tiered runs "
           "only)"),
    Column("ttft_p50_s", "TTFT p50", "s", "s3", "time to first token, median"),
    Column("ttft_p90_s", "p90", "s", "s3", "time to first token, 90th percentile"),
    Column("ttft_p99_s", "p99", "s", "s3", "time to first token, 99th percentile"),
    Column("tpot_p50_s", "TPOT p50", "s", "s3", "time per output token after the first, median"),
    Column("e2e_p50_s", "e2e p50", "s", "s3", "request latency from send to last token, median"),
    Column("imbalance", "imbal", "x", "f2",
           "busiest backend's busy time / the mean backend's (1.00 = perfectly even)"),
    Column("slo_attainment_ratio", "SLO", "%", "pct",
           "requests whose TTFT met the SLO (slo_ttft_s in results.json)"),
    Column("goodput_rps", "goodput", "req/s", "f2",
           "requests per second that finished within the TTFT SLO"),
    Column("prefill_gpu_s", "prefill", "GPU-s", "f1",
           "engine seconds spent on prefill, summed over backends (simulator only: a client "
           "cannot see it, so replay and demo leave it out)"),
)


def _cell(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if fmt == "pct":
        return f"{100 * value:.1f}"
    if fmt == "onoff":
        return "on" if value else "off"
    if fmt == "s3":
        return f"{value:.3f}"
    if fmt == "f2":
        return f"{value:.2f}"
    if fmt == "f1":
        return f"{value:.1f}"
    return str(value)


def _columns(results: Sequence[Mapping[str, Any]]) -> list[Column]:
    """The columns that have a value in at least one result (failed: only when some failed)."""
    out = []
    for col in COLUMNS:
        values = [r.get(col.key) for r in results]
        if col.key == "failed" and not any(values):
            continue
        if all(v is None for v in values):
            continue
        out.append(col)
    return out


def _header(col: Column) -> str:
    return f"{col.header} ({col.unit})" if col.unit else col.header


def format_table(results: Sequence[Mapping[str, Any]]) -> str:
    """A fixed-width comparison table; each header carries its unit."""
    cols = _columns(results)
    rows = [[_header(c) for c in cols]]
    rows += [[_cell(r.get(c.key), c.fmt) for c in cols] for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(cols))]
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


def short_name(trace: str) -> str:
    """A trace's name for titles: a file's name without its directories, or ``synthetic:NAME``."""
    if trace.startswith("synthetic:"):
        return trace.split(",", 1)[0]
    return Path(trace).name or trace


def _label(r: Mapping[str, Any], many_sizes: bool) -> str:
    name = f"{r['policy']} {r['label']}" if r.get("routers") and r.get("label") else r["policy"]
    return f"{name} (N={r['backends']})" if many_sizes else str(name)


def _charts(results: Sequence[Mapping[str, Any]]) -> dict[str, tuple[str, str]]:
    """file stem -> (heading, svg)."""
    sizes = sorted({r["backends"] for r in results})
    many = len(sizes) > 1
    out: dict[str, tuple[str, str]] = {}
    series = [(_label(r, many), (r.get("ttft_cdf") or {}).get("s") or [],
               [100 * y for y in (r.get("ttft_cdf") or {}).get("ratio") or []]) for r in results]
    if any(xs for _l, xs, _y in series):
        out["ttft_cdf"] = ("Time to first token: share of requests served within a time",
                           charts.line_chart(series, title="TTFT CDF", x_label="TTFT (s, log)",
                                             y_label="requests (%)", x_log=True))
    labels = [_label(r, many) for r in results]
    bars: list[tuple[str, list[float | None]]] = [
        ("hit rate", [100 * r["hit_rate"] for r in results])]
    if any(r.get("pod_hit_rate") is not None for r in results):
        bars.append(("pods' own counters", [
            None if r.get("pod_hit_rate") is None else 100 * r["pod_hit_rate"] for r in results]))
    if any(r.get("oracle_hit_rate") is not None for r in results):
        bars.append(("oracle (pooled LRU)", [
            None if r.get("oracle_hit_rate") is None else 100 * r["oracle_hit_rate"]
            for r in results]))
    out["hit_rate"] = ("Prefix-cache hit rate against the oracle",
                       charts.bar_chart(labels, bars, title="Hit rate vs oracle",
                                        y_label="prompt tokens from cache (%)"))
    loaded = [(_label(r, many), float(r["load"]["bucket_s"]), r["load"]["utilisation"])
              for r in results if (r.get("load") or {}).get("utilisation")]
    if loaded:
        out["load"] = ("Per-backend load over time (same time axis for every run)",
                       charts.load_strips(loaded, title="Busy fraction per backend"))
    if many:
        lines = []
        for policy in dict.fromkeys(r["policy"] for r in results):
            rows = sorted((r for r in results if r["policy"] == policy),
                          key=lambda r: r["backends"])
            lines.append((str(policy), [float(r["backends"]) for r in rows],
                          [r["ttft_p99_s"] for r in rows]))
        slo = results[0].get("slo_ttft_s")
        out["capacity"] = ("Capacity: TTFT p99 against the number of backends",
                           charts.line_chart(lines, title="TTFT p99 vs backends",
                                             x_label="backends", y_label="TTFT p99 (s, log)",
                                             y_log=True, markers=True,
                                             hline=(slo, "TTFT SLO") if slo else None))
    return out


def capacity_lines(results: Sequence[Mapping[str, Any]]) -> list[str]:
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


_STYLE = (
    "body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;"
    "overflow-wrap:anywhere}"
    "table{border-collapse:collapse;font-size:13px}"
    "th,td{border-bottom:1px solid #ddd;padding:3px 6px;text-align:right}"
    "th:first-child,td:first-child{text-align:left}th{vertical-align:bottom}"
    "table.meta td{text-align:left;vertical-align:top}table.meta td:first-child{white-space:nowrap}"
    "dl{font-size:13px}dt{font-weight:bold;float:left;clear:left;width:9em}"
    "dd{margin-left:10em;margin-bottom:.3em}"
    ".note{background:#fff6d5;padding:.5em 1em;border-left:4px solid #e0b000}"
    "svg{display:block;margin:1em 0}"
)


def _meta_html(meta: Mapping[str, Any]) -> str:
    rows = []
    for key, value in meta.items():
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        rows.append(f"<tr><td>{html.escape(str(key))}</td><td><code>{html.escape(text)}"
                    "</code></td></tr>")
    return "<table class='meta'>" + "".join(rows) + "</table>"


def _table_html(results: Sequence[Mapping[str, Any]]) -> str:
    cols = _columns(results)
    head = "".join(f"<th>{html.escape(c.header)}"
                   + (f"<br><small>{html.escape(c.unit)}</small>" if c.unit else "") + "</th>"
                   for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(r.get(c.key), c.fmt))}</td>"
                                    for c in cols) + "</tr>" for r in results)
    glossary = "".join(f"<dt>{html.escape(_header(c))}</dt><dd>{html.escape(c.meaning)}</dd>"
                       for c in cols if c.key != "policy")
    return f"<table><tr>{head}</tr>{body}</table><h3>What the columns mean</h3><dl>{glossary}</dl>"


def _errors_html(results: Sequence[Mapping[str, Any]]) -> str:
    rows = []
    for r in results:
        for message, count in (r.get("errors") or {}).items():
            rows.append(f"<tr><td>{html.escape(str(r['policy']))}</td><td>{count}</td>"
                        f"<td style='text-align:left'>{html.escape(message)}</td></tr>")
    if not rows:
        return ""
    return ("<h2>Errors from the target, grouped</h2><table><tr><th>run</th><th>requests</th>"
            "<th style='text-align:left'>answer</th></tr>" + "".join(rows) + "</table>")


def write_report(
    out_dir: Path,
    results: Sequence[dict[str, Any]],
    title: str,
    meta: dict[str, Any] | None = None,
    notes: Sequence[str] = (),
) -> Path:
    """Write results.json, one .svg per chart and report.html into ``out_dir``; return the
    HTML path. ``title`` is the page's H1 (keep it short: details belong in ``meta``);
    ``notes`` are shown above the table."""
    out_dir.mkdir(parents=True, exist_ok=True)
    clean = [_nan_to_none(r) for r in results]
    (out_dir / "results.json").write_text(json.dumps(clean, indent=1, allow_nan=False))
    drawn = _charts(results)
    for stem, (_heading, svg) in drawn.items():
        (out_dir / f"{stem}.svg").write_text(svg, encoding="utf-8")
    sweep = len({r["backends"] for r in results}) > 1
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style>",
        f"</head><body><h1>{html.escape(title)}</h1>",
    ]
    if meta:
        parts.append(_meta_html(meta))
    parts += [f"<p class='note'>{html.escape(note)}</p>" for note in notes]
    parts.append("<h2>Comparison</h2>" + _table_html(results))
    if sweep:
        parts.append("<ul>" + "".join(f"<li>{html.escape(line)}</li>"
                                      for line in capacity_lines(results)) + "</ul>")
    parts.append(_errors_html(results))
    for heading, svg in drawn.values():
        parts.append(f"<h2>{html.escape(heading)}</h2>{svg}")
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
