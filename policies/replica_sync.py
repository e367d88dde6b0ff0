"""Replica sync: what router replicas tell each other so that they route as one router.

Every replica of a scaled-out router (several pods behind a Service, or several processes in
one pod) sees only its own requests. Its in-flight counts, its policy's pending prefill work,
its cold-prefix placement and its approximate-mode record then cover a share of the fleet's
traffic, and replicas herd onto the backend that looks idle to each of them. The shared KV
index does not fix that: engine events say what is cached, not what is on its way.

Load travels as state, records as operations:

- ``State``: the sender's own work in flight, per backend: its requests and their prompt
  tokens, and what its policy shares of its own bookkeeping (``Policy.shared_state``:
  kv_aware's pending prefill and KV commitment). Sent at the end of every flush window in
  which any of the sender's requests was dispatched, produced its first token or finished,
  and at every heartbeat. A receiver keeps each peer's latest and adds them up, so the cost
  is O(backends) a window whatever the request rate, and a lost one is healed by the next.
- ``Dispatch``: one request (prompt tokens, block hashes) and the policy's ``Decision``
  (backend, prefill backend, the chosen backend's ``Prediction``), slimmed to the scores of
  the backends it names. Sent only when the policy says the dispatch records something that
  outlives the request (``Policy.shares_dispatch``: a cold prefix's placement, an
  approximate-index entry, a round-robin turn); a peer replays it through
  ``Policy.on_peer_dispatched``. A hot prompt recorded moments ago sends none.

Why not every request's lifecycle (as this module did before): each replica then replayed
every peer request into its own policy, two messages each. That made every replica do the
fleet's bookkeeping, O(replicas x request rate) each, and it was a quarter of a worker's CPU
with two workers at concurrency 32 (bench/README.md, "State, not requests"). What sums lose:
- a prefix two replicas both committed on one backend counts once per replica (kv_aware
  dedupes KV commitments per block within a replica, not across them); in practice a
  replica's second request of a group hears of the first's dispatch and predicts its prefix
  as a hit, so it commits little;
- a peer's pending prefill between two of its states is aged at one second a second (a
  backend drains its queue so), except when the peer says part of it is overdue (then all of
  it counts, as it does there).

Bounded staleness: a peer not heard from for ``peer_timeout_s`` is dropped with its state.
Messages carry a per-sender sequence number (gaps count as drops) and the sender's clock
(``now - sent_at_s`` is the sync lag; exact in the simulator, clock skew included live).

Pure and synchronous: time comes in as ``now_s``; no I/O, clock or randomness. The wire
format and transport live in ``router.sync``; the simulator delivers these objects directly.
Cost: a dispatch O(1) plus the policy's hooks; a state O(peers x backends) to apply;
``overlay`` O(candidates).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from operator import attrgetter

from policies.types import (
    BackendId,
    BackendScore,
    BackendState,
    ClusterView,
    Decision,
    Policy,
    RouteRequest,
    SharedState,
    value_type,
)

__all__ = [
    "Dispatch",
    "Message",
    "PeerStats",
    "ReplicaSync",
    "State",
    "SyncParams",
    "SyncedPolicy",
    "slim_decision",
]


@dataclass(frozen=True, slots=True)
class SyncParams:
    peer_timeout_s: float = 5.0  # a peer silent this long is dropped with its in-flight share
    heartbeat_interval_s: float = 1.0  # how often a replica says it is alive (with its state)

    def __post_init__(self) -> None:
        if self.heartbeat_interval_s <= 0 or self.peer_timeout_s <= self.heartbeat_interval_s:
            raise ValueError("heartbeat_interval_s must be > 0 and peer_timeout_s > heartbeat_interval_s")


@value_type
class Dispatch:
    origin: str  # the sending replica (unique per process start)
    seq: int  # the sender's message number: a gap means messages were lost
    sent_at_s: float
    request_seq: int  # the sender's dispatch number
    request: RouteRequest
    decision: Decision


@value_type
class State:
    origin: str
    seq: int
    sent_at_s: float
    dispatches: int  # the sender's dispatches so far, shared or not
    # the sender's own requests in flight: (backend, requests, prompt tokens)
    load: tuple[tuple[BackendId, int, int], ...] = ()
    # what the sender's policy shares of its own bookkeeping (Policy.shared_state)
    shared: SharedState | None = None


Message = Dispatch | State
"""Messages are ``value_type`` (immutable to the type checker, plain slotted classes at run
time): a frozen dataclass's ``__init__`` sets each field through ``object.__setattr__``."""

