"""PrefixIndex: engine events (with and without token ids), tiers, orphans, approximate mode,
LRU budget, and hypothesis properties against a brute-force reference model."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.kv.events import AllBlocksCleared, BlockRemoved, BlockStored
from policies.kv.hashing import BlockHasher, Namespace
from policies.kv.index import PrefixIndex, Tier, tier_of_medium

BS = 4
HASHER = BlockHasher(Namespace("m"), BS)
ENGINE_XOR = 0x5A5A5A5A  # engine hashes differ from router hashes, as in vLLM


def tokens_of(letters: Sequence[int]) -> list[int]:
    return [letter for letter in letters for _ in range(BS)]


def engine(h: int) -> int:
    return h ^ ENGINE_XOR


def stored(letters: Sequence[int], start: int = 0, medium: str = "GPU") -> BlockStored:
    """The event an engine sends after caching blocks ``start..`` of prompt ``letters``."""
    router = HASHER.hash_tokens(tokens_of(letters))
    return BlockStored(
        block_hashes=tuple(engine(h) for h in router[start:]),
        parent_block_hash=engine(router[start - 1]) if start else None,
        token_ids=tuple(tokens_of(letters[start:])),
        block_size=BS,
        medium=medium,
    )


def new_index(max_entries: int = 1_000_000) -> PrefixIndex:
    index = PrefixIndex(max_entries=max_entries)
    for backend in "abcd":
        index.set_backend_model(backend, "m")
    return index


def test_token_ids_are_rehashed_with_the_router_namespace_and_chained() -> None:
    index = new_index()
    prompt = [1, 2, 3, 4, 5]
    router = HASHER.hash_tokens(tokens_of(prompt))
    assert index.apply("a", stored(prompt[:3]), 0.0) == router[:3]
    assert index.apply("a", stored(prompt, start=3), 0.0) == router[3:]
    found = index.match(router)
    assert found["a"].matched_blocks == 5 and found["a"].gpu_blocks == 5


def test_events_without_token_ids_use_engine_hashes_as_router_hashes() -> None:
    index = PrefixIndex()
    router = HASHER.hash_tokens(tokens_of([7, 8, 9]))
    index.apply("sim-0", BlockStored(router, None, (), BS), 0.0)
    assert index.match(router)["sim-0"].matched_blocks == 3
    index.apply("sim-0", BlockRemoved(router[1:2]), 0.0)
    assert index.match(router)["sim-0"].matched_blocks == 1


def test_match_stops_at_the_first_missing_block_per_backend() -> None:
    index = new_index()
    index.apply("a", stored([1, 2, 3, 4]), 0.0)
    index.apply("b", stored([1, 2]), 0.0)
    index.apply("c", stored([9, 9]), 0.0)
    found = index.match(HASHER.hash_tokens(tokens_of([1, 2, 3, 7])))
    assert {k: v.matched_blocks for k, v in found.items()} == {"a": 3, "b": 2}


@pytest.mark.parametrize(
    ("medium", "tier"),
    [("GPU", Tier.GPU), ("CPU", Tier.CPU), ("cpu", Tier.CPU), ("DISK", Tier.STORAGE),
     ("LMCACHE", Tier.STORAGE)],
    ids=["gpu", "cpu", "cpu-lower", "disk", "lmcache"],
)
def test_medium_maps_to_tier(medium: str, tier: Tier) -> None:
    assert tier_of_medium(medium) is tier


def test_tiers_count_each_block_in_its_best_tier() -> None:
    index = new_index()
    prompt = [1, 2, 3, 4]
    router = HASHER.hash_tokens(tokens_of(prompt))
    index.apply("a", stored(prompt, medium="CPU"), 0.0)
    index.apply("a", stored(prompt[:1]), 0.0)
    index.apply("a", stored(prompt, start=3, medium="DISK"), 0.0)
    m = index.match(router)["a"]
    assert (m.matched_blocks, m.gpu_blocks, m.cpu_blocks, m.storage_blocks) == (4, 1, 3, 0)
    assert index.entries == 4  # tiers of one (block, backend) pair count once
    index.apply("a", BlockRemoved((engine(router[0]),), medium="GPU"), 0.0)
    m = index.match(router)["a"]
    assert (m.gpu_blocks, m.cpu_blocks) == (0, 4)
    index.apply("a", BlockRemoved(tuple(engine(h) for h in router), medium="CPU"), 0.0)
    assert "a" not in index.match(router)
    assert index.entries == 1  # block 3 is still on disk
    assert index.match(router[3:])["a"].storage_blocks == 1


def test_orphans_are_counted_and_never_indexed_nor_their_descendants() -> None:
    index = new_index()
    prompt = [1, 2, 3, 4, 5]
    index.apply("a", stored(prompt, start=2), 0.0)  # parent block 1 never announced
    index.apply("a", BlockStored((777,), engine(HASHER.hash_tokens(tokens_of(prompt))[-1]),
                                 tuple(tokens_of([6])), BS), 0.0)
    assert index.orphan_events == 2
    assert index.entries == 0
    assert index.match(HASHER.hash_tokens(tokens_of([*prompt, 6]))) == {}
    # Removals of orphan blocks resolve through the engine map instead of counting as unknown.
    index.apply("a", BlockRemoved((777,)), 0.0)
    assert index.unknown_removals == 0


def test_malformed_token_count_stores_the_covered_blocks() -> None:
    index = new_index()
    event = stored([1, 2, 3])
    short = BlockStored(event.block_hashes, None, event.token_ids[: 2 * BS + 1], BS)
    assert len(index.apply("a", short, 0.0)) == 2
    assert index.malformed_events == 1
    extra = BlockStored(event.block_hashes[:1], None, event.token_ids, BS)
    assert index.apply("b", extra, 0.0) == HASHER.hash_tokens(tokens_of([1]))
    assert index.malformed_events == 2


def test_token_ids_without_a_model_raise_a_clear_error() -> None:
    with pytest.raises(ValueError, match="set_backend_model"):
        PrefixIndex().apply("x", stored([1]), 0.0)


def test_all_blocks_cleared_clears_only_that_backend() -> None:
    index = new_index()
    for backend in "ab":
        index.apply(backend, stored([1, 2]), 0.0)
    index.apply("a", AllBlocksCleared(), 0.0)
    assert set(index.match(HASHER.hash_tokens(tokens_of([1, 2])))) == {"b"}
    assert index.entries == 2 and index.backend_entries("a") == 0


def test_approximate_records_expire_and_respect_capacity() -> None:
    index = PrefixIndex()
    chain = HASHER.hash_tokens(tokens_of([1, 2, 3, 4]))
    index.record_dispatch("x", chain[:2], now_s=0.0, ttl_s=10.0)
    index.record_dispatch("x", chain, now_s=5.0, ttl_s=10.0)
    assert index.match(chain, now_s=9.0)["x"].matched_blocks == 4
    index.record_dispatch("x", chain[:1], now_s=12.0, ttl_s=10.0)
    # Blocks 1-3 were last sent at t=5 and expire at 15; block 0 was refreshed at 12.
    assert index.match(chain, now_s=16.0)["x"].matched_blocks == 1
    assert "x" not in index.match(chain, now_s=23.0)
    other = HASHER.hash_tokens(tokens_of([9, 9, 9, 9, 9, 9]))
    index.record_dispatch("x", other, now_s=30.0, ttl_s=10.0, capacity_blocks=4)
    assert index.backend_entries("x") <= 4
    assert index.match(other, now_s=31.0)["x"].matched_blocks >= 1  # the head survives


def test_expiry_and_the_capacity_bound_drop_the_oldest_records_in_recording_order() -> None:
    index = PrefixIndex()
    a = HASHER.hash_tokens(tokens_of([10, 11]))
    b = HASHER.hash_tokens(tokens_of([20, 21, 22]))
    c = HASHER.hash_tokens(tokens_of([30, 31]))
    d = HASHER.hash_tokens(tokens_of([40]))
    index.record_dispatch("x", a, now_s=0.0, ttl_s=10.0)
    index.record_dispatch("x", b, now_s=5.0, ttl_s=10.0)
    # At t=12 a's two records have expired and b's have not: exactly a's leave the index.
    index.record_dispatch("x", c, now_s=12.0, ttl_s=10.0)
    assert index.expired_entries == 2
    assert index.backend_entries("x") == 5 and index.entries == 5
    assert "x" not in index.match(a) and index.match(b)["x"].matched_blocks == 3
    # A chain is recorded deepest block first, so the bound (low water 4 of 5) drops b's two
    # deeper blocks and keeps its head. The expiry check must have left b's deepest block,
    # the first live record, in front: had it gone behind, b's head would be dropped.
    index.record_dispatch("x", d, now_s=13.0, ttl_s=10.0, capacity_blocks=5)
    assert index.backend_entries("x") == 4 and index.entries == 4
    assert index.match(b, now_s=13.0)["x"].matched_blocks == 1
    assert index.match(c, now_s=13.0)["x"].matched_blocks == 2
    assert index.match(d, now_s=13.0)["x"].matched_blocks == 1


class _RecordsModel:
    """Approximate-mode records as one ordered dict: each block at the place of its latest
    record (a record stores its chain deepest block first), expired ones dropped from the
    front before each record (at most 64), then the capacity bound drops the oldest."""

    def __init__(self) -> None:
        self.expiry: dict[int, float] = {}  # insertion order is the drop order
        self.expired = 0

    def record(self, chain: list[int], now_s: float, ttl_s: float, capacity: int | None) -> None:
        old = [h for h, e in self.expiry.items() if e <= now_s][:64]
        old = old[:next((i for i, h in enumerate(self.expiry) if self.expiry[h] > now_s),
                        len(self.expiry))]
        for h in old:
            del self.expiry[h]
        self.expired += len(old)
        for h in reversed(chain):
            self.expiry.pop(h, None)
            self.expiry[h] = now_s + ttl_s
        if capacity is not None and len(self.expiry) > capacity:
            low = capacity - max(1, capacity // 16)
            for h in list(self.expiry)[: len(self.expiry) - low]:
                del self.expiry[h]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.integers(1, 6), st.integers(0, 3),
                          st.sampled_from([None, 5, 9, 20])), min_size=1, max_size=40))
def test_dispatch_records_drop_in_the_order_of_each_blocks_latest_record(
    steps: list[tuple[int, int, int, int | None]]
) -> None:
    # Chains are prefixes of 5 paths, so records overlap; time moves by 0-3 s a step, each
    # record lives 4 s, and some steps bound the backend's records.
    index = PrefixIndex()
    model = _RecordsModel()
    now = 0.0
    blocks = [[1000 * p + i for i in range(6)] for p in range(5)]
    for path, depth, dt, capacity in steps:
        now += dt
        chain = blocks[path][:depth]
        index.record_dispatch("x", chain, now_s=now, ttl_s=4.0, capacity_blocks=capacity)
        model.record(chain, now, 4.0, capacity)
        assert index.backend_entries("x") == len(model.expiry)
        assert index.expired_entries == model.expired
        for h in (b for path_blocks in blocks for b in path_blocks):
            assert index.recorded_until("x", h) == model.expiry.get(h)


def test_events_take_over_from_dispatch_records() -> None:
    index = new_index()
    chain = HASHER.hash_tokens(tokens_of([1, 2]))
    index.record_dispatch("a", chain, now_s=0.0, ttl_s=100.0)
    index.apply("a", stored([5]), 1.0)
    assert "a" not in index.match(chain, now_s=2.0)
    index.record_dispatch("a", chain, now_s=3.0, ttl_s=100.0)
    assert "a" not in index.match(chain, now_s=4.0)


def test_lru_evicts_the_tail_of_an_old_chain_first() -> None:
    index = new_index(max_entries=16)
    old = [1, 2, 3, 4, 5, 6, 7, 8]
    index.apply("a", stored(old), 0.0)
    index.apply("a", stored([9, 9, 9, 9, 9, 9, 9, 9, 9]), 1.0)
    assert index.entries <= 16
    kept = index.match(HASHER.hash_tokens(tokens_of(old))).get("a")
    assert kept is not None and 0 < kept.matched_blocks < 8
    assert index.evicted_entries == 17 - index.entries


# ---- properties against a reference model ---------------------------------------------------

prompts = st.lists(st.integers(0, 2), min_size=1, max_size=6)
ops = st.lists(
    st.one_of(
        st.tuples(st.just("store"), st.sampled_from("abc"), prompts,
                  st.sampled_from(["GPU", "CPU", "DISK"])),
        st.tuples(st.just("remove"), st.sampled_from("abc"), prompts, st.integers(0, 5),
                  st.sampled_from(["GPU", "CPU", "DISK"])),
        st.tuples(st.just("clear"), st.sampled_from("abc")),
        st.tuples(st.just("drop"), st.sampled_from("abc")),
    ),
    max_size=25,
)
Reference = dict[tuple[str, int], set[Tier]]


def run(index: PrefixIndex, script: list[tuple[object, ...]], with_tokens: bool) -> Reference:
    held: Reference = {}
    for op in script:
        kind, backend = op[0], str(op[1])
        if kind == "store":
            letters, medium = list(op[2]), str(op[3])  # type: ignore[call-overload]
            router = HASHER.hash_tokens(tokens_of(letters))
            event = (stored(letters, medium=medium) if with_tokens
                     else BlockStored(router, None, (), BS, medium=medium))
            index.apply(backend, event, 0.0)
            for h in router:
                held.setdefault((backend, h), set()).add(tier_of_medium(medium))
        elif kind == "remove":
            letters, start, medium = list(op[2]), int(op[3]), str(op[4])  # type: ignore[call-overload]
            router = HASHER.hash_tokens(tokens_of(letters))[start:]
            index.apply(backend, BlockRemoved(
                tuple(engine(h) if with_tokens else h for h in router), medium), 0.0)
            for h in router:
                tiers = held.get((backend, h), set())
                tiers.discard(tier_of_medium(medium))
                if not tiers:
                    held.pop((backend, h), None)
        else:
            if kind == "clear":
                index.apply(backend, AllBlocksCleared(), 0.0)
            else:
                index.remove_backend(backend)
                index.set_backend_model(backend, "m")
            held = {k: v for k, v in held.items() if k[0] != backend}
    return held


def reference_match(held: Reference, chain: Sequence[int]) -> dict[str, tuple[int, int]]:
    out = {}
    for backend in "abc":
        n = gpu = 0
        while n < len(chain) and (backend, chain[n]) in held:
            gpu += Tier.GPU in held[(backend, chain[n])]
            n += 1
        if n:
            out[backend] = (n, gpu)
    return out


@settings(max_examples=60, deadline=None)
@given(script=ops, query=prompts, with_tokens=st.booleans())
def test_match_equals_the_reference_model(
    script: list[tuple[object, ...]], query: list[int], with_tokens: bool
) -> None:
    index = new_index()
    held = run(index, script, with_tokens)
    chain = HASHER.hash_tokens(tokens_of(query))
    got = {k: (v.matched_blocks, v.gpu_blocks) for k, v in index.match(chain).items()}
    assert got == reference_match(held, chain)
    assert index.entries == len(held)
    for k in range(len(chain) + 1):  # monotone: a prefix matches min(k, whole match)
        shorter = index.match(chain[:k])
        for backend, m in index.match(chain).items():
            assert shorter.get(backend) is None if k == 0 else (
                shorter[backend].matched_blocks == min(k, m.matched_blocks))


@settings(max_examples=50, deadline=None)
@given(script=ops, with_tokens=st.booleans())
def test_storing_then_removing_everything_leaves_it_empty(
    script: list[tuple[object, ...]], with_tokens: bool
) -> None:
    index = new_index()
    held = run(index, [op for op in script if op[0] == "store"], with_tokens)
    for (backend, h), tiers in held.items():
        for tier in tiers:
            medium = {Tier.GPU: "GPU", Tier.CPU: "CPU", Tier.STORAGE: "DISK"}[tier]
            index.apply(backend, BlockRemoved((engine(h) if with_tokens else h,), medium), 0.0)
    assert index.entries == 0 and index.stats().blocks == 0
    assert all(not index.match(HASHER.hash_tokens(tokens_of([x] * 6))) for x in range(3))


@settings(max_examples=50, deadline=None)
@given(script=ops, victim=st.sampled_from("abc"))
def test_remove_backend_purges_it(script: list[tuple[object, ...]], victim: str) -> None:
    index = new_index()
    held = run(index, script, with_tokens=True)
    index.remove_backend(victim)
    assert victim not in index.backend_ids()
    assert index.entries == sum(1 for k in held if k[0] != victim)
    for x in range(3):
        for chain in (HASHER.hash_tokens(tokens_of([x] * 6)),):
            assert victim not in index.match(chain)


@settings(max_examples=50, deadline=None)
@given(script=ops, budget=st.integers(1, 12), query=prompts)
def test_lru_budget_holds_and_match_never_invents_blocks(
    script: list[tuple[object, ...]], budget: int, query: list[int]
) -> None:
    index = new_index(max_entries=budget)
    held = run(index, script, with_tokens=True)
    assert index.entries <= budget
    assert index.entries == sum(index.backend_entries(b) for b in index.backend_ids())
    chain = HASHER.hash_tokens(tokens_of(query))
    reference = reference_match(held, chain)
    for backend, m in index.match(chain).items():
        assert m.matched_blocks <= reference[backend][0]


def test_touch_keeps_a_used_chain_through_evictions() -> None:
    index = new_index(max_entries=16)
    used, idle_chain = [1, 1, 1, 1, 1, 1], [2, 2, 2, 2, 2, 2]
    index.apply("a", stored(used), 0.0)
    index.apply("a", stored(idle_chain), 1.0)
    index.touch(HASHER.hash_tokens(tokens_of(used)))  # e.g. after a dispatch that hit it
    index.apply("a", stored([3, 3, 3, 3, 3, 3]), 2.0)
    assert index.match(HASHER.hash_tokens(tokens_of(used)))["a"].matched_blocks == 6
    assert "a" not in index.match(HASHER.hash_tokens(tokens_of(idle_chain))) or (
        index.match(HASHER.hash_tokens(tokens_of(idle_chain)))["a"].matched_blocks < 6)
    stats = index.stats()
    assert stats.entries == index.entries <= 16 and stats.evicted_entries > 0
    assert stats.estimated_bytes > 0


@settings(max_examples=80, deadline=None)
@given(script=ops, records=st.lists(st.tuples(st.sampled_from("abc"), prompts,
                                              st.integers(0, 3)), max_size=8),
       budget=st.integers(4, 40), query=prompts)
def test_a_repeated_match_sees_every_change_since_the_last(
    script: list[tuple[object, ...]], records: list[tuple[str, list[int], int]], budget: int,
    query: list[int]
) -> None:
    """``match`` reuses its last walk of the same tuple while nothing changed: after every
    event, record, eviction and removal it must answer as a fresh walk does (a list is never
    reused)."""
    index = new_index(max_entries=budget)
    chain = tuple(HASHER.hash_tokens(tokens_of(query)))
    steps: list[tuple[object, ...]] = [*script, *(("record", *r) for r in records)]
    for i, op in enumerate(steps):
        now_s = float(i)
        if op[0] == "record":
            letters = list(op[2])  # type: ignore[call-overload]
            index.record_dispatch(f"r{op[1]}", HASHER.hash_tokens(tokens_of(letters)), now_s,
                                  ttl_s=float(op[3]) + 0.5, capacity_blocks=6)
        else:
            run(index, [op], with_tokens=True)
        for at_s in (now_s, now_s + 2.0):
            assert index.match(chain, at_s) == index.match(list(chain), at_s)
