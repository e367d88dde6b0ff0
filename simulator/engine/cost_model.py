"""How long one engine scheduler step takes: a cost model loaded from a data file.

Pure and synchronous; imports only the standard library. Must not import ``router``, asyncio
or anything that does I/O besides reading the profile file in ``load_cost_model``.

Profiles live in ``simulator/data/<name>.json`` (each carries its provenance):
``h200-llama-3.1-8b`` (the default), ``h200-llama-3.2-1b``, ``h200-qwen3-32b-shape``, and
``cpu-tiny`` (the tiny CPU vLLM model, for demos).

The model of one step (continuous batching: a step may mix prefill chunks and decodes)::

    step_s = step_floor_s
           + sum over prefill chunks of prefill_work_s(new_tokens, cached_tokens)
           + decode_excess_s(sum of the decoding requests' context tokens)

    prefill_work_s(new, cached) = prefill_linear_s_per_token * new
                                + prefill_attention_s_per_token2 * new * (new + 2 * cached)

``new * (new + 2 * cached)`` is ``(N - M) * (N + M)`` for a prompt of N tokens with M cached:
each new token attends to its whole context (the calibration README's fit). ``cached`` is the
context already computed before the chunk (cache hits plus earlier chunks).

``decode_excess_s(T)`` interpolates the measured decode table (``decode_rows``: batch, context,
seconds) as a function of the total context T = batch x context: rows are averaged per T, made
non-decreasing (suffix minimum, which drops warm-up noise), and the table's smallest value (the
eager framework floor, ~20 ms on H200) is subtracted; beyond the last row it grows in proportion
to T (KV reads are linear in context). The floor is replaced by ``step_floor_s``, a documented
per-profile parameter: a served engine with CUDA graphs does a small-batch step of an 8B model in
a few ms (weights / HBM bandwidth), not the ~20 ms of the eager measurement.

Tiers below HBM are loaded, not recomputed: ``load_s(tokens, bytes_per_s)`` =
``tokens * kv_bytes_per_token / bytes_per_s``. ``h2d_bytes_per_s`` is the profile's
``pinned_h2d_GBps`` (measured: ~55 GB/s pinned host-to-device on the H200, in
``../shared/calibration/``), the price of a CPU-offload hit; ``shared_store_bytes_per_s`` is
``shared_store_GBps``, the network read rate of a fleet-shared KV store (LMCache/Mooncake
style), an assumption each profile states in its ``provenance``. Either is 0 when unknown.

Router-side policies (in ``policies/``, which cannot import this package) can be configured with
the same coefficients: ``prefill_seconds(new_tokens, cached_tokens, linear_s_per_token,
attention_s_per_token2, floor_s)`` is the plain formula, and ``CostModel.prefill_coefficients()``
returns the names ``prefill_linear_s_per_token``, ``prefill_attention_s_per_token2`` and
``step_floor_s`` with their values.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DATA_DIR",
    "DEFAULT_PROFILE",
    "CostModel",
    "load_cost_model",
    "prefill_seconds",
    "profile_names",
]

DATA_DIR = Path(__file__).parent.parent / "data"
DEFAULT_PROFILE = "h200-llama-3.1-8b"


def prefill_seconds(
    new_tokens: int,
    cached_tokens: int,
    linear_s_per_token: float,
    attention_s_per_token2: float,
    floor_s: float = 0.0,
) -> float:
    """Time to prefill ``new_tokens`` after ``cached_tokens`` of context, as one step alone."""
    if new_tokens <= 0:
        return floor_s
    return (
        floor_s
        + linear_s_per_token * new_tokens
        + attention_s_per_token2 * new_tokens * (new_tokens + 2 * cached_tokens)
    )


@dataclass(frozen=True, slots=True)
class CostModel:
    """One profile's coefficients. Build with ``load_cost_model`` or ``CostModel.from_mapping``."""

    name: str
    step_floor_s: float
    prefill_linear_s_per_token: float
    prefill_attention_s_per_token2: float
    decode_total_tokens: tuple[int, ...]
    """Knots of the decode excess curve: total context tokens (batch x context), ascending."""
    decode_excess_s: tuple[float, ...]
    """Seconds above the measured floor at each knot, non-decreasing, first is 0."""
    kv_bytes_per_token: int = 0
    kv_cache_bytes: int = 0
    h2d_bytes_per_s: float = 0.0
    shared_store_bytes_per_s: float = 0.0

    @classmethod
    def from_mapping(cls, data: Mapping[str, object], name: str = "") -> CostModel:
        rows = data.get("decode_rows", [])
        if not isinstance(rows, list) or not rows:
            raise ValueError(f"cost profile {name!r}: decode_rows must be a non-empty list")
        knots, excess = _decode_curve(rows)
        return cls(
            name=str(data.get("name", name)),
            step_floor_s=_number(data, "step_floor_s", name),
            prefill_linear_s_per_token=_number(data, "prefill_linear_s_per_token", name),
            prefill_attention_s_per_token2=_number(data, "prefill_attention_s_per_token2", name),
            decode_total_tokens=knots,
            decode_excess_s=excess,
            kv_bytes_per_token=int(_number(data, "kv_bytes_per_token", name, 0)),
            kv_cache_bytes=int(_number(data, "kv_cache_bytes", name, 0)),
            h2d_bytes_per_s=_number(data, "pinned_h2d_GBps", name, 0) * 1e9,
            shared_store_bytes_per_s=_number(data, "shared_store_GBps", name, 0) * 1e9,
        )

    def slowed(self, factor: float) -> CostModel:
        """The same engine ``factor`` times slower at compute (a throttled or older GPU): every
        step's floor, prefill and decode work scale; tier loads (links, not compute) do not."""
        return dataclasses.replace(
            self,
            name=f"{self.name} x{factor:g}",
            step_floor_s=self.step_floor_s * factor,
            prefill_linear_s_per_token=self.prefill_linear_s_per_token * factor,
            prefill_attention_s_per_token2=self.prefill_attention_s_per_token2 * factor,
            decode_excess_s=tuple(v * factor for v in self.decode_excess_s),
        )

    def prefill_coefficients(self) -> dict[str, float]:
        """The coefficients a router-side policy needs to price a prefill the same way."""
        return {
            "prefill_linear_s_per_token": self.prefill_linear_s_per_token,
            "prefill_attention_s_per_token2": self.prefill_attention_s_per_token2,
            "step_floor_s": self.step_floor_s,
        }

    def prefill_work_s(self, new_tokens: int, cached_tokens: int) -> float:
        """One prefill chunk's share of a step (no floor)."""
        return prefill_seconds(
            new_tokens,
            cached_tokens,
            self.prefill_linear_s_per_token,
            self.prefill_attention_s_per_token2,
        )

    def decode_work_s(self, total_context_tokens: int) -> float:
        """The decode part of a step above the floor, for the summed context of its decodes."""
        if total_context_tokens <= 0:
            return 0.0
        knots = self.decode_total_tokens
        values = self.decode_excess_s
        if total_context_tokens >= knots[-1]:
            return values[-1] * total_context_tokens / knots[-1]
        i = bisect.bisect_right(knots, total_context_tokens)
        if i == 0:
            return values[0]
        x0, x1 = knots[i - 1], knots[i]
        y0, y1 = values[i - 1], values[i]
        return y0 + (y1 - y0) * (total_context_tokens - x0) / (x1 - x0)

    def step_s(
        self, prefill_chunks: Iterable[tuple[int, int]], decode_context_tokens: int
    ) -> float:
        """A whole step: ``prefill_chunks`` are ``(new_tokens, cached_tokens)`` pairs."""
        total = self.step_floor_s + self.decode_work_s(decode_context_tokens)
        for new_tokens, cached_tokens in prefill_chunks:
            total += self.prefill_work_s(new_tokens, cached_tokens)
        return total

    def load_s(self, tokens: int, bytes_per_s: float) -> float:
        """Seconds to move ``tokens`` of KV at ``bytes_per_s`` (a tier load, not a recompute)."""
        if tokens <= 0:
            return 0.0
        if bytes_per_s <= 0 or self.kv_bytes_per_token <= 0:
            raise ValueError(
                f"cost profile {self.name!r}: a tier load needs kv_bytes_per_token and its "
                "bandwidth (pinned_h2d_GBps / shared_store_GBps)"
            )
        return tokens * self.kv_bytes_per_token / bytes_per_s

    def num_gpu_blocks(self, block_size: int) -> int:
        """KV blocks that fit in the profile's ``kv_cache_bytes`` (0 when unknown)."""
        if self.kv_bytes_per_token <= 0 or block_size <= 0:
            return 0
        return self.kv_cache_bytes // (self.kv_bytes_per_token * block_size)