# A candidate's fields in order, read in one C call: ``overlay`` rebuilds a candidate with two
# counters changed in 0.6 us, against 2.1 us through ``dataclasses.replace``.
_BACKEND_FIELDS = tuple(f.name for f in dataclasses.fields(BackendState))
_BACKEND_VALUES = attrgetter(*_BACKEND_FIELDS)
_IN_FLIGHT_AT = _BACKEND_FIELDS.index("in_flight_requests")
_IN_FLIGHT_TOKENS_AT = _BACKEND_FIELDS.index("in_flight_prompt_tokens")
_VIEW_FIELDS = tuple(f.name for f in dataclasses.fields(ClusterView))
_VIEW_VALUES = attrgetter(*_VIEW_FIELDS)
_BACKENDS_AT = _VIEW_FIELDS.index("backends")


def slim_decision(decision: Decision) -> Decision:
    """The decision with only the scores of the backends it names, without their ``terms``:
    what a peer's hooks read (the predictions), without one score per candidate and a dozen
    explanatory terms each on the wire (they were a third of a dispatch's bytes). Built with
    the constructors, not ``dataclasses.replace``."""
    named = (decision.backend_id, decision.prefill_backend_id)
    kept = tuple(BackendScore(backend_id=s.backend_id, score=s.score,
                              matched_tokens=s.matched_tokens, prediction=s.prediction,
                              decode=s.decode)
                 for s in decision.scores if s.backend_id in named)
    return Decision(backend_id=decision.backend_id, reason=decision.reason,
                    predicted_hit_tokens=decision.predicted_hit_tokens,
                    prefill_backend_id=decision.prefill_backend_id, scores=kept)


@dataclass(slots=True)
class PeerStats:
    """What one replica knows about one peer (for metrics and results)."""

    last_seen_s: float
    next_seq: int = 0
    received: int = 0
    dropped: int = 0  # messages lost in transit (sequence gaps)
    lag_s: float = 0.0  # receive time - send time of the latest message
    # its requests in flight per backend as its latest State said: [requests, prompt tokens]
    load: dict[BackendId, tuple[int, int]] = dataclasses.field(default_factory=dict)


