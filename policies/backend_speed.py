"""Each backend's speed against the fleet, learned from its first tokens.

kv_aware predicts time with one cost model for every backend. A backend slower than the model
(a throttled or older GPU, a noisy neighbour, a smaller tensor-parallel group in a mixed fleet)
then looks as fast as the others whenever its forecasts are not overdue: its queue is priced in
the model's seconds, and each request it finishes invites the next one at the model's speed.
Forecasts that end at reported first tokens (``policies.prefill_cost``) keep it from looking
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

Pure: times come from the caller. Cost: O(1) per first token, plus a median over the backends
heard from (a sort of a few floats) when a ratio changes; a lookup per score. Must not import
anything outside the standard library and ``policies.types``.
"""

from __future__ import annotations

from policies.types import BackendId

__all__ = ["BackendSpeed"]


class BackendSpeed:
    """Per-backend speed factors relative to the fleet's median (1: as the median)."""

    __slots__ = ("_band", "_decay", "_factors", "_max", "_memory_s", "_min_requests", "_sums")

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
        """The factors that are not 1 (for ``/debug`` and tests)."""
        return dict(self._factors)

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
        if sums[2] >= self._min_requests:
            self._refresh()

    def _refresh(self) -> None:
        ratios = {b: s[1] / s[0] for b, s in self._sums.items() if s[2] >= self._min_requests}
        self._factors = {}
        if len(ratios) < 2:
            return
        # The lower median: with two backends, the faster one is the reference.
        median = sorted(ratios.values())[(len(ratios) - 1) // 2]
        if median <= 0.0:
            return
        band, top = self._band, self._max
        for backend_id, ratio in ratios.items():
            factor = ratio / median
            if 1.0 / band <= factor <= band:
                continue
            clipped = min(max(factor, 1.0 / top), top)
            if clipped != 1.0:  # (max_ratio 1: off)
                self._factors[backend_id] = clipped

    def remove_backend(self, backend_id: BackendId) -> None:
        if self._sums.pop(backend_id, None) is not None:
            self._refresh()
