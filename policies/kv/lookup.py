"""``MatchOnce``: a read-only view of a prefix index that matches one request's chain once.

A decision that asks its inner policy more than once for one request (the P/D decider scores
prefill on the PREFILL side, then local prefill on the DECODE side) would walk the index once
per ask for the same answer. Wrapping the view's index in ``MatchOnce`` for the decision keeps
the last chain's answer: same chain (by identity; a request's ``block_hashes`` tuple is built
once) and same time, same answer. Pure; imports only ``policies.types``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from policies.types import BackendId, BackendMatch, BlockHash, PrefixLookup

__all__ = ["MatchOnce"]


class MatchOnce:
    __slots__ = ("_found", "_index", "_key")

    def __init__(self, index: PrefixLookup) -> None:
        self._index = index
        self._key: tuple[int, float | None] | None = None
        self._found: Mapping[BackendId, BackendMatch] = {}

    def match(
        self, block_hashes: Sequence[BlockHash], now_s: float | None = None
    ) -> Mapping[BackendId, BackendMatch]:
        key = (id(block_hashes), now_s)
        if key != self._key:
            self._found = self._index.match(block_hashes, now_s)
            self._key = key
        return self._found

    def backend_entries(self, backend_id: BackendId) -> int:
        return self._index.backend_entries(backend_id)

    def shared_prefix(self, block_hashes: Sequence[BlockHash]) -> int:
        return self._index.shared_prefix(block_hashes)
