"""Synthetic workloads, generated at block level, streamed in arrival order.

Each generator yields ``simulator.traces.TraceRequest`` values whose ``hash_ids`` are chained block
keys drawn from a private counter: a key stands for the whole prefix up to its block, so two
requests share a key exactly when they share that prefix. Conversations and agents are sessions;
a heap holds one pending request per active session, so memory grows with concurrently active
sessions, never with the trace length (a million requests stream in constant memory).

Workloads (``synthetic:NAME[,key=value...]``; every key is optional):

- ``multi_tenant``: many tenants, each with its own long system prompt (``prompt_min_tokens`` ..
  ``prompt_max_tokens``), tenant popularity Zipf(``zipf``); users hold short chats (1-4 turns).
- ``chat``: multi-turn chat behind one shared system prompt; think time between turns; a share of
  users (``return_ratio``) come back after an idle pause (``idle_s``) and continue.
- ``agent``: agent loops re-sending a growing context (tool results appended every step).
- ``long_doc_qa``: questions about long documents (Zipf popularity over ``documents``).
- ``mixed``: all four merged (40/30/20/10 % of ``rate``).
- ``returning`` (issue 18): users with a long context of their own (a document or a long
  history, ``prompt_min_tokens`` .. ``prompt_max_tokens``) chat 2-5 turns, go idle for minutes
  (60 s + exponential with mean ``idle_s``) and come back to the same conversation; after each
  visit a share ``return_ratio`` returns, at most 3 visits. By then HBM has usually evicted the
  context: what an offload tier or a shared store is for.
- ``long_agent`` (issue 18): coding/research agents whose context grows past what one engine
  holds comfortably: an app prompt of 3k-6k tokens, a task of 2k-8k, then 10-40 steps each
  appending a tool result of 1k-8k tokens (contexts of 30k-200k tokens); a quarter of the steps
  wait on a slow tool for 30-300 s, long enough for the context to leave HBM.

Common keys: ``requests`` (count, default 2000), ``rate`` (requests/s), ``block_size`` (tokens).
Randomness comes from one ``random.Random(seed)``. Must not import ``router``; no clock.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, fields, replace

from simulator.traces import TraceError, TraceRequest

__all__ = ["WORKLOADS", "WorkloadParams", "parse_synthetic", "synthetic"]


@dataclass(frozen=True, slots=True)
class WorkloadParams:
    requests: int = 2000
    rate: float = 20.0
    block_size: int = 64
    tenants: int = 400
    zipf: float = 1.0
    prompt_min_tokens: int = 2000
    prompt_max_tokens: int = 12000
    user_min_tokens: int = 50
    user_max_tokens: int = 600
    output_min_tokens: int = 50
    output_max_tokens: int = 400
    think_s: float = 20.0
    return_ratio: float = 0.3
    idle_s: float = 600.0
    documents: int = 200
    document_min_tokens: int = 8000
    document_max_tokens: int = 30000
    id_base: int = 1


class _Context:
    """A session's running prompt as chained block keys; new content gets fresh keys."""

    __slots__ = ("alloc", "block_size", "ids", "tokens")

    def __init__(self, alloc: Iterator[int], block_size: int) -> None:
        self.alloc = alloc
        self.block_size = block_size
        self.ids: list[int] = []
        self.tokens = 0

    def extend(self, n_tokens: int) -> _Context:
        # The partially filled last block changes content, hence its chained key changes too.
        keep = self.tokens // self.block_size
        del self.ids[keep:]
        self.tokens += n_tokens
        total = -(-self.tokens // self.block_size)
        self.ids.extend(itertools.islice(self.alloc, total - keep))
        return self

    def fork(self) -> _Context:
        child = _Context(self.alloc, self.block_size)
        child.ids = list(self.ids)
        child.tokens = self.tokens
        return child


Turn = tuple[float, _Context, int]
"""(arrival_s, the context to send, output_tokens) as a session generator yields it."""
SessionFactory = Callable[[float], tuple[str, Iterator[Turn]]]


def _drive(
    name: str, p: WorkloadParams, mean_turns: float, start: SessionFactory, rng: random.Random
) -> Iterator[TraceRequest]:
    """Poisson session starts; each session's pending request waits in a heap until due."""
    session_rate = p.rate / mean_turns
    heap: list[tuple[float, int, str, TraceRequest, Iterator[Turn]]] = []
    counter = itertools.count()
    next_start = rng.expovariate(session_rate)
    produced = 0

    def push(session_id: str, turns: Iterator[Turn]) -> None:
        turn = next(turns, None)
        if turn is None:
            return
        arrival_s, ctx, out = turn
        seq = next(counter)
        request = TraceRequest(
            request_id=f"{name}-{seq}",
            arrival_s=arrival_s,
            input_tokens=ctx.tokens,
            output_tokens=out,
            hash_ids=tuple(ctx.ids),
            block_size=p.block_size,
            session_id=session_id,
        )
        heapq.heappush(heap, (arrival_s, seq, session_id, request, turns))

    while produced < p.requests:
        if heap and heap[0][0] <= next_start:
            _t, _seq, session_id, request, turns = heapq.heappop(heap)
            produced += 1
            yield request
            push(session_id, turns)
        else:
            push(*start(next_start))
            next_start += rng.expovariate(session_rate)


def _zipf_cum(n: int, s: float) -> list[float]:
    return list(itertools.accumulate(1.0 / (k + 1) ** s for k in range(n)))


def _shared_prefixes(
    p: WorkloadParams, rng: random.Random, alloc: Iterator[int], n: int, lo: int, hi: int
) -> list[_Context]:
    return [_Context(alloc, p.block_size).extend(rng.randint(lo, hi)) for _ in range(n)]


def _multi_tenant(p: WorkloadParams, rng: random.Random) -> Iterator[TraceRequest]:
    alloc = itertools.count(p.id_base)
    prompts = _shared_prefixes(p, rng, alloc, p.tenants, p.prompt_min_tokens, p.prompt_max_tokens)
    cum = _zipf_cum(p.tenants, p.zipf)
    users = itertools.count()

    def start(t: float) -> tuple[str, Iterator[Turn]]:
        tenant = rng.choices(range(p.tenants), cum_weights=cum)[0]
        return f"t{tenant}-u{next(users)}", session(t, prompts[tenant].fork(), rng.randint(1, 4))

    def session(t: float, ctx: _Context, turns: int) -> Iterator[Turn]:
        for _ in range(turns):
            out = rng.randint(p.output_min_tokens, p.output_max_tokens)
            yield t, ctx.extend(rng.randint(p.user_min_tokens, p.user_max_tokens)), out
            ctx.extend(out)
            t += 2.0 + rng.expovariate(1.0 / p.think_s)

    return _drive("mt", p, 2.5, start, rng)


def _chat(p: WorkloadParams, rng: random.Random) -> Iterator[TraceRequest]:
    alloc = itertools.count(p.id_base)
    system = _Context(alloc, p.block_size).extend(rng.randint(300, 1200))
    users = itertools.count()

    def start(t: float) -> tuple[str, Iterator[Turn]]:
        return f"chat-{next(users)}", session(t, system.fork())

    def session(t: float, ctx: _Context) -> Iterator[Turn]:
        return _visits(p, rng, t, ctx, lambda: 1 + int(rng.expovariate(1 / 4.0)), away_s=0.0)

    return _drive("chat", p, 5.0 * (1 + p.return_ratio), start, rng)


def _visits(p: WorkloadParams, rng: random.Random, t: float, ctx: _Context,
            turns: Callable[[], int], away_s: float) -> Iterator[Turn]:
    """A user's visits: ``turns()`` chat turns each, then (``return_ratio``, at most 3 visits)
    a return after ``away_s`` plus an exponential idle of mean ``idle_s``."""
    visits = 1
    while True:
        for _ in range(turns()):
            out = rng.randint(p.output_min_tokens, p.output_max_tokens)
            yield t, ctx.extend(rng.randint(p.user_min_tokens, p.user_max_tokens)), out
            ctx.extend(out)
            t += 2.0 + rng.expovariate(1.0 / p.think_s)
        if visits >= 3 or rng.random() >= p.return_ratio:
            return
        visits += 1
        t += away_s + rng.expovariate(1.0 / p.idle_s)


def _agent(p: WorkloadParams, rng: random.Random) -> Iterator[TraceRequest]:
    alloc = itertools.count(p.id_base)
    apps = _shared_prefixes(p, rng, alloc, 8, 3000, 6000)
    agents = itertools.count()

    def start(t: float) -> tuple[str, Iterator[Turn]]:
        app = rng.randrange(len(apps))
        return f"agent{app}-{next(agents)}", session(t, apps[app].fork(), rng.randint(5, 40))

    def session(t: float, ctx: _Context, steps: int) -> Iterator[Turn]:
        return _steps(rng, t, ctx, steps, task=(200, 1000), out=(30, 300), result=(200, 3000))

    return _drive("agent", p, 22.5, start, rng)


def _steps(rng: random.Random, t: float, ctx: _Context, steps: int, task: tuple[int, int],
           out: tuple[int, int], result: tuple[int, int], cold_ratio: float = 0.0
           ) -> Iterator[Turn]:
    """An agent's run: a task of ``task`` tokens on its app's prefix, then ``steps`` calls,
    each adding its output and a tool result; with ``cold_ratio`` a step's tool is slow
    (30-300 s) and the context goes cold."""
    ctx.extend(rng.randint(*task))
    for _ in range(steps):
        produced = rng.randint(*out)
        yield t, ctx, produced
        ctx.extend(produced + rng.randint(*result))
        t += 1.0 + rng.expovariate(1 / 3.0)
        if cold_ratio and rng.random() < cold_ratio:
            t += rng.uniform(30.0, 300.0)


def _long_doc_qa(p: WorkloadParams, rng: random.Random) -> Iterator[TraceRequest]:
    alloc = itertools.count(p.id_base)
    docs = _shared_prefixes(
        p, rng, alloc, p.documents, p.document_min_tokens, p.document_max_tokens
    )
    cum = _zipf_cum(p.documents, p.zipf)
    readers = itertools.count()

    def start(t: float) -> tuple[str, Iterator[Turn]]:
        doc = rng.choices(range(p.documents), cum_weights=cum)[0]
        return f"doc{doc}-{next(readers)}", session(t, docs[doc].fork())

    def session(t: float, ctx: _Context) -> Iterator[Turn]:
        yield t, ctx.extend(rng.randint(20, 120)), rng.randint(p.output_min_tokens, p.output_max_tokens)

    return _drive("doc", p, 1.0, start, rng)


def _returning(p: WorkloadParams, rng: random.Random) -> Iterator[TraceRequest]:
    alloc = itertools.count(p.id_base)
    users = itertools.count()

    def start(t: float) -> tuple[str, Iterator[Turn]]:
        context = _Context(alloc, p.block_size).extend(
            rng.randint(p.prompt_min_tokens, p.prompt_max_tokens))
        return f"user-{next(users)}", session(t, context)

    def session(t: float, ctx: _Context) -> Iterator[Turn]:
        return _visits(p, rng, t, ctx, lambda: rng.randint(2, 5), away_s=60.0)

    return _drive("ret", p, 3.5 * (1 + p.return_ratio), start, rng)


def _long_agent(p: WorkloadParams, rng: random.Random) -> Iterator[TraceRequest]:
    alloc = itertools.count(p.id_base)
    apps = _shared_prefixes(p, rng, alloc, 8, 3000, 6000)
    agents = itertools.count()

    def start(t: float) -> tuple[str, Iterator[Turn]]:
        app = rng.randrange(len(apps))
        return f"lagent{app}-{next(agents)}", session(t, apps[app].fork(), rng.randint(10, 40))

    def session(t: float, ctx: _Context, steps: int) -> Iterator[Turn]:
        return _steps(rng, t, ctx, steps, task=(2000, 8000), out=(50, 500),
                      result=(1000, 8000), cold_ratio=0.25)

    return _drive("lagent", p, 25.0, start, rng)


def _mixed(p: WorkloadParams, rng: random.Random) -> Iterator[TraceRequest]:
    shares = (("multi_tenant", 0.4), ("chat", 0.3), ("agent", 0.2), ("long_doc_qa", 0.1))
    streams = []
    for i, (name, share) in enumerate(shares):
        sub = replace(
            p,
            requests=max(1, round(p.requests * share)),
            rate=p.rate * share,
            # Disjoint key spaces: the parts must never share a prefix by accident.
            id_base=p.id_base + (i << 48),
        )
        streams.append(WORKLOADS[name](sub, random.Random(rng.getrandbits(64))))
    return heapq.merge(*streams, key=lambda r: r.arrival_s)


WORKLOADS: dict[str, Callable[[WorkloadParams, random.Random], Iterator[TraceRequest]]] = {
    "multi_tenant": _multi_tenant,
    "chat": _chat,
    "agent": _agent,
    "long_doc_qa": _long_doc_qa,
    "mixed": _mixed,
    "returning": _returning,
    "long_agent": _long_agent,
}


def parse_synthetic(spec: str) -> tuple[str, WorkloadParams]:
    """``synthetic:NAME[,key=value...]`` -> (name, params); errors name the bad key."""
    body = spec.removeprefix("synthetic:")
    name, *pairs = body.split(",")
    if name not in WORKLOADS:
        raise TraceError(f"trace: unknown synthetic workload {name!r} (known: {', '.join(WORKLOADS)})")
    types = {f.name: f.type for f in fields(WorkloadParams)}
    values: dict[str, object] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or key not in types:
            raise TraceError(f"trace.{key}: unknown synthetic key (known: {', '.join(types)})")
        try:
            values[key] = float(raw) if types[key] in (float, "float") else int(raw)
        except ValueError:
            raise TraceError(f"trace.{key}: expected a number, got {raw!r}") from None
    params = WorkloadParams(**values)  # type: ignore[arg-type]
    if params.requests <= 0 or params.rate <= 0 or params.block_size <= 0:
        raise TraceError("trace: requests, rate and block_size must be > 0")
    return name, params


def synthetic(name: str, params: WorkloadParams | Mapping[str, object], seed: int) -> Iterator[TraceRequest]:
    """Stream workload ``name``; same name, params and seed give the same requests."""
    if not isinstance(params, WorkloadParams):
        params = WorkloadParams(**params)  # type: ignore[arg-type]
    return WORKLOADS[name](params, random.Random(seed))
