"""The index image (``policies.kv.snapshot``), its wire format (``router.kv.snapshot``) and
``sync.warm_start``'s config errors: an index restored from a sibling's image answers every
match as the sibling does and goes on resolving the engine's later events the same way;
malformed snapshots are refused whole; bad config names its key."""

from __future__ import annotations

import random
from typing import Any

import msgpack
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from test_index import HASHER, new_index, ops, run, tokens_of

from policies.kv import snapshot as image
from policies.kv.events import BlockRemoved, BlockStored, KvEvent
from policies.kv.hashing import BlockHasher, Namespace
from policies.kv.index import PrefixIndex
from router.config import ConfigError, parse_config
from router.kv.snapshot import Snapshot, SnapshotError, StreamPosition, decode, encode

BS = 4


def chain_events(rng: random.Random, n_chains: int) -> tuple[list[tuple[str, KvEvent]],
                                                              list[list[int]]]:
    """Stored chains on two backends (some offloaded to CPU, some remote/shared, one an
    orphan), then removals: what engines send."""
    events: list[tuple[str, KvEvent]] = []
    prompts = []
    for c in range(n_chains):
        tokens = [rng.randrange(1000) for _ in range(BS * rng.randint(1, 6))]
        prompts.append(tokens)
        backend = rng.choice("ab")
        engine = [hash((backend, c, i)) & 0xFFFF_FFFF_FFFF_FFFF
                  for i in range(len(tokens) // BS)]
        events.append((backend, BlockStored(tuple(engine), None, tuple(tokens), BS)))
        if rng.random() < 0.3:
            events.append((backend, BlockStored(tuple(engine[:1]), None, (), 0, medium="CPU")))
        if rng.random() < 0.2:
            events.append((backend, BlockStored(tuple(engine), None, tuple(tokens), BS,
                                                locality="REMOTE")))
        if rng.random() < 0.3:
            events.append((backend, BlockRemoved((engine[-1],))))
    events.append(("a", BlockStored((77,), 12345, tuple(range(BS)), BS)))  # an orphan
    return events, prompts


def fed(events: list[tuple[str, KvEvent]], max_entries: int = 10_000) -> PrefixIndex:
    index = PrefixIndex(max_entries)
    for backend in "ab":
        index.set_backend_model(backend, "m")
    for backend, event in events:
        index.apply(backend, event, 0.0)
    return index


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_restored_index_matches_and_follows_later_events_like_the_original(seed: int) -> None:
    rng = random.Random(seed)
    events, prompts = chain_events(rng, 40)
    split = len(events) * 2 // 3
    original = fed(events[:split])
    taken = image.take(original)
    restored = PrefixIndex()
    assert set(image.restore(restored, taken)) == {"a", "b"}
    # The image is cheap to check against its own count and the index's.
    assert taken.entries == original.entries == restored.entries
    hasher = BlockHasher(Namespace("m"), BS)
    chains = [hasher.hash_tokens(p) for p in prompts]
    assert [restored.match(c) for c in chains] == [original.match(c) for c in chains]
    # The engines go on: removals and children of restored blocks resolve the same way.
    for backend, event in events[split:]:
        original.apply(backend, event, 0.0)
        restored.apply(backend, event, 0.0)
    assert [restored.match(c) for c in chains] == [original.match(c) for c in chains]
    assert restored.entries == original.entries


@settings(max_examples=60, deadline=None)
# The LRU order must survive: the chain's tail goes first when the next store overflows.
@example(script=[("store", "a", [0, 0, 0], "GPU"), ("store", "a", [1, 0], "GPU")], cut_at=1,
         with_tokens=False, budget=4)
@given(script=ops, cut_at=st.integers(0, 25), with_tokens=st.booleans(),
       budget=st.integers(4, 60))
def test_a_restored_index_stays_the_originals_twin(
    script: list[tuple[object, ...]], cut_at: int, with_tokens: bool, budget: int
) -> None:
    """Property: restore(take(index)) answers every match as the index does, and the two
    stay equal under any later events (removals, clears, dropped backends, LRU evictions)."""
    original = new_index(max_entries=budget)
    run(original, script[:cut_at], with_tokens)
    twin = new_index(max_entries=budget)  # the router sets models as backends appear
    image.restore(twin, image.take(original))
    for index in (original, twin):
        run(index, script[cut_at:], with_tokens)
    queries = [[x] * 6 for x in range(3)] + [list(op[2]) for op in script  # type: ignore[call-overload]
                                             if op[0] in ("store", "remove")]
    for letters in queries:
        chain = HASHER.hash_tokens(tokens_of(letters))
        assert twin.match(chain) == original.match(chain), letters
    assert twin.entries == original.entries


def test_restore_leaves_backends_the_index_already_follows_alone() -> None:
    events, _ = chain_events(random.Random(4), 10)
    taken = image.take(fed(events))
    live = PrefixIndex()
    live.set_backend_model("a", "m")
    live.apply("a", BlockStored((1,), None, (1, 2, 3, 4), BS), 0.0)
    assert image.restore(live, taken) == ("b",)
    assert live.backend_entries("a") == 1


def test_wire_round_trip() -> None:
    events, prompts = chain_events(random.Random(5), 20)
    index = fed(events)
    positions = (StreamPosition("a", "kv@a", 0, 17, 1.5), StreamPosition("b", "", 1, 0, -1.0))
    data = encode(Snapshot("r1", 1000.0, image.take(index), positions))
    back = decode(data)
    assert (back.replica, back.taken_at_s, back.streams) == ("r1", 1000.0, positions)
    again = PrefixIndex()
    image.restore(again, back.image)
    hasher = BlockHasher(Namespace("m"), BS)
    assert all(again.match(hasher.hash_tokens(p)) == index.match(hasher.hash_tokens(p))
               for p in prompts)


def _valid() -> dict[str, Any]:
    events, _ = chain_events(random.Random(6), 5)
    raw = msgpack.unpackb(encode(Snapshot("r", 1.0, image.take(fed(events)), ())), raw=False)
    assert isinstance(raw, dict)
    return raw


@pytest.mark.parametrize("change, problem", [
    (lambda r: r.update(format="other"), "not a kvrouter-index-snapshot"),
    (lambda r: r.update(version=2), "version 2"),
    (lambda r: r.update(blocks=b"\x00" * 7), "blocks: 7 bytes"),
    (lambda r: r["backends"][0].update(tiers=b"\x01"), "positions but"),
    (lambda r: r["backends"][0].update(tiers=b"\x09" * len(r["backends"][0]["tiers"])),
     "tier bits must be 1..7"),
    (lambda r: r.update(blocks=b""), "past the 0 blocks"),
    (lambda r: r["backends"].append(dict(r["backends"][0])), "appears twice"),
    (lambda r: r.update(streams=[{"backend": "a", "topic": "", "rank": 0, "next_seq": -1,
                                  "last_ts": 0.0}]), "streams[0]"),
    (lambda r: r.update(backends=None), "backends: expected a list"),
], ids=["format", "version", "bytes", "lengths", "tiers", "positions", "twice", "stream",
        "backends"])
def test_malformed_snapshots_are_refused(change: Any, problem: str) -> None:
    raw = _valid()
    change(raw)
    with pytest.raises(SnapshotError, match=problem.replace("[", r"\[").replace("]", r"\]")):
        decode(msgpack.packb(raw, use_bin_type=True))
    with pytest.raises(SnapshotError, match="not msgpack"):
        decode(b"\xc1")


@pytest.mark.parametrize("raw, path", [
    ({"sync": {"warm_start": {"enabled": True, "urls": ["http://a:1"]}}},
     "sync.warm_start.enabled"),
    ({"server": {"admin_token": "t"}, "sync": {"warm_start": {"enabled": True}}},
     "sync.warm_start.urls"),
    ({"sync": {"warm_start": {"urls": ["a:1"]}}}, "sync.warm_start.urls[0]"),
    ({"sync": {"warm_start": {"timeout_s": 0}}}, "sync.warm_start.timeout_s"),
    ({"sync": {"warm_start": {"http_port": 70000}}}, "sync.warm_start.http_port"),
    ({"sync": {"warm_start": {"from": "peers"}}}, "sync.warm_start.from"),
], ids=["no-token", "no-siblings", "url", "timeout", "port", "unknown"])
def test_warm_start_config_errors_name_the_key(raw: dict[str, Any], path: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(raw)
    assert str(caught.value).startswith(path), str(caught.value)
