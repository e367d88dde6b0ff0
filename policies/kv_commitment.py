"""KV memory a policy has committed on each backend, for late binding (``Policy.defer``).

A backend's committed tokens are what the requests this policy sent there and that have not
finished will hold in its KV memory, each block counted once however many of them use it:

- uncached prompt blocks, by chained block hash, with a refcount per backend: a block's
  tokens are added when its first in-flight request is dispatched (refcount 0 -> 1) and
  removed when its last one finishes (1 -> 0). Requests of one group sent to one backend
  together share their prefix blocks in the engine (the first prefill stores them, the
  others hit them), so counting the prefix once per request over-stated the commitment by
  the group's size and held requests no engine would have preempted;
- per request: the partial last block (prompt tokens past ``len(block_hashes) *
  block_size``: an engine never shares a block that is not full) and the output, counted up
  to ``output_cap_tokens`` (a long answer grows into blocks others free as it goes);
- a request without block hashes commits its uncached tokens alone, as the whole prompt's
  worth of memory nobody else can share.

Cached prefix blocks (the predicted hit) are not counted: they are shared and already
resident. The uncached blocks are the trailing ones after the hit; a hit priced in part
(lower tiers count at what loading saves, ``kv_aware``'s ``tier_pricing``) ends inside a
block, which counts for its uncached share only, so a request alone on a backend commits
exactly ``uncached_tokens`` + its output. A block keeps the tokens it was added with until
its refcount drops to 0, and each request keeps the blocks and tokens it committed, so a
finish removes exactly what its dispatch added whatever was sent or finished in between.

``has_room(backend, prompt_tokens, ratio)`` is the late-binding test: a backend with nothing
committed, or whose KV size is unknown, always has room (a prompt larger than the ratio still
gets an empty backend); otherwise committed + prompt must stay within ``ratio`` of its KV
memory. An engine admits whatever fits at the instant and preempts (recomputes whole prompts)
when decodes outgrow its memory; holding the excess in the router instead places it when a
backend has room, on fresher cache state.

Replica peers' commitments (``set_peers``: each backend's tokens over the peers' latest shared
states) count in ``committed`` and ``has_room`` beside this policy's own. They are sums, so a
prefix a peer committed on the same backend is not deduplicated against this policy's blocks
(``policies.replica_sync``); ``in_flight_blocks`` and ``in_flight_prefix_blocks`` are this
policy's own requests only.

Pure: no clock, I/O or randomness. ``add`` and ``remove`` cost O(uncached blocks) (plus the
requests in flight under one request id, normally one); ``has_room`` and ``committed`` O(1).
"""

from __future__ import annotations

import math

from policies.types import BackendId, BackendState, BlockHash, value_type

__all__ = ["KvCommitment"]

_ROUNDING_TOKENS = 1e-6  # float slack when a priced hit lands on a block boundary


@value_type  # built per request: a frozen dataclass's init is ~7x slower
class _Held:
    """What one request committed on one backend, removed as it was added."""

    block_hashes: tuple[BlockHash, ...]  # the request's whole chain, to tell requests apart
    blocks: tuple[BlockHash, ...]  # its uncached blocks (a slice of the chain)
    first_tokens: float  # tokens of blocks[0]: less than a block when the hit ends inside it
    block_size: int
    own_tokens: float  # partial last block + output (or the whole uncached prompt, unhashed)


