"""The engine model: one vLLM-like serving engine (scheduler + paged prefix cache + cost model)
driven in virtual time by its caller.

Pure, synchronous and deterministic: no clock, no global random, no I/O. Must not import
``router`` or asyncio. Drivers: the emulator (``simulator.emulator.fleet``, wall clock scaled) and the
discrete-event cluster simulator.

API::

    cost = load_cost_model("h200-llama-3.1-8b")          # simulator.engine.cost_model
    # EngineConfig, EngineRequest, RequestOutput, StepResult live in simulator.engine.values
    # and are re-exported here.
    config = EngineConfig(block_size=16, num_gpu_blocks=cost.num_gpu_blocks(16))
    engine = EngineModel(config, cost, engine_id="engine-0")
    engine.add_request(EngineRequest("r1", prompt_tokens=900, max_tokens=64,
                                     block_keys=keys), now_s)   # ValueError if it can never run
    result = engine.step(now_s)     # None when idle; else one scheduler step from now_s
    # result.end_s: when the step's outputs exist; call step(result.end_s) next (or later).
    # result.outputs: a RequestOutput per request whose FIRST (first_token, cached_tokens) or
    #   LAST (finished) token came out of this step; result.decoded: ids of the requests that
    #   produced one other token (kept as bare ids so a decode step costs no objects).
    # Every request in outputs or decoded produced exactly one token in the step.
    # result.events: the step's KV events (policies.kv.events), in vLLM's order and shape.
    engine.abort("r1")              # True if it was queued or running; frees its blocks
    ok, events = engine.reset_prefix_cache()  # vLLM's: refused (False) while blocks are held

Read-only stats: ``num_running``, ``num_waiting``, ``has_work``, ``kv_usage_ratio``,
``prefix_cache_queries_tokens``, ``prefix_cache_hits_tokens``, ``num_preemptions``,
``num_gpu_blocks``, ``block_size``, ``prompt_tokens_total``, ``generation_tokens_total``,
``cached_keys()``, ``peek_cached_tokens(keys, prompt_tokens)``.

``EngineRequest.block_keys`` is the chain of block keys of the prompt's full blocks (the
caller's hash: the simulator passes the router's hashes, the emulator vLLM-like ones), and may
go on over the blocks of the output the caller knows it will get (at most
``(prompt_tokens + max_tokens) // block_size`` keys): those blocks are cached as decoding fills
them, as vLLM caches output blocks, so a next turn that repeats the answer hits them. Keys go
into the events unchanged; ``token_ids`` (prompt, then output), when given, too.
``report_hits=True`` is vLLM's ``kv_cache_report_mode: full``: the blocks a request hits are
re-announced as one BlockStored without parent. A step lasts ``cost.step_s(prefill chunks as
(new, context) pairs, summed context of the decodes)`` (``simulator.engine.cost_model``).

Scheduling (vLLM v1, FCFS, chunked prefill on): each step has a budget of
``max_num_batched_tokens``. Running requests go first, in admission order: each gets
``min(remaining, budget)`` tokens (1 for a decode, a chunk for a prefill). When blocks run out
the most recently admitted running request is preempted (recompute: it frees everything, goes
back to the head of the waiting queue, ``num_preemptions`` counts it). Then waiting requests
are admitted in order while budget, ``max_num_seqs`` and free blocks allow (head-of-line
blocking, none after a preemption in the same step), and only those that had arrived by the
step's start: a request never joins a step that began before it arrived. (The cluster
simulator could hand an idle engine two requests before running it, and the second then
started in a step that began when the first arrived: 15 of 3,000 requests of mixed 20/s at 6
engines, up to 0.6 s early. The emulator starts steps when a free-running engine core would,
``next_step_s``, which needs the same rule.) On admission the cached prefix is the
longest run of cached keys, capped at ``(tokens - 1) // block_size`` blocks (the last token is
always recomputed). A prefill chunk's full blocks are cached when the chunk is scheduled, as
vLLM v1 caches them, so a request admitted after it in the same step already hits them (two
same-prefix requests arriving together compute the prefix once). A request whose scheduled
tokens reach its total samples one token.
A preempted request recomputes prompt + generated tokens. Cost: O(running + admitted + blocks
touched) per step.

Tiers below HBM (off unless configured; semantics in ``simulator.engine.tiers``): cached
blocks are written through to a CPU LRU (``EngineConfig.cpu_offload_blocks``) and a fleet
``SharedStore``; on admission the prefix goes on past the GPU hit through blocks a tier holds,
which are loaded, not recomputed: they take GPU blocks at once and the request waits for the
queued load before its first chunk (other requests keep running; a step with only loads pending
ends when the first one does, ``StepResult.load_wait``). ``cached_tokens`` includes loaded
tokens (vLLM's ``num_cached_tokens``); ``prefix_cache_hits_tokens`` stays GPU-only.
"""

