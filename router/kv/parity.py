"""Token parity: do the engine's stored blocks equal the blocks the router computed?

A router that renders a chat template or tokenizes differently from the engine still routes,
but every predicted hit is wrong and nobody notices. This module notices. The analyzer notes
each exactly-tokenized, unsalted request's router block hashes (``note``); when the request is
dispatched (``ParityPolicy.on_dispatched``) they become *expectations* of that backend for
``ttl_s``. Each ``BlockStored`` the index applies comes back with the router hashes the index
computed from the engine's own token ids (``observe``):

- a block is *predicted to be a prompt block* when the block before it is a live expectation's
  block with a successor in that prompt, or when it starts a sequence (no parent) while the
  backend has live expectations; a predicted block that no live expectation holds is a
  mismatch (a wrong template, a doubled BOS, a different tokenizer...);
- anything else (the continuation of a sequence whose parent is unknown here, blocks of
  generated tokens past a prompt's end) is not evidence either way and is ignored.

Mismatches are counted per model (``kvrouter_token_parity_mismatch_total``) and logged once per
model. Traffic reaching a backend around the router can make a sequence's first block look like a
mismatch; the counter of checked blocks puts the number in proportion. Salted requests are not
noted: engine events carry no salt, so the index hashes them unsalted.

Only backends whose events the router subscribes to are *watched* (``watch``): expectations
of any other backend could never be checked, and keeping them cost ~5% of kv_aware's CPU in
approximate mode (py-spy at concurrency 32: ~330 dict updates per request for a 83-block
prompt, and as many again at expiry). With no backend watched, ``note`` keeps nothing either.

Must not import aiohttp, zmq or ``simulator``.
"""

from __future__ import annotations

import logging
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from policies.base import PolicyWrapper
from policies.kv.events import BlockStored
from policies.types import (
    BackendId,
    BlockHash,
    ClusterView,
    Decision,
    Policy,
    RouteRequest,
)
from router.kv.metrics import KvMetrics

__all__ = ["ParityPolicy", "TokenParity"]

log = logging.getLogger("kvrouter.parity")


@dataclass(slots=True, eq=False)
class _Expectation:
    model: str
    hashes: tuple[BlockHash, ...]
    expires_s: float


@dataclass(slots=True)
class _Backend:
    held: dict[BlockHash, int] = field(default_factory=dict)
    """Router block hash -> live expectations holding it."""
    followed: dict[BlockHash, int] = field(default_factory=dict)
    """Router block hash -> live expectations with a prompt block right after it."""
    live: deque[_Expectation] = field(default_factory=deque)


