"""The routing vocabulary: what a policy is asked, what it sees, and what it answers.

One vocabulary for the live router and the simulator. A **backend** is one serving engine
(a vLLM or SGLang pod). Must not import anything outside the standard library and ``policies``.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol, TypeVar, dataclass_transform, runtime_checkable

__all__ = [
    "BackendId",
    "BackendMatch",
    "BackendScore",
    "BackendState",
    "BlockHash",
    "ClusterView",
    "Decision",
    "DecodeEstimate",
    "EngineKind",
    "Policy",
    "PolicyFactory",
    "Prediction",
    "PrefixLookup",
    "Role",
    "RouteRequest",
    "SharedState",
    "value_type",
]

_T = TypeVar("_T")


@dataclass_transform(frozen_default=True)
def value_type(cls: type[_T]) -> type[_T]:
    """A value the router builds per request: frozen for the type checker (mypy rejects any
    assignment to a field), a plain slotted dataclass at run time, and hashable by its fields
    as a frozen one is. A frozen dataclass sets each field through ``object.__setattr__``:
    2.3 us against 0.6 us to build a ``BackendState`` on this machine, and the live router
    builds several of these per request (bench/README.md)."""
    return dataclass(slots=True, unsafe_hash=True)(cls)

BackendId = str
"""A backend's stable name: its base URL in the live router, ``engine-N`` in the simulator."""

BlockHash = int
"""The router's own chained hash of one full KV block (unsigned 64-bit)."""

SharedState = Mapping[BackendId, Sequence[float]]
"""What a policy shares with replica peers of its own bookkeeping (``Policy.shared_state``):
numbers per backend, in a layout the policy defines and checks (``policies.replica_sync``)."""


class Role(StrEnum):
    MIXED = "mixed"
    PREFILL = "prefill"
    DECODE = "decode"


class EngineKind(StrEnum):
    VLLM = "vllm"
    SGLANG = "sglang"


@value_type
class RouteRequest:
    """What a policy may know about one request. Built once per request by the caller.

    ``prompt_text`` is the prompt as characters (chat messages concatenated), for policies that
    match characters the way the peers do. ``block_hashes`` are the router's chained hashes of
    the prompt's full KV blocks of ``block_size`` tokens, empty when the prompt was not
    tokenized. ``prompt_tokens`` is exact when tokenized, otherwise an estimate.
    """

    request_id: str
    model: str
    prompt_tokens: int
    prompt_text: str = ""
    session_key: str | None = None
    block_hashes: tuple[BlockHash, ...] = ()
    block_size: int = 16
    max_tokens: int = 16
    stream: bool = False
    tokens_exact: bool = False
    salted: bool = False
    """The request carries a ``cache_salt``: the engine keeps its blocks apart from those of
    other salts, its hashes are in the salt's namespace, and engine KV events (which do not
    say a block's salt) can never be matched against them."""

    @property
    def matches_events(self) -> bool:
        """Whether ``block_hashes`` can be looked up among the engines' KV events: exact
        tokens in the unsalted namespace the events are indexed in."""
        return self.tokens_exact and not self.salted


@value_type
class BackendState:
    """A snapshot of one candidate backend's load, taken for one decision.

    Router-side counters (``in_flight_*``) are always fresh. Engine-side numbers come from the
    engine's own ``/metrics`` scraped on an interval and are ``None`` when unknown or stale.
    """

    backend_id: BackendId
    role: Role = Role.MIXED
    engine: EngineKind = EngineKind.VLLM
    healthy: bool = True
    in_flight_requests: int = 0
    in_flight_prompt_tokens: int = 0
    engine_waiting_requests: int | None = None
    engine_running_requests: int | None = None
    kv_usage_ratio: float | None = None
    total_kv_blocks: int | None = None
    engine_preemptions_total: int | None = None
    """The engine's cumulative preemptions (``vllm:num_preemptions_total``, summed over its
    data-parallel ranks), as scraped: it rises while the engine is over-committed and recomputing
    work, and drops back when the engine restarts."""
    kv_events: bool = False
    """True when the index is fed by this backend's own KV events (precise mode); False means
    the router only knows what it sent there (approximate mode)."""


@value_type
class BackendMatch:
    """One backend's longest held prefix of a request's chain, split by tier (in blocks)."""

    backend_id: BackendId
    matched_blocks: int
    gpu_blocks: int
    cpu_blocks: int = 0
    storage_blocks: int = 0
    shared_blocks: int = 0
    """Blocks only the fleet-shared store holds (loadable by this backend like any other)."""


class PrefixLookup(Protocol):
    """What a policy may ask the prefix index (``policies.kv.index.PrefixIndex``): read-only.

    The index is fed by KV events (or, in approximate mode, by the policy's own hooks) outside
    ``choose``; a policy only looks things up in it.
    """

    def match(
        self, block_hashes: Sequence[BlockHash], now_s: float | None = None
    ) -> Mapping[BackendId, BackendMatch]:
        """Per backend holding at least the first block: its longest held prefix by tier."""
        ...

    def backend_entries(self, backend_id: BackendId) -> int:
        """How many blocks the index holds for ``backend_id``."""
        ...

    def shared_prefix(self, block_hashes: Sequence[BlockHash]) -> int:
        """Leading blocks the fleet-shared KV store holds (every backend can load them)."""
        ...


