"""The paged prefix cache: hits, LRU eviction order (tail first), events, reset, and the
property that the emitted events always reproduce the cache's block set."""

from __future__ import annotations

import hashlib

from hypothesis import given, settings
from hypothesis import strategies as st

from policies.kv.events import AllBlocksCleared, BlockRemoved, BlockStored, KvEvent
from simulator.engine.cost_model import load_cost_model
from simulator.engine.model import EngineConfig, EngineModel, EngineRequest
from simulator.engine.prefix_cache import PrefixCache

BS = 4


def chain(tokens: list[int], block_size: int = BS) -> tuple[int, ...]:
    """A chained hash in the test: each key covers its parent key and its block's tokens."""
    keys: list[int] = []
    parent = b""
    for i in range(len(tokens) // block_size):
        block = tokens[i * block_size : (i + 1) * block_size]
        digest = hashlib.sha256(parent + repr(block).encode()).digest()
        keys.append(int.from_bytes(digest[:8], "big"))
        parent = digest
    return tuple(keys)


def fill(cache: PrefixCache, keys: tuple[int, ...], events: list[KvEvent]) -> None:
    assert cache.allocate_anonymous(len(keys), events)
    cache.store(keys, None, (), events)


def replay(events: list[KvEvent] | tuple[KvEvent, ...], into: set[int]) -> None:
    for ev in events:
        if isinstance(ev, BlockStored):
            assert len(ev.token_ids) in (0, len(ev.block_hashes) * ev.block_size)
            into.update(ev.block_hashes)
        elif isinstance(ev, BlockRemoved):
            for h in ev.block_hashes:
                into.remove(h)  # a removal of an unknown block is itself a failure
        elif isinstance(ev, AllBlocksCleared):
            into.clear()


def test_hit_is_longest_chain_and_emits_nothing() -> None:
    cache = PrefixCache(num_blocks=8, block_size=BS)
    events: list[KvEvent] = []
    a = chain(list(range(12)))
    fill(cache, a, events)
    cache.release(a, 0, events)
    assert cache.match(a) == 3
    b = chain([*range(8), 99, 99, 99, 99])  # same first two blocks, different third
    assert b[:2] == a[:2] and b[2] != a[2]
    assert cache.match(b) == 2
    c = chain([7, *range(1, 12)])  # first block differs: the chain breaks at once
    assert cache.match(c) == 0
    before = len(events)
    cache.acquire(b[:2])
    assert len(events) == before
    assert cache.used_blocks == 2


def test_eviction_is_lru_with_tail_blocks_first() -> None:
    cache = PrefixCache(num_blocks=6, block_size=BS)
    events: list[KvEvent] = []
    a = chain(list(range(12)))
    b = chain(list(range(100, 112)))
    fill(cache, a, events)
    fill(cache, b, events)
    cache.release(a, 0, events)  # a is freed first: evicted first, tail before head
    cache.release(b, 0, events)
    assert cache.evictable_in_order() == [a[2], a[1], a[0], b[2], b[1], b[0]]
    assert cache.free_blocks == 6 and cache.used_blocks == 0
    events.clear()
    assert cache.allocate_anonymous(2, events)
    assert events == [BlockRemoved((a[2],)), BlockRemoved((a[1],))]
    assert cache.match(a) == 1 and cache.match(b) == 3


def test_hit_refreshes_recency() -> None:
    cache = PrefixCache(num_blocks=6, block_size=BS)
    events: list[KvEvent] = []
    a = chain(list(range(12)))
    b = chain(list(range(100, 112)))
    fill(cache, a, events)
    fill(cache, b, events)
    cache.release(a, 0, events)
    cache.release(b, 0, events)
    cache.acquire(a)  # a is in use again: b is now the only eviction candidate
    cache.release(a, 0, events)
    events.clear()
    assert cache.allocate_anonymous(3, events)
    assert [ev.block_hashes[0] for ev in events if isinstance(ev, BlockRemoved)] == [
        b[2],
        b[1],
        b[0],
    ]


def test_allocation_fails_without_room_and_held_blocks_are_never_evicted() -> None:
    cache = PrefixCache(num_blocks=4, block_size=BS)
    events: list[KvEvent] = []
    a = chain(list(range(12)))
    fill(cache, a, events)
    assert not cache.allocate_anonymous(2, events)
    assert cache.match(a) == 3


def test_stored_event_carries_parent_and_tokens() -> None:
    cache = PrefixCache(num_blocks=8, block_size=BS)
    events: list[KvEvent] = []
    tokens = list(range(12))
    keys = chain(tokens)
    assert cache.allocate_anonymous(3, events)
    cache.store(keys[:1], None, tokens[:4], events)
    cache.store(keys[1:], keys[0], tokens[4:12], events)
    assert events == [
        BlockStored(keys[:1], None, tuple(tokens[:4]), BS),
        BlockStored(keys[1:], keys[0], tuple(tokens[4:12]), BS),
    ]


def test_duplicate_store_is_cached_once() -> None:
    cache = PrefixCache(num_blocks=8, block_size=BS)
    events: list[KvEvent] = []
    keys = chain(list(range(8)))
    fill(cache, keys, events)
    fill(cache, keys, events)  # a second request computed the same blocks concurrently
    stored = [ev for ev in events if isinstance(ev, BlockStored)]
    assert len(stored) == 1
    assert cache.used_blocks == 2
    cache.release(keys, 0, events)
    cache.release(keys, 0, events)
    assert cache.used_blocks == 0 and cache.cached_keys() == set(keys)


def test_reset_refused_while_held_then_clears() -> None:
    cache = PrefixCache(num_blocks=8, block_size=BS)
    events: list[KvEvent] = []
    keys = chain(list(range(8)))
    fill(cache, keys, events)
    assert not cache.reset(events)
    cache.release(keys, 0, events)
    assert cache.reset(events)
    assert events[-1] == AllBlocksCleared()
    assert cache.cached_keys() == set()


# -- property: the event stream is a faithful copy of the cache ---------------------------------

_op = st.one_of(
    st.tuples(st.just("add"), st.integers(0, 5), st.integers(1, 40), st.integers(1, 12)),
    st.tuples(st.just("step"), st.integers(1, 4), st.just(0), st.just(0)),
    st.tuples(st.just("abort"), st.integers(0, 30), st.just(0), st.just(0)),
    st.tuples(st.just("reset"), st.just(0), st.just(0), st.just(0)),
)


@settings(max_examples=150, deadline=None)
@given(ops=st.lists(_op, min_size=1, max_size=60), blocks=st.integers(6, 24))
def test_replayed_events_reproduce_the_cache(
    ops: list[tuple[str, int, int, int]], blocks: int
) -> None:
    cost = load_cost_model("cpu-tiny")
    engine = EngineModel(
        EngineConfig(block_size=BS, num_gpu_blocks=blocks, max_num_batched_tokens=16),
        cost,
    )
    mirror: set[int] = set()
    now = 0.0
    n = 0
    for kind, a, b, c in ops:
        if kind == "add":
            # Six prompt families sharing leading tokens, so hits, sharing and eviction happen.
            tokens = [a % 3] * 8 + [a] * 4 + list(range(b))
            # Keys and token ids go on over the known output, whose blocks get cached too.
            sequence = tokens + [99] * c
            try:
                engine.add_request(
                    EngineRequest(f"r{n}", len(tokens), c, chain(sequence), tuple(sequence)), now
                )
            except ValueError:
                pass  # too large for this cache: refused, as designed
            n += 1
        elif kind == "step":
            for _ in range(a):
                result = engine.step(now)
                if result is None:
                    break
                now = result.end_s
                replay(result.events, mirror)
        elif kind == "abort":
            engine.abort(f"r{a}")
        else:
            ok, events = engine.reset_prefix_cache()
            assert ok == (engine.cache.used_blocks == 0)
            replay(events, mirror)
        assert mirror == engine.cached_keys()
        assert 0 <= engine.cache.used_blocks <= blocks
    while (result := engine.step(now)) is not None:
        now = result.end_s
        replay(result.events, mirror)
    assert mirror == engine.cached_keys()
    assert engine.cache.used_blocks == 0
