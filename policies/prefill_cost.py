"""The prefill-time model the KV-aware policy uses to turn tokens into seconds.

Prefilling ``new`` tokens of a prompt whose first ``cached`` tokens already have KV costs

    linear_s_per_token * new + attention_s_per_token_pair * new * (new + cached)   seconds

(each new token passes through the weights once and attends to its whole context). Defaults
are the least-squares fit of full prefills of Llama-3.1-8B measured on one H200
(``/work/shared/calibration/README.md``: 29.3 us per token + 0.393 ns per token pair, ~0.25 s
for 8k tokens cold). Calibrate per fleet by refitting the two coefficients. Also the queue
of predicted prefill work per backend (``PendingPrefill``). Pure; must not import anything
outside the standard library.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

__all__ = ["PendingPrefill", "PrefillCost"]


@dataclass(frozen=True, slots=True)
class PrefillCost:
    linear_s_per_token: float = 29.3e-6
    attention_s_per_token_pair: float = 0.393e-9

    def __post_init__(self) -> None:
        if self.linear_s_per_token < 0 or self.attention_s_per_token_pair < 0:
            raise ValueError("prefill cost coefficients must be >= 0")

    def seconds(self, new_tokens: float, cached_tokens: float = 0.0) -> float:
        """Predicted time to prefill ``new_tokens`` after ``cached_tokens`` of cached context."""
        if new_tokens <= 0:
            return 0.0
        return new_tokens * (
            self.linear_s_per_token
            + self.attention_s_per_token_pair * (new_tokens + cached_tokens)
        )


class PendingPrefill:
    """The prefill work a policy sent one backend and predicts is not finished yet.

    Each dispatch adds its predicted prefill seconds until its predicted first-token time;
    ``expire(now_s)`` drops what should be done by then. Router-side in-flight counters cannot
    tell prefilling requests from decoding ones; this can. ``mean_prefill_s`` is a moving
    average over the last ``window`` dispatches, used to price the engine's own waiting
    requests. Amortised O(log n) per dispatch.
    """

    __slots__ = ("_heap", "_seq", "_window", "mean_prefill_s", "prompt_tokens", "seconds")

    def __init__(self, window: int) -> None:
        self._heap: list[tuple[float, int, float, int]] = []
        self._seq = 0
        self._window = window
        self.seconds = 0.0
        self.prompt_tokens = 0
        self.mean_prefill_s = 0.0

    def add(self, done_s: float, prefill_s: float, prompt_tokens: int) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (done_s, self._seq, prefill_s, prompt_tokens))
        self.seconds += prefill_s
        self.prompt_tokens += prompt_tokens
        weight = 1.0 / min(self._seq, self._window)
        self.mean_prefill_s += (prefill_s - self.mean_prefill_s) * weight

    def expire(self, now_s: float) -> None:
        heap = self._heap
        while heap and heap[0][0] <= now_s:
            _, _, prefill_s, prompt_tokens = heapq.heappop(heap)
            self.seconds -= prefill_s
            self.prompt_tokens -= prompt_tokens
        if not heap:  # no float drift left behind
            self.seconds = 0.0
            self.prompt_tokens = 0
