"""The engine time model the KV-aware policy uses to turn tokens into seconds.

Prefilling the ``new`` tokens of an N-token prompt whose first ``cached`` = M tokens already
have KV costs

    linear_s_per_token * new + attention_s_per_token_pair * new * (new + 2 * cached)   seconds

i.e. ``a (N - M) + b (N - M)(N + M)``: each new token passes through the weights once and
attends to its whole context. Defaults are the least-squares fit of full prefills of
Llama-3.1-8B on one H200 (``/work/shared/calibration/README.md``: 29.3 us per token and
0.393 ns per token pair; ~0.25 s for 8k tokens cold, a few ms with 97% cached).

An engine step (continuous batching) also pays a fixed floor and the decode of every running
request, whose cost grows with their total context (KV reads):

    step_s = step_floor_s + decode_s_per_context_token * context tokens of running requests

and prefilling T tokens takes about ``1 + T / max_batched_tokens`` such steps. Defaults: a
4 ms floor (16 GB of weights at ~4.3 TB/s) and 0.4 us per context token (the slope of the
H200 8B decode table beyond 32k total context tokens). Calibrate per fleet by refitting.

Also ``PendingPrefill``: the prefill work a policy sent one backend and predicts unfinished.

``BackendSpeed``: each backend's speed against the fleet, learned from its first tokens (the
model above, corrected per backend).

kv_aware predicts time with one cost model for every backend. A backend slower than the model
(a throttled or older GPU, a noisy neighbour, a smaller tensor-parallel group in a mixed fleet)
then looks as fast as the others whenever its forecasts are not overdue: its queue is priced in
the model's seconds, and each request it finishes invites the next one at the model's speed.
Forecasts that end at reported first tokens (``PendingPrefill``, above) keep it from looking
idle while it is late, but not from being offered work again once it has caught up.

Per backend, from every streamed request's first token (the router's TTFT for it, and the TTFT
the policy predicted at the cost model's speed):

    predicted_b = predicted_b * (1 - 1/window) + predicted TTFT      (a decayed sum)
    observed_b  = observed_b  * (1 - 1/window) + observed TTFT
    ratio_b     = observed_b / predicted_b
    factor_b    = ratio_b / median(ratio over backends with >= min_requests first tokens;
                  the lower median of an even count),
                  1 inside the band [1 / band_ratio, band_ratio], clipped to
                  [1 / max_ratio, max_ratio]

Sums, not a mean of ratios: a cached request's TTFT is a few ms, where the network and the
engine's own tokenizer are a large share, so each request counts by its predicted size. The
median makes it relative: a cost model that is off for the whole fleet (another GPU, another
model) moves every ratio alike and no factor, and only relative speed moves work. The band
keeps a homogeneous fleet as it was: its backends' ratios differ by what queueing the model
does not see, not by speed (the capacity-edge simulations, docs/simulation.md "A slow engine").
With fewer than two backends heard from, every factor is 1. A backend that has taught nothing
for ``memory_s`` is forgotten (``factor``), so one that recovered is offered work again.

kv_aware multiplies what a first token measures on a backend (its queue, the request's
prefill and steps, and the fleet prices made of them) by its factor; what it predicts is
stored at the model's speed (``Prediction.speed``), so the learned factor never feeds itself.

Times come from the caller. Cost: O(1) per first token, plus a median over the backends heard
from every ``MEDIAN_EVERY`` (8) first tokens and when one joins (2.2 us per first token on
average with 64 backends, 0.7 us with 4); a lookup per score.

Pure; must not import anything outside the standard library and ``policies.types``.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from policies.types import BackendId

__all__ = ["BackendSpeed", "PendingPrefill", "PrefillCost"]


@dataclass(frozen=True, slots=True)
class PrefillCost:
    linear_s_per_token: float = 29.3e-6
    attention_s_per_token_pair: float = 0.393e-9
    step_floor_s: float = 0.004
    decode_s_per_context_token: float = 0.4e-6
    max_batched_tokens: int = 8192

    def __post_init__(self) -> None:
        if min(self.linear_s_per_token, self.attention_s_per_token_pair, self.step_floor_s,
               self.decode_s_per_context_token) < 0:
            raise ValueError("engine time coefficients must be >= 0")
        if self.max_batched_tokens < 1:
            raise ValueError("max_batched_tokens must be >= 1")

    def seconds(self, new_tokens: float, cached_tokens: float = 0.0) -> float:
        """Compute time to prefill ``new_tokens`` after ``cached_tokens`` of cached context."""
        if new_tokens <= 0:
            return 0.0
        return new_tokens * (
            self.linear_s_per_token
            + self.attention_s_per_token_pair * (new_tokens + 2.0 * cached_tokens)
        )

    def step_overhead_s(self, prefill_tokens: float, running_context_tokens: float) -> float:
        """Step floors and decode work paid while ``prefill_tokens`` are prefilled in chunks
        beside running requests holding ``running_context_tokens`` of context."""
        step_s = self.step_floor_s + self.decode_s_per_context_token * running_context_tokens
        return step_s * (1.0 + max(prefill_tokens, 0.0) / self.max_batched_tokens)


class PendingPrefill:
    """The prefill work a policy sent one backend and believes is not finished yet.

    Each dispatch adds its predicted prefill seconds and uncached tokens. A forecast ends at
    the request's first token when one will be reported (``retire``, from ``on_first_token``;
    ``awaits_first_token``), else at its predicted first-token time (``expire(now_s)``). A
    reported request past its predicted time is *overdue*: the backend is slower or more
    loaded than predicted, and its whole prefill still counts, since how much is left is
    unknown (without this a backend 4x slower than the model looks idle once its forecasts
    lapse, and keeps receiving work). Router-side in-flight counters cannot tell prefilling
    requests from decoding ones; this can. ``mean_prefill_s`` / ``mean_new_tokens`` are moving
    averages over the last ``window`` dispatches, used to price the engine's own waiting
    requests. O(log n) per dispatch; a retired forecast leaves its heap entry behind until its
    predicted time passes (lazy deletion).
    """

    __slots__ = ("_entries", "_heap", "_late", "_seq", "_window", "mean_new_tokens",
                 "mean_prefill_s", "new_tokens", "prompt_tokens", "seconds")

    def __init__(self, window: int) -> None:
        self._heap: list[tuple[float, int]] = []  # (predicted first token s, key), lazy
        # key -> (prefill_s, new_tokens, prompt_tokens, awaits_first_token), live forecasts
        self._entries: dict[int, tuple[float, float, int, bool]] = {}
        self._late: set[int] = set()  # live forecasts past their predicted time
        self._seq = 0
        self._window = window
        self.seconds = 0.0
        self.new_tokens = 0.0
        self.prompt_tokens = 0
        self.mean_prefill_s = 0.0
        self.mean_new_tokens = 0.0

    def add(self, done_s: float, prefill_s: float, new_tokens: float, prompt_tokens: int,
            awaits_first_token: bool = False) -> int:
        """Record one dispatch; returns its key for ``retire``."""
        self._seq += 1
        key = self._seq
        heapq.heappush(self._heap, (done_s, key))
        self._entries[key] = (prefill_s, new_tokens, prompt_tokens, awaits_first_token)
        self.seconds += prefill_s
        self.new_tokens += new_tokens
        self.prompt_tokens += prompt_tokens
        weight = 1.0 / min(key, self._window)
        self.mean_prefill_s += (prefill_s - self.mean_prefill_s) * weight
        self.mean_new_tokens += (new_tokens - self.mean_new_tokens) * weight
        return key

    def retire(self, key: int) -> None:
        """The forecast ``key`` ended: its first token came, or it finished. Unknown keys
        (already expired) are ignored."""
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        self._late.discard(key)
        self._drop(entry)

    def _drop(self, entry: tuple[float, float, int, bool]) -> None:
        self.seconds -= entry[0]
        self.new_tokens -= entry[1]
        self.prompt_tokens -= entry[2]
        if not self._entries:  # no float drift left behind
            self.seconds = self.new_tokens = 0.0
            self.prompt_tokens = 0

    @property
    def overdue(self) -> bool:
        """Some forecast is past its predicted time: ``remaining_s`` counts all in full."""
        return bool(self._late)

    def remaining_s(self, now_s: float) -> float:
        """Pending prefill seconds at ``now_s``. With nothing overdue, the earliest-finishing
        forecast is assumed to be in progress, so only what is left of it until its predicted
        finish counts; with something overdue, everything counts in full."""
        if self._late:
            return self.seconds
        heap, entries = self._heap, self._entries
        while heap and heap[0][1] not in entries:  # retired early
            heapq.heappop(heap)
        if not heap:
            return 0.0
        done_s, key = heap[0]
        prefill_s = entries[key][0]
        return self.seconds - prefill_s + min(prefill_s, max(done_s - now_s, 0.0))

    def expire(self, now_s: float) -> None:
        """Forecasts predicted done by ``now_s`` end, except those awaiting a reported first
        token, which become overdue."""
        heap, entries = self._heap, self._entries
        while heap and heap[0][0] <= now_s:
            _, key = heapq.heappop(heap)
            entry = entries.get(key)
            if entry is None:
                continue
            if entry[3]:
                self._late.add(key)
            else:
                del entries[key]
                self._drop(entry)


class BackendSpeed:
    """Per-backend speed factors relative to the fleet's median (1: as the median)."""

    __slots__ = ("_band", "_decay", "_factors", "_max", "_median", "_memory_s", "_min_requests",
                 "_stale", "_sums")

    # First tokens between two recomputations of the fleet's median: one backend's ratio moves
    # it little, and with 64 backends a sort per first token cost ~9 us against ~2 us.
    MEDIAN_EVERY = 8

    def __init__(self, window: int, min_requests: int, band_ratio: float,
                 max_ratio: float, memory_s: float) -> None:
        self._decay = 1.0 - 1.0 / window
        self._min_requests = min_requests
        self._band = band_ratio
        self._max = max_ratio
        self._memory_s = memory_s
        # backend -> [predicted sum, observed sum, first tokens seen, last one's time]
        self._sums: dict[BackendId, list[float]] = {}
        self._factors: dict[BackendId, float] = {}  # only backends whose factor is not 1
        self._median = 0.0  # the reference ratio (0: fewer than two backends heard from)
        self._stale = 0  # first tokens since the median was computed

    def factor(self, backend_id: BackendId, now_s: float) -> float:
        """``backend_id``'s factor at ``now_s``. One that has taught nothing for ``memory_s``
        is forgotten (1 again): a backend priced as slow gets little work and so few first
        tokens, and without this one that recovered would stay priced as slow; forgotten, it
        is offered work again, and its next first token says which it is."""
        factor = self._factors.get(backend_id)
        if factor is None:
            return 1.0
        if now_s - self._sums[backend_id][3] > self._memory_s:
            self.remove_backend(backend_id)
            return 1.0
        return factor

    def factors(self) -> dict[BackendId, float]:
        """The factors that are not 1 (for tests)."""
        return dict(self._factors)

    def heard(self, now_s: float) -> dict[BackendId, float]:
        """Every backend with ``min_requests`` first tokens and its factor at ``now_s`` (the
        router's ``kvrouter_backend_speed_factor``)."""
        out = {}
        for backend_id in list(self._sums):
            factor = self.factor(backend_id, now_s)  # (may forget it)
            sums = self._sums.get(backend_id)
            if sums is not None and sums[2] >= self._min_requests:
                out[backend_id] = factor
        return out

    def observe(self, backend_id: BackendId, predicted_s: float, observed_s: float,
                now_s: float) -> None:
        """One first token on ``backend_id`` at ``now_s``: ``observed_s`` after its dispatch,
        predicted ``predicted_s`` at the cost model's speed. Non-positive or non-finite times
        (a clock step, a prediction of 0) are ignored."""
        if not (0.0 < predicted_s < float("inf") and 0.0 <= observed_s < float("inf")):
            return
        sums = self._sums.get(backend_id)
        if sums is None:
            sums = self._sums[backend_id] = [0.0, 0.0, 0.0, now_s]
        decay = self._decay
        sums[0] = sums[0] * decay + predicted_s
        sums[1] = sums[1] * decay + observed_s
        sums[2] += 1
        sums[3] = now_s
        if sums[2] < self._min_requests:
            return
        self._stale += 1
        if sums[2] == self._min_requests or self._stale >= self.MEDIAN_EVERY:
            self._refresh()  # a backend joins the comparison, or the median is due
        elif self._median > 0.0:
            self._set(backend_id, sums[1] / sums[0] / self._median)

    def _refresh(self) -> None:
        ratios = {b: s[1] / s[0] for b, s in self._sums.items() if s[2] >= self._min_requests}
        self._factors = {}
        self._stale = 0
        self._median = 0.0
        if len(ratios) < 2:
            return
        # The lower median: with two backends, the faster one is the reference.
        self._median = sorted(ratios.values())[(len(ratios) - 1) // 2]
        if self._median <= 0.0:
            return
        for backend_id, ratio in ratios.items():
            self._set(backend_id, ratio / self._median)

    def _set(self, backend_id: BackendId, factor: float) -> None:
        band, top = self._band, self._max
        clipped = 1.0 if 1.0 / band <= factor <= band else min(max(factor, 1.0 / top), top)
        if clipped != 1.0:  # (inside the band, or max_ratio 1: off)
            self._factors[backend_id] = clipped
        else:
            self._factors.pop(backend_id, None)

    def remove_backend(self, backend_id: BackendId) -> None:
        if self._sums.pop(backend_id, None) is not None:
            self._refresh()
