"""The overhead benchmark's load from wrk (C, one thread), instead of this process's aiohttp
client: ~0.15 ms of CPU per request less on the two cores the routers compete for.

One ``slice`` runs ``wrk -t1 -c C -d S --latency`` against each of the target's URLs at once
(C split over them) with a generated Lua script. The script POSTs the benchmark's body: the same
bytes every time, or (``unique``) the prompt with a number that never repeats put in front and
after every ~200 characters, as ``overhead.Bodies`` does. Numbers start at a per-slice offset,
so no slice repeats another's. wrk's ``done`` hook prints the slice's requests, errors,
duration and latency percentiles, which are parsed here.

wrk counts every request that completed within ``-d`` seconds (there is no separate warm-up
window inside a run: the caller runs an unmeasured slice first). Durations are whole seconds.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["WrkSlice", "available", "run_slice"]

_DONE = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("WRK %d %d %d %d %d\n", summary.requests, summary.duration,
    e.connect + e.read + e.write + e.timeout + e.status,
    latency:percentile(50), latency:percentile(99)))
end
"""


@dataclass(frozen=True)
class WrkSlice:
    requests: int
    errors: int
    seconds: float
    p50_s: float
    p99_s: float


def available() -> bool:
    return shutil.which("wrk") is not None


def _lua_string(data: bytes) -> str:
    text = data.decode()
    if "]==]" in text:
        raise ValueError("body contains the Lua long-string terminator")
    return "[==[" + text + "]==]"


def _script(head: bytes, parts: list[bytes], tail: bytes, unique: bool, offset: int) -> str:
    lines = ['wrk.method = "POST"', 'wrk.headers["Content-Type"] = "application/json"']
    if not unique:
        lines.append(f"wrk.body = {_lua_string(head + b''.join(parts) + tail)}")
    else:
        pieces = ", ".join(_lua_string(p) for p in parts)
        lines += [
            f"local head, tail, parts = {_lua_string(head)}, {_lua_string(tail)}, {{{pieces}}}",
            f"local n = {offset}",
            "request = function()",
            "  n = n + 1",
            '  local number = " " .. n',
            "  local out = {head, tostring(n), \" \"}",
            "  for i = 1, #parts do out[#out + 1] = parts[i] .. number end",
            "  out[#out + 1] = tail",
            "  return wrk.format(nil, nil, nil, table.concat(out))",
            "end",
        ]
    return "\n".join(lines) + "\n" + _DONE


def run_slice(urls: list[str], concurrency: int, seconds: int, head: bytes, parts: list[bytes],
              tail: bytes, unique: bool, offset: int) -> WrkSlice:
    """One measured run of ``seconds`` s: one wrk per URL, ``concurrency`` connections split
    over them, all at once. ``offset`` keeps unique prompts unique across calls (each wrk
    numbers its requests from its own share of it)."""
    if not available():
        raise RuntimeError("wrk not found: install it (apt-get install wrk) or use --client python")
    per_url = [concurrency // len(urls) + (i < concurrency % len(urls)) for i in range(len(urls))]
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (url, connections) in enumerate(zip(urls, per_url, strict=True)):
            if connections == 0:
                continue
            script = Path(tmp) / f"load{i}.lua"
            script.write_text(_script(head, parts, tail, unique, offset + i * 100_000_000))
            runs.append(subprocess.Popen(
                ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s",
                 str(script), url + "/v1/completions"],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
        outputs = [r.communicate()[0].decode() for r in runs]
    slices = []
    for output in outputs:
        line = next((x for x in output.splitlines() if x.startswith("WRK ")), None)
        if line is None:
            raise RuntimeError(f"wrk printed no summary:\n{output}")
        requests, duration_us, errors, p50_us, p99_us = map(int, line.split()[1:])
        slices.append(WrkSlice(requests, errors, duration_us / 1e6, p50_us / 1e6, p99_us / 1e6))
    return WrkSlice(
        requests=sum(s.requests for s in slices),
        errors=sum(s.errors for s in slices),
        seconds=max(s.seconds for s in slices),
        p50_s=max(s.p50_s for s in slices),
        p99_s=max(s.p99_s for s in slices),
    )
