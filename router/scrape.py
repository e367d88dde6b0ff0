"""Engine-metric scraping: each backend's own ``/metrics`` -> the pool's engine signals.

Every ``interval_s`` each backend's ``GET /metrics`` is read and stored on the pool's
``Backend`` with the scrape time (``Backend.scraped``); the pool reads values older than its
staleness bound as ``None`` in ``BackendState``, so a backend whose scrapes fail falls back to
router-side counters by itself.

Only the sample lines of the families below are parsed; every other line is skipped with one
prefix test. The parse runs on the event loop, between requests: prometheus-client's parser
took 0.84 ms for an emulated pod's 86-line exposition (~10 us a line, so several ms for a real
vLLM one with its histograms), once per backend per interval, which stalls every request in
flight behind it; the line scan takes a few hundredths of that (``bench/scrape_parse.py``).

- vLLM: ``vllm:num_requests_waiting`` and ``vllm:num_requests_running`` (summed over engines,
  i.e. data-parallel ranks), ``vllm:kv_cache_usage_perc`` (0..1, the fullest engine),
  ``vllm:cache_config_info`` labels ``block_size`` and ``num_gpu_blocks``,
  ``vllm:num_preemptions_total`` (a counter, summed over engines);
- SGLang: ``sglang:num_queue_reqs``, ``sglang:num_running_reqs``, ``sglang:token_usage``.

Errors (connection, status, unparsable text) are counted per backend and never stop the loop.
Must not import ``simulator``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections.abc import Callable

import aiohttp

from policies.bookkeeping import EngineSignals
from router.kv.metrics import KvMetrics
from router.pool import Backend, BackendPool

__all__ = ["EngineScraper", "EngineSignals", "parse_engine_metrics"]

log = logging.getLogger("kvrouter.scrape")

_WAITING = ("vllm:num_requests_waiting", "sglang:num_queue_reqs")
_RUNNING = ("vllm:num_requests_running", "sglang:num_running_reqs")
_USAGE = ("vllm:kv_cache_usage_perc", "sglang:token_usage")
_CACHE_INFO = "vllm:cache_config_info"
_PREEMPTIONS = "vllm:num_preemptions_total"
_READ = frozenset((*_WAITING, *_RUNNING, *_USAGE, _CACHE_INFO, _PREEMPTIONS))
_READ_PREFIXES = tuple(_READ)

# A sample line of the text exposition format: name, optional {labels}, value, optional
# timestamp. Label values are quoted with \\, \" and \n escapes.
_LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*"'
_SAMPLE = re.compile(
    rf"(?:\{{\s*((?:{_LABEL}\s*,\s*)*(?:{_LABEL})?)\s*,?\s*\}})?"
    r"[ \t]+(\S+)(?:[ \t]+-?[0-9]+)?[ \t]*")
_NAME_END = re.compile(r"[{ \t]")
_LABEL_PAIR = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\.)*)"')
_UNESCAPE = re.compile(r"\\(.)")


def _samples(text: str) -> list[tuple[str, str, float]]:
    """(name, raw labels, value) of the sample lines of the families a router reads."""
    out = []
    for line in text.splitlines():
        if not line.startswith(_READ_PREFIXES):
            continue  # comments, and every family the router does not read
        end = _NAME_END.search(line)
        name = line[: end.start()] if end else line
        if name not in _READ:
            continue  # a longer name sharing the prefix
        match = _SAMPLE.fullmatch(line, len(name))
        if match is None:
            raise ValueError(f"unparsable sample line {line[:120]!r}")
        labels, raw = match.groups()
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"unparsable sample value in {line[:120]!r}") from None
        if math.isfinite(value):  # NaN or Inf says nothing a count or a ratio could use
            out.append((name, labels or "", value))
    return out


def _labels(raw: str) -> dict[str, str]:
    return {k: _UNESCAPE.sub(lambda m: "\n" if m.group(1) == "n" else m.group(1), v)
            for k, v in _LABEL_PAIR.findall(raw)}


def parse_engine_metrics(text: str) -> EngineSignals:
    """The signals a router needs from a vLLM or SGLang exposition; ValueError on a bad
    sample line of a family it reads (other lines are not read)."""
    waiting: float | None = None
    running: float | None = None
    usage: float | None = None
    block_size: int | None = None
    blocks: int | None = None
    preemptions: float | None = None
    for name, raw_labels, value in _samples(text):
        if name in _WAITING:
            waiting = (waiting or 0.0) + value
        elif name in _RUNNING:
            running = (running or 0.0) + value
        elif name in _USAGE:
            usage = value if usage is None else max(usage, value)
        elif name == _PREEMPTIONS:
            preemptions = (preemptions or 0.0) + value
        elif name == _CACHE_INFO:
            labels = _labels(raw_labels)
            block_size = _int_label(labels, "block_size") or block_size
            blocks = _int_label(labels, "num_gpu_blocks") or blocks
    return EngineSignals(
        waiting_requests=None if waiting is None else round(waiting),
        running_requests=None if running is None else round(running),
        kv_usage_ratio=None if usage is None else min(1.0, max(0.0, usage)),
        total_kv_blocks=blocks,
        block_size=block_size,
        preemptions_total=None if preemptions is None else max(0, round(preemptions)),
    )


def _int_label(labels: dict[str, str], key: str) -> int | None:
    raw = labels.get(key)
    try:
        value = int(raw) if raw not in (None, "", "None") else None
    except ValueError:
        return None
    return value if value is not None and value > 0 else None


class EngineScraper:
    """The background scrape loop over every backend in the pool."""

    def __init__(
        self,
        pool: BackendPool,
        metrics: KvMetrics,
        session: Callable[[], aiohttp.ClientSession],
        *,
        interval_s: float = 2.0,
        timeout_s: float = 2.0,
        now_s: Callable[[], float] = time.monotonic,
    ) -> None:
        self.pool = pool
        self.metrics = metrics
        self.session = session
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self._now_s = now_s
        self.scrapes = 0

    async def run(self) -> None:
        while True:
            await self.scrape_all()
            await asyncio.sleep(self.interval_s)

    async def scrape_all(self) -> None:
        backends = list(self.pool)
        await asyncio.gather(*(self.scrape(b) for b in backends))
        now_s = self._now_s()
        for backend in backends:
            if backend.scraped_at_s is not None:
                self.metrics.scrape_age.labels(backend.backend_id).set(
                    now_s - backend.scraped_at_s)
        self.scrapes += 1

    async def scrape(self, backend: Backend) -> bool:
        try:
            timeout = aiohttp.ClientTimeout(total=self.timeout_s)
            async with self.session().get(f"{backend.url.rstrip('/')}/metrics",
                                          timeout=timeout) as response:
                if response.status != 200:
                    raise ValueError(f"HTTP {response.status}")
                text = await response.text()
            signals = parse_engine_metrics(text)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the loop's boundary: count, keep the old (aging) values
            self.metrics.scrape_errors.labels(backend.backend_id).inc()
            log.debug("scraping %s failed: %s", backend.url, exc)
            return False
        backend.scraped(signals, self._now_s())
        return True