class ReplicaSync:
    """One replica's side: stamps its own work into messages, applies its peers'."""

    def __init__(self, origin: str, policy: Policy, params: SyncParams | None = None) -> None:
        self.origin = origin
        self.policy = policy
        self.params = params or SyncParams()
        self._seq = 0
        self._dispatches = 0
        # (request id, backend) -> prompt tokens of each such request in flight (request ids
        # come from clients and may repeat)
        self._own: dict[tuple[str, BackendId], list[int]] = {}
        self._own_load: dict[BackendId, list[int]] = {}  # [requests, prompt tokens]
        self.changed = False  # own work changed since the last State
        self._outbox: list[Message] = []  # this window's dispatches to share
        self._window_open = False  # a flush is due: the transport will call flush()
        self.peers: dict[str, PeerStats] = {}
        # Peers' in-flight load per backend, summed over their latest states.
        self._load: dict[BackendId, tuple[int, int]] = {}
        self.load_version = 0  # bumped by every change of _load (SyncedPolicy's view memo)
        self.peers_expired = 0

    # ---- own work -> messages -----------------------------------------------------------------

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def dispatched(self, request: RouteRequest, decision: Decision, now_s: float,
                   share: bool = True) -> Dispatch | None:
        """Count one own dispatch in the next State; the Dispatch to send when ``share``
        (``SyncedPolicy`` queues it in the window)."""
        self._dispatches += 1
        tokens = request.prompt_tokens
        self._own.setdefault((request.request_id, decision.backend_id), []).append(tokens)
        load = self._own_load.get(decision.backend_id)
        if load is None:
            load = self._own_load[decision.backend_id] = [0, 0]
        load[0] += 1
        load[1] += tokens
        self.changed = True
        if not share:
            return None
        return Dispatch(self.origin, self._next_seq(), now_s, self._dispatches, request,
                        slim_decision(decision))

    def finished(self, request: RouteRequest, decision: Decision) -> None:
        key = (request.request_id, decision.backend_id)
        held = self._own.get(key)
        if not held:
            return
        tokens = held.pop()
        if not held:
            del self._own[key]
        load = self._own_load[decision.backend_id]
        load[0] -= 1
        load[1] -= tokens
        if not load[0]:
            del self._own_load[decision.backend_id]
        self.changed = True

    # ---- the flush window: what the transport sends, and when --------------------------------------
    #
    # Messages leave in windows: the first change to this replica's own work (a dispatch, a
    # first token, a finish) or a heartbeat opens one, the transport calls ``flush`` when it
    # ends (``sync.flush_interval_s`` live, ``sync_flush_s`` in the simulator), and the window
    # leaves as one batch: its shared dispatches, then one State if own work changed. The
    # live service and the simulator share this bookkeeping; they differ only in how they
    # wait and deliver.

    def queue(self, message: Message) -> bool:
        """Add ``message`` to the window; True when that opened it (schedule ``flush``)."""
        self._outbox.append(message)
        return self.open_window()

    def open_window(self) -> bool:
        """True when no window was open: the caller must schedule ``flush``."""
        if self._window_open:
            return False
        self._window_open = True
        return True

    def heartbeat(self) -> bool:
        """A State is due (liveness; it also heals a lost one): True when a window opened."""
        self.changed = True
        return self.open_window()

    def flush(self, now_s: float) -> list[Message]:
        """End the window: its dispatches, then this replica's State if its work changed
        (after them: the State counts them)."""
        self._window_open = False
        batch, self._outbox = self._outbox, []
        if self.changed:
            batch.append(self.state(now_s))
        return batch

    def state(self, now_s: float) -> State:
        """This replica's own work now; the policy's share is asked only here, once a window."""
        self.changed = False
        load = tuple((b, x[0], x[1]) for b, x in self._own_load.items())
        return State(self.origin, self._next_seq(), now_s, self._dispatches, load,
                     self.policy.shared_state(now_s))

    # ---- peers' messages -> load and policy -------------------------------------------------------

    def receive(self, message: Message, now_s: float) -> None:
        if message.origin == self.origin:
            return  # our own, echoed back (a replica may subscribe to an address list with itself)
        peer = self.peers.get(message.origin)
        if peer is None:
            peer = self.peers[message.origin] = PeerStats(last_seen_s=now_s,
                                                          next_seq=message.seq)
        if message.seq > peer.next_seq:
            peer.dropped += message.seq - peer.next_seq
        peer.next_seq = max(peer.next_seq, message.seq + 1)
        peer.received += 1
        peer.last_seen_s = now_s
        peer.lag_s = now_s - message.sent_at_s
        if isinstance(message, Dispatch):
            self.policy.on_peer_dispatched(message.request, message.decision, now_s)
            return
        load = {b: (n, tokens) for b, n, tokens in message.load if n > 0}
        if load != peer.load:
            peer.load = load
            self._sum_load()
        self.policy.on_peer_state(message.origin, message.shared, now_s)

    def _sum_load(self) -> None:
        total: dict[BackendId, tuple[int, int]] = {}
        for peer in self.peers.values():
            for b, (n, tokens) in peer.load.items():
                held = total.get(b)
                total[b] = (n, tokens) if held is None else (held[0] + n, held[1] + tokens)
        self._load = total
        self.load_version += 1

    def expire(self, now_s: float) -> None:
        """Drop silent peers: their share leaves the view and the policy."""
        timeout_s = self.params.peer_timeout_s
        for origin in [o for o, s in self.peers.items() if now_s - s.last_seen_s > timeout_s]:
            del self.peers[origin]
            self.peers_expired += 1
            self._sum_load()
            self.policy.on_peer_state(origin, None, now_s)

    # ---- what policies see ------------------------------------------------------------------------

    def peer_load(self, backend_id: BackendId) -> tuple[int, int]:
        """Peers' in-flight (requests, prompt tokens) on ``backend_id``."""
        return self._load.get(backend_id, (0, 0))

    def peer_in_flight(self) -> int:
        return sum(load[0] for load in self._load.values())

    def overlay(self, backends: Iterable[BackendState]) -> tuple[BackendState, ...]:
        """The candidates with peers' in-flight work added to the router-side counters."""
        loads = self._load
        if not loads:
            return tuple(backends)
        out = []
        for b in backends:
            load = loads.get(b.backend_id)
            if load is not None:
                values = list(_BACKEND_VALUES(b))
                values[_IN_FLIGHT_AT] += load[0]
                values[_IN_FLIGHT_TOKENS_AT] += load[1]
                b = BackendState(*values)
            out.append(b)
        return tuple(out)

    def max_lag_s(self) -> float:
        return max((p.lag_s for p in self.peers.values()), default=0.0)

    def dropped(self) -> int:
        return sum(p.dropped for p in self.peers.values())