class KvCommitment:
    def __init__(self, output_cap_tokens: int) -> None:
        self.output_cap_tokens = output_cap_tokens
        self._tokens: dict[BackendId, float] = {}
        # Per backend: block -> in-flight requests that committed it (plain ints: this runs
        # for every uncached block of every request, so no object per block), and the tokens
        # of the few blocks added as partly hit (the others count a whole block).
        self._refs: dict[BackendId, dict[BlockHash, int]] = {}
        self._partial: dict[BackendId, dict[BlockHash, float]] = {}
        self._held: dict[BackendId, dict[str, list[_Held]]] = {}
        self._peers: dict[BackendId, float] = {}  # replica peers' committed tokens

    def set_peers(self, tokens: dict[BackendId, float]) -> None:
        """Replica peers' committed tokens per backend, replacing the previous sums."""
        self._peers = tokens

    def own_committed(self, backend_id: BackendId) -> float:
        """This policy's own committed tokens on ``backend_id``: what it shares with peers."""
        return self._tokens.get(backend_id, 0.0)

    def _commit(self, block_hashes: tuple[BlockHash, ...], block_size: int, prompt_tokens: int,
                uncached_tokens: float, max_tokens: int) -> _Held:
        output = float(min(max_tokens, self.output_cap_tokens))
        if not block_hashes or block_size <= 0:
            return _Held(block_hashes, (), 0.0, block_size, uncached_tokens + output)
        hashed = len(block_hashes) * block_size
        tail = float(max(prompt_tokens - hashed, 0))
        if uncached_tokens <= tail:  # every block hit (a hot prompt): what the rest computes
            return _Held(block_hashes, (), float(block_size), block_size, tail + output)
        uncached = min(max(uncached_tokens - tail, 0.0), float(hashed))
        count = max(math.ceil((uncached - _ROUNDING_TOKENS) / block_size), 0)
        first = min(max(uncached - (count - 1) * block_size, 0.0), float(block_size))
        return _Held(block_hashes, block_hashes[len(block_hashes) - count:], first, block_size,
                     tail + output)

    def add(self, backend_id: BackendId, request_id: str, block_hashes: tuple[BlockHash, ...],
            block_size: int, prompt_tokens: int, uncached_tokens: float, max_tokens: int) -> None:
        """Commit one dispatched request: ``prompt_tokens`` and ``uncached_tokens`` as the
        policy predicted them on ``backend_id`` (the hit is the rest)."""
        held = self._commit(block_hashes, block_size, prompt_tokens, uncached_tokens, max_tokens)
        self._held.setdefault(backend_id, {}).setdefault(request_id, []).append(held)
        added = held.own_tokens
        blocks = held.blocks
        if blocks:
            refs = self._refs.setdefault(backend_id, {})
            whole = float(held.block_size)
            for block_hash in blocks:
                n = refs.get(block_hash)
                if n is None:
                    refs[block_hash] = 1
                    added += whole
                else:
                    refs[block_hash] = n + 1
            if held.first_tokens != whole and refs[blocks[0]] == 1:  # new and partly hit
                added += held.first_tokens - whole
                self._partial.setdefault(backend_id, {})[blocks[0]] = held.first_tokens
        self._tokens[backend_id] = self._tokens.get(backend_id, 0.0) + added

    def remove(self, backend_id: BackendId, request_id: str,
               block_hashes: tuple[BlockHash, ...]) -> None:
        """Release what ``add`` committed for this request there (nothing if it committed
        nothing, or the backend was removed since)."""
        by_request = self._held.get(backend_id)
        pending = by_request.get(request_id) if by_request is not None else None
        if not pending or by_request is None:
            return
        # Request ids come from clients and may repeat: take the one with these blocks.
        held = pending.pop(0 if len(pending) == 1 else next(
            (i for i, h in enumerate(pending) if h.block_hashes == block_hashes), 0))
        if not pending:
            del by_request[request_id]
        removed = held.own_tokens
        if held.blocks:
            refs = self._refs[backend_id]
            partial = self._partial.get(backend_id)
            whole = float(held.block_size)
            for block_hash in held.blocks:
                n = refs[block_hash] - 1
                if n:
                    refs[block_hash] = n
                    continue
                del refs[block_hash]
                removed += partial.pop(block_hash, whole) if partial else whole
        left = self._tokens[backend_id] - removed
        self._tokens[backend_id] = left if left > 0.5 and by_request else 0.0  # no float drift

    def in_flight_blocks(self, backend_id: BackendId) -> int:
        """Distinct prompt blocks of the requests in flight on ``backend_id``, cached or not:
        what they hold in its KV memory once admitted. O(their blocks)."""
        by_request = self._held.get(backend_id)
        if not by_request:
            return 0
        blocks: set[BlockHash] = set()
        for pending in by_request.values():
            for held in pending:
                blocks.update(held.block_hashes)
        return len(blocks)

    def in_flight_prefix_blocks(self, backend_id: BackendId,
                                block_hashes: tuple[BlockHash, ...]) -> int:
        """The most leading blocks of ``block_hashes`` some request in flight on ``backend_id``
        also holds: blocks the engine already has in use, which admitting this request does
        not take from its free KV. Chains are prefix-closed (a block's hash covers its whole
        prefix), so one request's shared length is found by bisection."""
        by_request = self._held.get(backend_id)
        if not by_request or not block_hashes:
            return 0
        best = 0
        for pending in by_request.values():
            for held in pending:
                other = held.block_hashes
                n = min(len(other), len(block_hashes))
                if n <= best or other[best] != block_hashes[best]:
                    continue  # shares no more than the best so far
                lo, hi = best + 1, n  # the first lo blocks are shared, at most hi
                while lo < hi:
                    mid = (lo + hi + 1) // 2
                    if other[mid - 1] == block_hashes[mid - 1]:
                        lo = mid
                    else:
                        hi = mid - 1
                best = lo
        return best

    def committed(self, backend_id: BackendId) -> float:
        """This policy's and its replica peers' committed tokens on ``backend_id``."""
        return self._tokens.get(backend_id, 0.0) + self._peers.get(backend_id, 0.0)

    def has_room_at_any_ratio(self, backend: BackendState) -> bool:
        """``has_room`` whatever the prompt and ratio: the backend's KV size is unknown, or
        nothing is committed there (an empty backend admits anything it can hold at all)."""
        return not backend.total_kv_blocks or self.committed(backend.backend_id) <= 0

    def has_room(self, backend: BackendState, prompt_tokens: int, block_size: int,
                 ratio: float) -> bool:
        if self.has_room_at_any_ratio(backend):
            return True
        total_blocks = backend.total_kv_blocks or 0  # known, or there was room above
        return (self.committed(backend.backend_id) + prompt_tokens
                <= ratio * total_blocks * block_size)

    def remove_backend(self, backend_id: BackendId) -> None:
        self._tokens.pop(backend_id, None)
        self._refs.pop(backend_id, None)
        self._partial.pop(backend_id, None)
        self._held.pop(backend_id, None)
        self._peers.pop(backend_id, None)