class TokenParity:
    def __init__(self, metrics: KvMetrics, *, ttl_s: float = 30.0, max_notes: int = 10_000,
                 max_blocks_per_backend: int = 500_000) -> None:
        self.metrics = metrics
        self.ttl_s = ttl_s
        self.max_notes = max_notes
        self.max_blocks = max_blocks_per_backend
        self._notes: OrderedDict[str, tuple[str, tuple[BlockHash, ...]]] = OrderedDict()
        self._backends: dict[BackendId, _Backend] = {}
        self._logged: set[str] = set()
        self._watched: set[BackendId] = set()
        self.checked_blocks = 0
        self.mismatched_blocks = 0

    def watch(self, backend_id: BackendId) -> None:
        """``backend_id``'s KV events are subscribed: its dispatches become expectations."""
        self._watched.add(backend_id)

    def note(self, request_id: str, model: str, hashes: tuple[BlockHash, ...]) -> None:
        """The analyzer vouches for these hashes (exact tokens, no salt)."""
        if not hashes or not self._watched:
            return
        self._notes[request_id] = (model, hashes)
        self._notes.move_to_end(request_id)
        while len(self._notes) > self.max_notes:
            self._notes.popitem(last=False)

    def dispatched(self, request_id: str, backend_id: BackendId, now_s: float) -> None:
        noted = self._notes.get(request_id)
        if noted is None or backend_id not in self._watched:
            return
        backend = self._backends.setdefault(backend_id, _Backend())
        self._expire(backend, now_s)
        expectation = _Expectation(noted[0], noted[1], now_s + self.ttl_s)
        backend.live.append(expectation)
        _adjust(backend, expectation, +1)
        while len(backend.held) > self.max_blocks and backend.live:
            _adjust(backend, backend.live.popleft(), -1)

    def observe(self, backend_id: BackendId, event: BlockStored,
                indexed: tuple[BlockHash, ...], now_s: float | None = None) -> None:
        """Check an applied BlockStored's router hashes against the backend's expectations.

        A block is *predicted to be a prompt block* when the block before it is a live
        expectation's block that has a successor in that prompt (or, for the first block of a
        sequence, when any expectation is live); such a block that no expectation holds is a
        mismatch. Without the parent's router hash, an event's first block is checked only
        when it starts a sequence.
        """
        backend = self._backends.get(backend_id)
        if backend is None or not indexed or not event.token_ids:
            return
        if now_s is not None:
            self._expire(backend, now_s)
        if not backend.live:
            return
        held, followed = backend.held, backend.followed
        checked = wrong = 0
        for i, h in enumerate(indexed):
            predicted = event.parent_block_hash is None if i == 0 else indexed[i - 1] in followed
            if predicted:
                checked += 1
                if h not in held:
                    wrong += 1
        if checked:
            self._count(backend.live[-1].model, checked, wrong)

    def remove_backend(self, backend_id: BackendId) -> None:
        """Forget ``backend_id`` and stop watching it (until ``watch`` again)."""
        self._backends.pop(backend_id, None)
        self._watched.discard(backend_id)

    def _count(self, model: str, checked: int, wrong: int) -> None:
        self.checked_blocks += checked
        self.mismatched_blocks += wrong
        self.metrics.parity_checked.labels(model).inc(checked)
        if wrong:
            self.metrics.parity_mismatch.labels(model).inc(wrong)
            if model not in self._logged:
                self._logged.add(model)
                log.warning(
                    "token parity: blocks the engine stored for model %r differ from the "
                    "router's for the same request; check that the router's tokenizer and chat "
                    "template are the engine's (kvrouter_token_parity_mismatch_total)", model)

    def _expire(self, backend: _Backend, now_s: float) -> None:
        while backend.live and backend.live[0].expires_s <= now_s:
            _adjust(backend, backend.live.popleft(), -1)


def _adjust(backend: _Backend, expectation: _Expectation, delta: int) -> None:
    hashes = expectation.hashes
    for table, keys in ((backend.held, hashes), (backend.followed, hashes[:-1])):
        for h in keys:
            n = table.get(h, 0) + delta
            if n > 0:
                table[h] = n
            else:
                table.pop(h, None)


class ParityPolicy(PolicyWrapper):
    """Wraps the routing policy to learn where each request went; decides nothing itself. A
    peer's requests are not this router's to check (their hashes were never noted here):
    the peer hooks pass through unnoted."""

    def __init__(self, inner: Policy, parity: TokenParity) -> None:
        super().__init__(inner)
        self.parity = parity

    # The per-request hooks are written out, not inherited: PolicyWrapper's run interpreted
    # (policies/base.py is not compiled), these compiled.
    def choose(self, request: RouteRequest, view: ClusterView) -> Decision:
        return self.inner.choose(request, view)

    def defer(self, request: RouteRequest, view: ClusterView) -> bool:
        return self.inner.defer(request, view)

    def on_dispatched(self, request: RouteRequest, decision: Decision, now_s: float) -> None:
        self.inner.on_dispatched(request, decision, now_s)
        self.parity.dispatched(request.request_id, decision.prefill_backend_id
                               or decision.backend_id, now_s)

    def on_first_token(self, request: RouteRequest, decision: Decision, now_s: float) -> None:
        self.inner.on_first_token(request, decision, now_s)

    def on_finished(self, request: RouteRequest, decision: Decision, now_s: float,
                    ok: bool) -> None:
        self.inner.on_finished(request, decision, now_s, ok)

    def on_backend_removed(self, backend_id: BackendId) -> None:
        self.inner.on_backend_removed(backend_id)
        self.parity.remove_backend(backend_id)
