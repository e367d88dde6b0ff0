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
Pure; must not import anything outside the standard library.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

__all__ = ["PendingPrefill", "PrefillCost"]


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