def _number(data: Mapping[str, object], key: str, name: str, default: float | None = None) -> float:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"cost profile {name!r}: {key} must be a number, got {value!r}")
    if value < 0:
        raise ValueError(f"cost profile {name!r}: {key} must be >= 0, got {value!r}")
    return float(value)


def _decode_curve(rows: Sequence[object]) -> tuple[tuple[int, ...], tuple[float, ...]]:
    by_total: dict[int, list[float]] = {}
    for row in rows:
        if not isinstance(row, Mapping):
            raise ValueError(f"decode row must be a mapping, got {row!r}")
        total = int(row["batch"]) * int(row["context"])
        by_total.setdefault(total, []).append(float(row["seconds"]))
    knots = sorted(by_total)
    means = [sum(by_total[k]) / len(by_total[k]) for k in knots]
    # Suffix minimum: a row slower than a larger one is warm-up noise, not a real cost.
    for i in range(len(means) - 2, -1, -1):
        means[i] = min(means[i], means[i + 1])
    floor = means[0]
    return tuple(knots), tuple(m - floor for m in means)


def profile_names() -> list[str]:
    """Profiles shipped in ``simulator/data`` (every JSON there except tokenizer files)."""
    return sorted(p.stem for p in DATA_DIR.glob("*.json"))


def load_cost_model(profile: str | Path = DEFAULT_PROFILE) -> CostModel:
    """Load a profile by name (``simulator/data/<name>.json``) or by path to a JSON file."""
    path = Path(profile)
    if path.suffix != ".json":
        path = DATA_DIR / f"{profile}.json"
    if not path.is_file():
        raise ValueError(
            f"unknown cost profile {str(profile)!r} (known: {', '.join(profile_names())})"
        )
    with path.open(encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"cost profile {str(profile)!r}: top level must be an object")
    return CostModel.from_mapping(data, name=path.stem)
