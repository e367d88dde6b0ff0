"""What one simulated (or replayed) run measures, in bounded memory.

``RunMetrics`` collects through ``on_*`` hooks called by the cluster simulator or the live replay
client: latencies go into fixed-size reservoirs (exact until the reservoir fills, a uniform
sample after), counters stay scalars, per-backend busy time goes into a timeline whose bucket
width doubles when it runs out of buckets. ``summary()`` gives the flat dict written to
``results.json``. ``PooledLruOracle`` is the hit-rate reference: the same total cache capacity
pooled into one LRU cache that sees every prompt the moment it arrives.

Pure and synchronous: must not import ``router`` or matplotlib; no clock, no global RNG.
"""

from __future__ import annotations

import math
import random
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

__all__ = ["LoadTimeline", "PooledLruOracle", "Reservoir", "RunMetrics", "TieredOracle", "quantile"]


def quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile of already sorted values; NaN when empty."""
    if not sorted_values:
        return math.nan
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


class Reservoir:
    """Uniform sample of at most ``capacity`` values (Algorithm R, seeded: deterministic)."""

    __slots__ = ("_rng", "capacity", "count", "total", "values")

    def __init__(self, capacity: int = 100_000, seed: int = 0) -> None:
        self.capacity = capacity
        self.values: list[float] = []
        self.count = 0
        self.total = 0.0
        self._rng = random.Random(seed)

    def add(self, value: float) -> None:
        self.count += 1
        self.total += value
        if len(self.values) < self.capacity:
            self.values.append(value)
            return
        slot = self._rng.randrange(self.count)
        if slot < self.capacity:
            self.values[slot] = value

    def sorted(self) -> list[float]:
        return sorted(self.values)

    def mean(self) -> float:
        return self.total / self.count if self.count else math.nan


class LoadTimeline:
    """Busy seconds per backend per time bucket; at most ``max_buckets`` buckets ever."""

    __slots__ = ("bucket_s", "busy", "max_buckets")

    def __init__(self, n_backends: int, bucket_s: float = 1.0, max_buckets: int = 240) -> None:
        self.bucket_s = bucket_s
        self.max_buckets = max_buckets
        self.busy: list[list[float]] = [[] for _ in range(n_backends)]

    def _grow(self, bucket: int) -> None:
        while bucket >= self.max_buckets:
            # Halve the resolution instead of growing: memory stays bounded on any trace length.
            for row in self.busy:
                row[:] = [sum(row[i : i + 2]) for i in range(0, len(row), 2)]
            self.bucket_s *= 2
            bucket //= 2

    def add(self, backend: int, start_s: float, end_s: float) -> None:
        while start_s < end_s:
            bucket = int(start_s / self.bucket_s)
            if bucket >= self.max_buckets:
                self._grow(bucket)
                continue
            row = self.busy[backend]
            if len(row) <= bucket:
                row.extend([0.0] * (bucket + 1 - len(row)))
            edge = (bucket + 1) * self.bucket_s
            row[bucket] += min(end_s, edge) - start_s
            start_s = edge

    def utilisation(self) -> list[list[float]]:
        """Busy fraction per backend per bucket, rows padded to the same length."""
        width = max((len(r) for r in self.busy), default=0)
        return [[b / self.bucket_s for b in r] + [0.0] * (width - len(r)) for r in self.busy]


class PooledLruOracle:
    """One ideal LRU cache of ``capacity_blocks`` shared by all backends.

    Sees each prompt at arrival (no prefill delay, no in-use pinning), so it is an optimistic
    reference for what routing can reach with the same total memory; a partitioned cache can
    in contrived cases keep a block that pooled LRU evicts, so it is a reference, not a theorem.
    """

    __slots__ = ("_lru", "capacity_blocks", "hit_tokens", "input_tokens")

    def __init__(self, capacity_blocks: int) -> None:
        self.capacity_blocks = capacity_blocks
        self._lru: OrderedDict[int, None] = OrderedDict()
        self.hit_tokens = 0
        self.input_tokens = 0

    def observe(self, full_blocks: Sequence[int], block_size: int, input_tokens: int) -> int:
        lru = self._lru
        hit = 0
        for key in full_blocks:
            if key not in lru:
                break
            hit += 1
        for key in full_blocks:
            if key in lru:
                lru.move_to_end(key)
            else:
                lru[key] = None
        while len(lru) > self.capacity_blocks:
            lru.popitem(last=False)
        self.hit_tokens += hit * block_size
        self.input_tokens += input_tokens
        return hit * block_size

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.input_tokens if self.input_tokens else 0.0


class TieredOracle(PooledLruOracle):
    """``PooledLruOracle`` over the fleet's HBM, above a second pooled LRU holding what HBM
    evicts, as big as every engine's CPU offload tier plus the shared store together.

    A prompt hits its longest prefix held in either (the last-token cap aside, as above);
    ``lower_hit_tokens`` counts the part only the lower pool held, which a tiered engine
    loads instead of recomputing. Blocks a prompt uses move to the top pool. With the same
    tiers, an optimistic reference for what routing can reach (no per-engine partition).
    """

    __slots__ = ("_lower", "last_lower_tokens", "lower_capacity_blocks", "lower_hit_tokens")

    def __init__(self, capacity_blocks: int, lower_capacity_blocks: int) -> None:
        super().__init__(capacity_blocks)
        self.lower_capacity_blocks = lower_capacity_blocks
        self._lower: OrderedDict[int, None] = OrderedDict()
        self.lower_hit_tokens = 0
        self.last_lower_tokens = 0

    def observe(self, full_blocks: Sequence[int], block_size: int, input_tokens: int) -> int:
        top, lower = self._lru, self._lower
        hit = lower_hit = 0
        for key in full_blocks:
            if key in top:
                hit += 1
            elif key in lower:
                hit += 1
                lower_hit += 1
            else:
                break
        for key in full_blocks:
            if key in top:
                top.move_to_end(key)
            else:
                lower.pop(key, None)
                top[key] = None
        while len(top) > self.capacity_blocks:
            key, _ = top.popitem(last=False)
            lower[key] = None
        while len(lower) > self.lower_capacity_blocks:
            lower.popitem(last=False)
        self.hit_tokens += hit * block_size
        self.lower_hit_tokens += lower_hit * block_size
        self.last_lower_tokens = lower_hit * block_size
        self.input_tokens += input_tokens
        return hit * block_size


class RunMetrics:
    """One policy's run: hooks in, summary out."""

    def __init__(self, policy: str, n_backends: int, slo_ttft_s: float, seed: int = 0) -> None:
        self.policy = policy
        self.n_backends = n_backends
        self.slo_ttft_s = slo_ttft_s
        self.ttft_s = Reservoir(seed=seed)
        self.tpot_s = Reservoir(seed=seed + 1)
        self.itl_s = Reservoir(seed=seed + 2)
        self.e2e_s = Reservoir(seed=seed + 3)
        self.timeline = LoadTimeline(n_backends)
        self.busy_s = [0.0] * n_backends
        self.prefill_gpu_s = 0.0
        self.arrived = 0
        self.finished = 0
        self.failed = 0
        self.within_slo = 0
        self.input_tokens = 0
        self.hit_tokens = 0
        self.output_tokens = 0
        self.first_arrival_s = math.inf
        self.last_finish_s = 0.0
        self.routed = [0] * n_backends
        self.extra: dict[str, Any] = {}

    def on_arrival(self, arrival_s: float) -> None:
        self.arrived += 1
        self.first_arrival_s = min(self.first_arrival_s, arrival_s)

    def on_routed(self, backend: int) -> None:
        self.routed[backend] += 1

    def on_busy(self, backend: int, start_s: float, end_s: float, prefill_s: float = 0.0) -> None:
        self.busy_s[backend] += end_s - start_s
        self.prefill_gpu_s += prefill_s
        self.timeline.add(backend, start_s, end_s)

    def on_token_gap(self, gap_s: float) -> None:
        self.itl_s.add(gap_s)

    def on_finished(
        self,
        arrival_s: float,
        first_token_s: float,
        finish_s: float,
        input_tokens: int,
        cached_tokens: int,
        output_tokens: int,
    ) -> None:
        self.finished += 1
        ttft = first_token_s - arrival_s
        self.ttft_s.add(ttft)
        self.e2e_s.add(finish_s - arrival_s)
        if output_tokens > 1:
            self.tpot_s.add((finish_s - first_token_s) / (output_tokens - 1))
        if ttft <= self.slo_ttft_s:
            self.within_slo += 1
        self.input_tokens += input_tokens
        self.hit_tokens += cached_tokens
        self.output_tokens += output_tokens
        self.last_finish_s = max(self.last_finish_s, finish_s)

    def on_failed(self) -> None:
        self.failed += 1

    def summary(self, oracle: PooledLruOracle | None = None) -> dict[str, Any]:
        ttft, e2e = self.ttft_s.sorted(), self.e2e_s.sorted()
        tpot, itl = self.tpot_s.sorted(), self.itl_s.sorted()
        span_s = max(self.last_finish_s - self.first_arrival_s, 1e-9) if self.finished else 0.0
        mean_busy = sum(self.busy_s) / len(self.busy_s) if self.busy_s else 0.0
        out: dict[str, Any] = {
            "policy": self.policy,
            "backends": self.n_backends,
            "requests": self.finished,
            "failed": self.failed,
            "hit_rate": self.hit_tokens / self.input_tokens if self.input_tokens else 0.0,
            "oracle_hit_rate": oracle.hit_rate if oracle else None,
            "ttft_p50_s": quantile(ttft, 0.5),
            "ttft_p90_s": quantile(ttft, 0.9),
            "ttft_p99_s": quantile(ttft, 0.99),
            "ttft_mean_s": self.ttft_s.mean(),
            "tpot_p50_s": quantile(tpot, 0.5),
            "tpot_p99_s": quantile(tpot, 0.99),
            "itl_p50_s": quantile(itl, 0.5),
            "itl_p99_s": quantile(itl, 0.99),
            "e2e_p50_s": quantile(e2e, 0.5),
            "e2e_p99_s": quantile(e2e, 0.99),
            "imbalance": max(self.busy_s) / mean_busy if mean_busy > 0 else 1.0,
            "throughput_rps": self.finished / span_s if span_s else 0.0,
            "output_tokens_per_s": self.output_tokens / span_s if span_s else 0.0,
            "slo_ttft_s": self.slo_ttft_s,
            "slo_attainment_ratio": self.within_slo / self.finished if self.finished else 0.0,
            "goodput_rps": self.within_slo / span_s if span_s else 0.0,
            "prefill_gpu_s": self.prefill_gpu_s,
            "busy_s": list(self.busy_s),
            "routed": list(self.routed),
            "input_tokens": self.input_tokens,
            "hit_tokens": self.hit_tokens,
        }
        out.update(self.extra)
        return out

    def ttft_cdf(self, points: int = 200) -> tuple[list[float], list[float]]:
        """(ttft_s, cumulative fraction) at up to ``points`` evenly spaced ranks."""
        values = self.ttft_s.sorted()
        if not values:
            return [], []
        step = max(1, len(values) // points)
        idx = [*range(0, len(values), step), len(values) - 1]
        return [values[i] for i in idx], [(i + 1) / len(values) for i in idx]

