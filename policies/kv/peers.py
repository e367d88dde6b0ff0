"""Replica peers' in-flight work as kv_aware shares and reads it (``policies.replica_sync``).

A replica's kv_aware keeps two kinds of bookkeeping about its own requests in flight: the
prefill it predicts is still queued on each backend (``PendingPrefill``) and the KV memory
they will hold there (``KvCommitment``). Its ``shared_state`` turns both into numbers per
backend, once per sync window; a peer stores the latest numbers of each replica
(``PeerWork.update``) and adds them to its own when it scores. Per backend, in this order
(``FIELDS``):

    remaining_s       prefill seconds still queued, at the cost model's speed
    overdue           1 when some of it is past its predicted time (then all of it counts)
    new_tokens        their uncached tokens
    prompt_tokens     their prompt tokens (kv_aware scales its queue down to what is still
                      in flight there, and the view's in-flight tokens include the peers')
    mean_prefill_s    the moving averages that price an engine's own waiting requests
    mean_new_tokens
    committed_tokens  the KV tokens its requests there will hold (late binding: ``defer``)

Between two states a peer's queue drains at one second a second (a backend works through its
queue so), unless it was overdue. Pure: no clock, I/O or randomness.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from policies.types import BackendId, SharedState

__all__ = ["FIELDS", "PeerWork"]

FIELDS = ("remaining_s", "overdue", "new_tokens", "prompt_tokens", "mean_prefill_s",
          "mean_new_tokens", "committed_tokens")


class PeerWork:
    """Each peer's latest work per backend, and their sums."""

    def __init__(self) -> None:
        # origin -> (when its state arrived, backend -> its numbers)
        self._states: dict[str, tuple[float, dict[BackendId, tuple[float, ...]]]] = {}

    def __bool__(self) -> bool:
        return bool(self._states)

    def update(self, origin: str, state: SharedState | None,
               now_s: float) -> dict[BackendId, float]:
        """Store ``origin``'s state (None: forget it); returns the peers' committed tokens per
        backend. Raises ValueError, storing nothing, on a state not laid out as ``FIELDS``."""
        if state is None:
            self._states.pop(origin, None)
        else:
            self._states[origin] = (now_s, _checked(state))
        committed: dict[BackendId, float] = {}
        for _at, work in self._states.values():
            for backend_id, numbers in work.items():
                committed[backend_id] = committed.get(backend_id, 0.0) + numbers[6]
        return committed

    def pending(self, backend_id: BackendId, now_s: float) -> tuple[float, float, float] | None:
        """The peers' (prefill seconds, new tokens, prompt tokens) queued on ``backend_id``
        now, or None when no peer has any there."""
        found = False
        seconds = new_tokens = prompt_tokens = 0.0
        for at_s, work in self._states.values():
            numbers = work.get(backend_id)
            if numbers is None or not numbers[3]:
                continue
            found = True
            left = numbers[0] if numbers[1] else max(numbers[0] - (now_s - at_s), 0.0)
            seconds += left
            new_tokens += numbers[2]
            prompt_tokens += numbers[3]
        return (seconds, new_tokens, prompt_tokens) if found else None

    def has_work(self, backend_id: BackendId) -> bool:
        """Whether some peer has requests in flight on ``backend_id``."""
        return any(backend_id in work for _at, work in self._states.values())

    def means(self, backend_id: BackendId) -> tuple[float, float] | None:
        """A peer's (mean prefill seconds, mean new tokens) on ``backend_id``, if any has them."""
        for _at, work in self._states.values():
            numbers = work.get(backend_id)
            if numbers is not None and numbers[5]:
                return numbers[4], numbers[5]
        return None

    def remove_backend(self, backend_id: BackendId) -> None:
        for _at, work in self._states.values():
            work.pop(backend_id, None)


def _checked(state: SharedState) -> dict[BackendId, tuple[float, ...]]:
    if not isinstance(state, Mapping):
        raise ValueError("kv_aware shared state: expected a map of backend -> numbers")
    out: dict[BackendId, tuple[float, ...]] = {}
    for backend_id, raw in state.items():
        if not isinstance(backend_id, str) or not isinstance(raw, list | tuple) or len(
                raw) != len(FIELDS):
            raise ValueError(f"kv_aware shared state: {backend_id!r}: expected "
                             f"{len(FIELDS)} numbers ({', '.join(FIELDS)})")
        numbers = tuple(float(x) if isinstance(x, int | float) and not isinstance(x, bool)
                        else math.nan for x in raw)
        if not all(math.isfinite(x) and x >= 0 for x in numbers):
            raise ValueError(f"kv_aware shared state: {backend_id!r}: expected finite numbers "
                             f">= 0, got {list(raw)!r}")
        out[backend_id] = numbers
    return out
