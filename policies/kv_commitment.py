"""KV memory a policy has committed on each backend, for late binding (``Policy.defer``).

A backend's committed tokens are what the requests this policy sent there and that have not
finished will hold in KV memory: their uncached prompt tokens plus their output, counted up to
``output_cap_tokens`` each (a long answer grows into blocks others free as it goes). Cached
prefix blocks are not counted: they are shared and already resident.

``has_room(backend, prompt_tokens, ratio)`` is the late-binding test: a backend with nothing
committed, or whose KV size is unknown, always has room (a prompt larger than the ratio still
gets an empty backend); otherwise committed + prompt must stay within ``ratio`` of its KV
memory. An engine admits whatever fits at the instant and preempts (recomputes whole prompts)
when decodes outgrow its memory; holding the excess in the router instead places it when a
backend has room, on fresher cache state.

Pure: no clock, I/O or randomness. O(1) per call.
"""

from __future__ import annotations

from policies.types import BackendId, BackendState

__all__ = ["KvCommitment"]


class KvCommitment:
    def __init__(self, output_cap_tokens: int) -> None:
        self.output_cap_tokens = output_cap_tokens
        self._tokens: dict[BackendId, float] = {}

    def tokens(self, uncached_tokens: float, max_tokens: int) -> float:
        """What one request commits."""
        return uncached_tokens + min(max_tokens, self.output_cap_tokens)

    def add(self, backend_id: BackendId, tokens: float) -> None:
        self._tokens[backend_id] = self._tokens.get(backend_id, 0.0) + tokens

    def remove(self, backend_id: BackendId, tokens: float) -> None:
        if backend_id in self._tokens:
            left = self._tokens[backend_id] - tokens
            self._tokens[backend_id] = left if left > 0.5 else 0.0  # no float drift

    def committed(self, backend_id: BackendId) -> float:
        return self._tokens.get(backend_id, 0.0)

    def has_room(self, backend: BackendState, prompt_tokens: int, block_size: int,
                 ratio: float) -> bool:
        if not backend.total_kv_blocks:
            return True
        committed = self._tokens.get(backend.backend_id, 0.0)
        return committed <= 0 or (
            committed + prompt_tokens <= ratio * backend.total_kv_blocks * block_size)

    def remove_backend(self, backend_id: BackendId) -> None:
        self._tokens.pop(backend_id, None)