from __future__ import annotations

from collections import deque

from policies.kv.events import BlockStored, KvEvent
from simulator.engine.cost_model import CostModel
from simulator.engine.prefix_cache import PrefixCache
from simulator.engine.tiers import BlockLru, EngineTiers, SharedStore
from simulator.engine.values import EngineConfig, EngineRequest, RequestOutput, StepResult

__all__ = ["EngineConfig", "EngineModel", "EngineRequest", "RequestOutput", "StepResult"]


class _Running:
    __slots__ = (
        "anonymous",
        "arrival_s",
        "cached_tokens",
        "computed",
        "cpu_cached",
        "generated",
        "held",
        "max_tokens",
        "prompt_tokens",
        "ready_s",
        "req",
        "shared_cached",
    )

    def __init__(self, req: EngineRequest, arrival_s: float) -> None:
        self.req = req
        self.prompt_tokens = req.prompt_tokens
        self.max_tokens = req.max_tokens
        self.arrival_s = arrival_s
        self.computed = 0
        self.generated = 0
        self.cached_tokens = 0
        self.held = 0  # leading block_keys held as cached blocks
        self.anonymous = 0
        self.ready_s = 0.0  # a tier load in progress ends then; no compute before
        self.cpu_cached = 0
        self.shared_cached = 0