class SyncedPolicy:
    """A replica's policy as its proxy sees it: the inner policy over the fleet's in-flight
    view, queueing in ``sync``'s window the dispatches its peers must record and noting when
    its own work changed. ``window_opened`` tells the transport to call ``sync.flush`` at the
    window's end. Peers' messages go to ``sync.receive`` (never republished): a SyncedPolicy is
    outermost, and its peer hooks pass through to the inner policy.

    Not a ``PolicyWrapper``: that base lives in an interpreted module (``PolicyBase`` cannot be
    compiled, since interpreted policies subclass it, and mypyc forbids an interpreted class
    to inherit from a compiled one), and a compiled class that sets attributes over an
    interpreted base is built as a plain Python class with a ``__dict__``, and what it
    inherits runs interpreted. As its own class this one stays native on every request of a
    synced replica. ``test_policies_baseline`` checks it defines every hook.
    """

    def __init__(self, inner: Policy, sync: ReplicaSync,
                 window_opened: Callable[[], None] = lambda: None) -> None:
        self.inner = inner
        self.sync = sync
        self.window_opened = window_opened
        self.name = inner.name
        # The last view overlaid, and the load version it saw: the proxy asks defer and then
        # choose about the same view, and the overlay is the same while no peer state came.
        self._memo: tuple[ClusterView, int, ClusterView] | None = None

    def _view(self, view: ClusterView) -> ClusterView:
        sync = self.sync
        if not sync._load:
            return view
        memo = self._memo
        if memo is not None and memo[0] is view and memo[1] == sync.load_version:
            return memo[2]
        values = list(_VIEW_VALUES(view))
        values[_BACKENDS_AT] = sync.overlay(view.backends)
        overlaid = ClusterView(*values)
        self._memo = (view, sync.load_version, overlaid)
        return overlaid

    def choose(self, request: RouteRequest, view: ClusterView) -> Decision:
        return self.inner.choose(request, self._view(view))

    def defer(self, request: RouteRequest, view: ClusterView) -> bool:
        return self.inner.defer(request, self._view(view))

    def on_dispatched(self, request: RouteRequest, decision: Decision, now_s: float) -> None:
        # Asked first: recording the dispatch is what makes a second one "recorded lately".
        share = self.inner.shares_dispatch(request, decision, now_s)
        self.inner.on_dispatched(request, decision, now_s)
        sync = self.sync
        message = sync.dispatched(request, decision, now_s, share)
        opened = sync.queue(message) if message is not None else sync.open_window()
        if opened:
            self.window_opened()

    def on_first_token(self, request: RouteRequest, decision: Decision, now_s: float) -> None:
        self.inner.on_first_token(request, decision, now_s)
        self.sync.changed = True  # its forecast ended: the policy's shared state changed
        if self.sync.open_window():
            self.window_opened()

    def on_finished(
        self, request: RouteRequest, decision: Decision, now_s: float, ok: bool
    ) -> None:
        self.inner.on_finished(request, decision, now_s, ok)
        self.sync.finished(request, decision)
        if self.sync.open_window():
            self.window_opened()

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
