"""No-op defaults for the Policy hooks, so a policy writes only the hooks it needs, and the
capabilities a policy declares for the router's wiring (all off by default)."""

from __future__ import annotations

from typing import ClassVar

from policies.types import BackendId, ClusterView, Decision, Policy, RouteRequest, SharedState

__all__ = ["PolicyBase", "PolicyWrapper", "backend_speed_factors", "needs_prompt_text"]


class PolicyBase:
    name = "base"
    # Reads ``view.index`` (the prefix index fed by engines' KV events): the router builds the
    # KV plumbing (index, ingestion, tokenizers) for such a policy even without a ``kv_events``
    # section, instead of branching on the policy's name.
    uses_kv_index: ClassVar[bool] = False
    # Reads ``RouteRequest.prompt_text`` (character matching): replica sync ships each
    # dispatch's prompt text to the peers only for such a policy; for the others it is the
    # largest part of a dispatch message (a 32k-token prompt: ~128 KB per peer), never read.
    reads_prompt_text: ClassVar[bool] = False

    def defer(self, request: RouteRequest, view: ClusterView) -> bool:
        return False

    def on_dispatched(self, request: RouteRequest, decision: Decision, now_s: float) -> None:
        return None

    def on_first_token(self, request: RouteRequest, decision: Decision, now_s: float) -> None:
        return None

    def on_finished(
        self, request: RouteRequest, decision: Decision, now_s: float, ok: bool
    ) -> None:
        return None

    def on_backend_removed(self, backend_id: BackendId) -> None:
        return None

    # Replica sync (policies.replica_sync). By default every dispatch is shared and a peer's is
    # replayed as a dispatch: right for a policy whose dispatch record needs no finish (a
    # round-robin turn, a session's backend, a character tree), and such a policy shares no
    # state; peers' in-flight counts reach it in the view either way.

    def shares_dispatch(self, request: RouteRequest, decision: Decision, now_s: float) -> bool:
        return True

    def on_peer_dispatched(self, request: RouteRequest, decision: Decision, now_s: float) -> None:
        self.on_dispatched(request, decision, now_s)

    def shared_state(self, now_s: float) -> SharedState | None:
        return None

    def on_peer_state(self, origin: str, state: SharedState | None, now_s: float) -> None:
        return None


class PolicyWrapper(PolicyBase):
    """A policy around another (``inner``) that passes every hook through; a wrapper overrides
    only what it adds (the P/D decider, the token-parity check). It keeps ``inner``'s name so
    metrics labels do not move. New hooks are forwarded here, once, so no wrapper can swallow
    one by falling back to ``PolicyBase``'s no-op.

    This module is not compiled (interpreted policies subclass ``PolicyBase``, and an
    interpreted class cannot inherit from a compiled one), so a compiled wrapper runs what it
    inherits from here interpreted: it writes out the hooks every request calls (``choose``,
    ``defer``, ``on_dispatched``, ``on_first_token``, ``on_finished``) and inherits the rare
    ones (a backend removed, replica sync's). ``SyncedPolicy``, on every request of a synced
    replica, keeps its own class altogether."""

    def __init__(self, inner: Policy) -> None:
        self.inner = inner
        self.name = inner.name

    def choose(self, request: RouteRequest, view: ClusterView) -> Decision:
        return self.inner.choose(request, view)

    def defer(self, request: RouteRequest, view: ClusterView) -> bool:
        return self.inner.defer(request, view)

    def on_dispatched(self, request: RouteRequest, decision: Decision, now_s: float) -> None:
        self.inner.on_dispatched(request, decision, now_s)

    def on_first_token(self, request: RouteRequest, decision: Decision, now_s: float) -> None:
        self.inner.on_first_token(request, decision, now_s)

    def on_finished(
        self, request: RouteRequest, decision: Decision, now_s: float, ok: bool
    ) -> None:
        self.inner.on_finished(request, decision, now_s, ok)

    def on_backend_removed(self, backend_id: BackendId) -> None:
        self.inner.on_backend_removed(backend_id)

    def shares_dispatch(self, request: RouteRequest, decision: Decision, now_s: float) -> bool:
        return self.inner.shares_dispatch(request, decision, now_s)

    def on_peer_dispatched(self, request: RouteRequest, decision: Decision, now_s: float) -> None:
        self.inner.on_peer_dispatched(request, decision, now_s)

    def shared_state(self, now_s: float) -> SharedState | None:
        return self.inner.shared_state(now_s)

    def on_peer_state(self, origin: str, state: SharedState | None, now_s: float) -> None:
        self.inner.on_peer_state(origin, state, now_s)


def backend_speed_factors(policy: object, now_s: float) -> dict[BackendId, float]:
    """The speed factor ``policy``, or a policy it wraps (``inner``), has learned for each
    backend it has heard from (kv_aware: ``policies.prefill_cost.BackendSpeed``; 1: as fast as
    the fleet); empty for a policy that learns none."""
    while policy is not None:
        read = getattr(policy, "speed_factors", None)
        if callable(read):
            return dict(read(now_s))
        policy = getattr(policy, "inner", None)
    return {}


def needs_prompt_text(policy: object) -> bool:
    """Whether ``policy``, or a policy it wraps (``inner``, as the router's wrappers keep it),
    reads ``RouteRequest.prompt_text``. A policy that does not say (not a ``PolicyBase``) is
    assumed to."""
    while policy is not None:
        if not isinstance(policy, PolicyBase):
            return True
        if policy.reads_prompt_text:
            return True
        policy = getattr(policy, "inner", None)
    return False