class EngineModel:
    def __init__(
        self,
        config: EngineConfig,
        cost: CostModel,
        engine_id: str = "engine-0",
        shared: SharedStore | None = None,
    ) -> None:
        self.config = config
        self.cost = cost
        self.engine_id = engine_id
        self.cache = PrefixCache(config.num_gpu_blocks, config.block_size)
        self.tiers = EngineTiers(cost, config.block_size, config.cpu_offload_blocks, shared)
        self._tiered = bool(self.tiers)
        self._waiting: deque[_Running] = deque()
        self._running: list[_Running] = []
        self._ids: dict[str, _Running] = {}
        self.prefix_cache_queries_tokens = 0
        self.prefix_cache_hits_tokens = 0
        self.num_preemptions = 0
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0

    # -- stats ---------------------------------------------------------------------------------

    @property
    def cpu(self) -> BlockLru | None:
        return self.tiers.cpu

    @property
    def shared(self) -> SharedStore | None:
        return self.tiers.shared

    @property
    def cpu_hit_tokens(self) -> int:
        return self.tiers.cpu_hit_tokens

    @property
    def shared_hit_tokens(self) -> int:
        return self.tiers.shared_hit_tokens

    @property
    def block_size(self) -> int:
        return self.config.block_size

    @property
    def num_gpu_blocks(self) -> int:
        return self.config.num_gpu_blocks

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def has_work(self) -> bool:
        return bool(self._running or self._waiting)

    def next_step_s(self, free_s: float) -> float:
        """When an engine core that is never short of CPU starts its next step: at ``free_s``
        (its last step's end) while it has running requests, else when the first waiting
        request arrived (not before ``free_s``). ``step`` admits only requests that had
        arrived by its ``now_s``."""
        if self._running or not self._waiting:
            return free_s
        return max(free_s, self._waiting[0].arrival_s)

    @property
    def kv_usage_ratio(self) -> float:
        return self.cache.usage_ratio

    def cached_keys(self) -> set[int]:
        return self.cache.cached_keys()

    def peek_cached_tokens(self, block_keys: tuple[int, ...], prompt_tokens: int) -> int:
        """What an admission right now would find cached (no side effects)."""
        cap = max(prompt_tokens - 1, 0) // self.config.block_size
        return self.cache.match(block_keys[:cap]) * self.config.block_size

    # -- requests ------------------------------------------------------------------------------

    def add_request(self, request: EngineRequest, now_s: float) -> None:
        """Queue a request; ValueError (one line) if it is malformed or could never run."""
        cfg = self.config
        if request.request_id in self._ids:
            raise ValueError(f"duplicate request_id {request.request_id!r}")
        if request.prompt_tokens < 1 or request.max_tokens < 1:
            raise ValueError("prompt_tokens and max_tokens must be >= 1")
        if len(request.block_keys) > (request.prompt_tokens + request.max_tokens) // cfg.block_size:
            raise ValueError("block_keys must cover full blocks of prompt + max_tokens only")
        total = request.prompt_tokens + request.max_tokens
        if total > cfg.max_model_len:
            raise ValueError(f"{total} tokens exceed max_model_len {cfg.max_model_len}")
        if -(-total // cfg.block_size) > cfg.num_gpu_blocks:
            raise ValueError(f"{total} tokens need more than the {cfg.num_gpu_blocks} KV blocks")
        state = _Running(request, now_s)
        self._ids[request.request_id] = state
        self._waiting.append(state)
        self.prompt_tokens_total += request.prompt_tokens

    def abort(self, request_id: str) -> bool:
        state = self._ids.pop(request_id, None)
        if state is None:
            return False
        if state in self._running:
            self._running.remove(state)
            self._free(state)
        else:
            self._waiting.remove(state)
        return True

    def reset_prefix_cache(self) -> tuple[bool, tuple[KvEvent, ...]]:
        """vLLM's reset: refused (False) while running requests hold blocks."""
        events: list[KvEvent] = []
        ok = self.cache.reset(events)
        return ok, tuple(events)

    # -- one step ------------------------------------------------------------------------------

    def step(self, now_s: float) -> StepResult | None:
        if not self._running and not self._waiting:
            return None
        bs = self.config.block_size
        cache = self.cache
        events: list[KvEvent] = []
        budget = self.config.max_num_batched_tokens
        prefills: list[tuple[_Running, int]] = []
        decoders: list[_Running] = []
        decode_context = 0
        preempted: list[str] = []

        # Running requests first, in admission order. A decode needs a new block only when its
        # context crosses a block boundary, so the common case touches no cache state.
        running = self._running
        i = 0
        while i < len(running) and budget > 0:
            st = running[i]
            if st.ready_s > now_s:  # still loading its prefix from a lower tier
                i += 1
                continue
            c = st.computed
            remaining = st.prompt_tokens + st.generated - c
            n = 1 if remaining == 1 else min(remaining, budget)
            need = -(-(c + n) // bs) - st.held - st.anonymous
            if need > 0:
                if not self._make_room(need, st, preempted):
                    break
                cache.allocate_anonymous(need, events)
                st.anonymous += need
            if remaining == 1 and st.generated:
                decoders.append(st)
                decode_context += c + 1
            else:
                prefills.append((st, n))
                self._store(st, (c + n) // bs, events)  # cached when scheduled, as vLLM v1 does
            budget -= n
            i += 1

        if not preempted:
            self._admit(budget, prefills, events, now_s)
        if self._tiered and not prefills and not decoders and not preempted:
            loading = [st.ready_s for st in running if st.ready_s > now_s]
            if loading:
                return StepResult(now_s, min(loading), (), (), tuple(events), (), 0, 0,
                                  load_wait=True)
        return self._finish_step(now_s, prefills, decoders, decode_context, events, preempted)

    def _make_room(self, need: int, st: _Running, preempted: list[str]) -> bool:
        """Preempt the latest-admitted running requests until ``need`` blocks are free; False
        when ``st`` itself had to go."""
        while need > self.cache.free_blocks:
            victim = self._running.pop()
            self._preempt(victim)
            preempted.append(victim.req.request_id)
            if victim is st:
                return False
        return True

    def _admit(
        self,
        budget: int,
        prefills: list[tuple[_Running, int]],
        events: list[KvEvent],
        now_s: float,
    ) -> None:
        bs = self.config.block_size
        cache = self.cache
        max_seqs = self.config.max_num_seqs
        while self._waiting and budget > 0 and len(self._running) < max_seqs:
            st = self._waiting[0]
            if st.arrival_s > now_s:  # arrived during this step's scheduling (the emulator)
                break
            keys = st.req.block_keys
            tokens = st.prompt_tokens + st.generated
            cap = min(len(keys), (tokens - 1) // bs)
            hits = cache.match(keys[:cap])
            hit_keys = keys[:hits]
            cpu_n = shared_n = 0
            if self._tiered and hits < cap:
                cpu_n, shared_n = self.tiers.match(keys[hits:cap])
            loaded = cpu_n + shared_n
            # A request loading its prefix computes nothing until the load is done.
            n = 0 if loaded else min(tokens - hits * bs, budget)
            need = -(-((hits + loaded) * bs + n) // bs) - hits
            if need + cache.count_evictable(hit_keys) > cache.free_blocks:
                break
            self._waiting.popleft()
            cache.acquire(hit_keys)
            if hits and st.req.report_hits:
                token_ids = st.req.token_ids[: hits * bs] if st.req.token_ids else ()
                events.append(BlockStored(tuple(hit_keys), None, tuple(token_ids), bs))
            cache.allocate_anonymous(need, events)
            st.held = hits
            st.anonymous = need
            # vLLM v1 caches a prefill's blocks when it schedules them (allocate_slots ->
            # cache_blocks), not after the step: a request admitted later in the same step hits
            # them (each layer writes the step's KV before its attention reads it). Without
            # this, same-prefix requests that arrive together all recompute the prefix.
            self._store(st, (hits * bs + n) // bs, events)
            st.computed = hits * bs
            if loaded:
                self._load(st, hits, cpu_n, shared_n, events, now_s)
            st.cached_tokens = st.computed
            self.prefix_cache_queries_tokens += tokens
            self.prefix_cache_hits_tokens += hits * bs
            self._running.append(st)
            if n:
                prefills.append((st, n))
            budget -= n

    def _load(
        self,
        st: _Running,
        hits: int,
        cpu_n: int,
        shared_n: int,
        events: list[KvEvent],
        now_s: float,
    ) -> None:
        """Blocks ``hits .. hits + cpu_n + shared_n`` come from lower tiers: cached on GPU at
        once, usable when the queued load ends."""
        bs = self.config.block_size
        loaded = cpu_n + shared_n
        self._store(st, hits + loaded, events, write_through=False)
        st.ready_s = self.tiers.load(st.req.block_keys[hits : hits + loaded], cpu_n, shared_n,
                                     now_s)
        st.computed = (hits + loaded) * bs
        st.cpu_cached = cpu_n * bs
        st.shared_cached = shared_n * bs

    def _finish_step(
        self,
        now_s: float,
        prefills: list[tuple[_Running, int]],
        decoders: list[_Running],
        decode_context: int,
        events: list[KvEvent],
        preempted: list[str],
    ) -> StepResult:
        bs = self.config.block_size
        chunks = [(n, st.computed) for st, n in prefills]
        end_s = now_s + self.cost.step_s(chunks, decode_context)

        outputs: list[RequestOutput] = []
        decoded: list[str] = []
        finished: list[_Running] = []
        for st in decoders:
            st.computed += 1
            if st.computed % bs == 0 and st.held < len(st.req.block_keys):
                # A block of generated tokens just filled: cached like a prompt block when the
                # caller supplied its key (vLLM caches output blocks too).
                self._store(st, st.computed // bs, events)
            st.generated += 1
            if st.generated >= st.max_tokens:
                finished.append(st)
                outputs.append(self._output(st))
            else:
                decoded.append(st.req.request_id)
        for st, n in prefills:
            st.computed += n
            req = st.req
            self._store(st, st.computed // bs, events)
            if st.computed == st.prompt_tokens + st.generated:
                st.generated += 1
                if st.generated >= st.max_tokens:
                    finished.append(st)
                    outputs.append(self._output(st))
                elif st.generated == 1:
                    outputs.append(self._output(st))
                else:
                    decoded.append(req.request_id)
        produced = len(outputs) + len(decoded)
        self.generation_tokens_total += produced
        if finished:
            for st in finished:
                del self._ids[st.req.request_id]
                self._free(st)
            done = {id(st) for st in finished}
            self._running = [st for st in self._running if id(st) not in done]
        return StepResult(
            start_s=now_s,
            end_s=end_s,
            outputs=tuple(outputs),
            decoded=tuple(decoded),
            events=tuple(events),
            preempted=tuple(preempted),
            prefill_tokens=sum(n for n, _ in chunks),
            decode_requests=len(decoders),
        )

    def _store(
        self, st: _Running, full_blocks: int, events: list[KvEvent], write_through: bool = True
    ) -> None:
        """Cache the request's blocks up to ``full_blocks`` that have keys and are not yet held;
        computed ones are written through to the lower tiers."""
        req = st.req
        full = min(len(req.block_keys), full_blocks)
        if full <= st.held:
            return
        bs = self.config.block_size
        keys = req.block_keys[st.held : full]
        parent = req.block_keys[st.held - 1] if st.held else None
        tokens = req.token_ids[st.held * bs : full * bs] if req.token_ids else ()
        self.cache.store(keys, parent, tokens, events)
        if write_through and self._tiered:
            self.tiers.write_through(keys, events)
        st.anonymous -= full - st.held
        st.held = full

    @staticmethod
    def _output(st: _Running) -> RequestOutput:
        return RequestOutput(
            request_id=st.req.request_id,
            output_tokens=st.generated,
            first_token=st.generated == 1,
            finished=st.generated >= st.max_tokens,
            cached_tokens=st.cached_tokens,
            prompt_tokens=st.prompt_tokens,
            arrival_s=st.arrival_s,
            cpu_cached_tokens=st.cpu_cached,
            shared_cached_tokens=st.shared_cached,
        )

    def _free(self, st: _Running) -> None:
        self.cache.release(st.req.block_keys[: st.held], st.anonymous, [])
        st.held = 0
        st.anonymous = 0

    def _preempt(self, st: _Running) -> None:
        self._free(st)
        st.computed = 0
        st.ready_s = 0.0
        st.cpu_cached = st.shared_cached = 0
        self.num_preemptions += 1
        self._waiting.appendleft(st)