@value_type
class ClusterView:
    """Everything a policy sees besides the request: candidates, the prefix index, the time.

    ``backends`` holds only eligible candidates (healthy, serving the request's model), in a
    stable order. ``index`` is read-only for policies: it is fed by KV events (or, in approximate
    mode, by the policy's own hooks) outside ``choose``.
    """

    now_s: float
    backends: tuple[BackendState, ...]
    index: PrefixLookup | None = None


@value_type
class Prediction:
    """What a policy forecasts for a request on one backend, as data: its hooks and wrappers
    read these back (``BackendScore.terms`` only explains a decision to people)."""

    ttft_s: float  # queued + own prefill + first step, s
    prefill_s: float  # this request's own uncached prefill, s
    uncached_tokens: float  # prompt tokens the backend will compute
    prompt_tokens: int
    kv_events: bool  # matched against the backend's own KV events (precise mode)
    capacity_blocks: int  # the backend's KV capacity as the policy assumed it
    speed: float = 1.0  # the backend's learned speed factor in these times (1: the cost model's)
    wait_s: float = 0.0  # of ttft_s, what it waits for before its own prefill: the work
    # predicted queued ahead of it and KV admission


@value_type
class DecodeEstimate:
    """The decode side of a split (prefill/decode disaggregation) on one backend, in seconds."""

    transfer_s: float  # KV transfer from the prefill backend
    decode_s: float  # max_tokens decode steps beside the running batch
    kv_wait_s: float  # waiting for free KV blocks
    running_requests: int  # what the decode steps share the batch with


@value_type
class BackendScore:
    """One backend's terms in a decision. ``terms`` explains it (``/debug/route``, tests);
    ``prediction`` (a prefill-side score) and ``decode`` (a decode-side score of a split) carry
    the numbers other code acts on."""

    backend_id: BackendId
    score: float
    matched_tokens: int = 0
    terms: Mapping[str, float] = field(default_factory=dict)
    prediction: Prediction | None = None
    decode: DecodeEstimate | None = None


@value_type
class Decision:
    """A policy's answer. ``backend_id`` serves the request (the decode side when split).

    ``prefill_backend_id`` is set when the request should be prefilled elsewhere first
    (prefill/decode disaggregation). ``predicted_hit_tokens`` is what the policy expects the
    chosen backend to find cached.
    """

    backend_id: BackendId
    reason: str
    predicted_hit_tokens: int = 0
    prefill_backend_id: BackendId | None = None
    scores: tuple[BackendScore, ...] = ()


@runtime_checkable
class Policy(Protocol):
    """The one routing interface, for every policy, in the router and in the simulator.

    ``choose`` must not change what a later ``choose`` would answer, except through the injected
    random generator: ``/debug/route`` calls it without dispatching. Recording happens in the
    hooks. ``view.backends`` is never empty when ``choose`` is called.
    """

    name: str

    def choose(self, request: RouteRequest, view: ClusterView) -> Decision: ...

    def defer(self, request: RouteRequest, view: ClusterView) -> bool:
        """True when no candidate should take ``request`` now: the router holds it (first in,
        first out) and asks again each time a request finishes, so the decision is made when
        capacity frees up, with fresher cache state, instead of in an engine's queue. A query
        like ``choose``: no random draw, and no state change but noting the engine counters the
        view shows (kv_aware's preemption backoff), which a second call on the same view
        repeats to no effect."""
        ...

    def on_dispatched(self, request: RouteRequest, decision: Decision, now_s: float) -> None: ...

    def on_first_token(self, request: RouteRequest, decision: Decision, now_s: float) -> None:
        """The first output of a streamed request arrived (the first body chunk: vLLM sends
        nothing before its first token): its prefill is done. Not called for whole answers,
        whose first byte is their end; ``on_finished`` follows in every case."""
        ...

    def on_finished(
        self, request: RouteRequest, decision: Decision, now_s: float, ok: bool
    ) -> None: ...

    def on_backend_removed(self, backend_id: BackendId) -> None: ...

    # ---- replica sync (policies.replica_sync; defaults in policies.base.PolicyBase) ----------

    def shares_dispatch(self, request: RouteRequest, decision: Decision, now_s: float) -> bool:
        """Whether replica peers must replay this dispatch (``on_peer_dispatched``): it records
        something that outlives the request. Asked just before ``on_dispatched``."""
        ...

    def on_peer_dispatched(self, request: RouteRequest, decision: Decision, now_s: float) -> None:
        """A peer's shared dispatch: record what outlives it. No first token or finish
        follows; the peer's in-flight work arrives in its ``shared_state``."""
        ...

    def shared_state(self, now_s: float) -> SharedState | None:
        """This replica's own in-flight bookkeeping, for its peers' ``on_peer_state``."""
        ...

    def on_peer_state(self, origin: str, state: SharedState | None, now_s: float) -> None:
        """Peer ``origin``'s latest ``shared_state`` (None: the peer is gone). Raises
        ValueError on a state it cannot read (the caller counts it and goes on)."""
        ...


class PolicyFactory(Protocol):
    def __call__(self, params: Mapping[str, object], rng: random.Random) -> Policy: ...
