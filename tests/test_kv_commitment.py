"""KvCommitment: uncached blocks committed once per backend (refcounted by chained block hash),
per-request tails and output, and finishes that remove exactly what dispatches added."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.kv_commitment import KvCommitment
from policies.types import BackendState

BS = 16
CAP = 100  # output tokens committed per request, at most


def chain(group: int, blocks: int, unique_from: int | None = None, suffix: int = 0
          ) -> tuple[int, ...]:
    """Chained hashes of ``blocks`` blocks: group ``group``'s prefix, then (from block
    ``unique_from``) blocks unique to ``suffix``; a chain differs from its first unique block."""
    cut = blocks if unique_from is None else unique_from
    return tuple(group * 1_000_000 + i for i in range(cut)) + tuple(
        group * 1_000_000 + suffix * 1000 + 500 + i for i in range(cut, blocks))


# Each request: (request id, block hashes, prompt tokens, uncached tokens, max tokens).
Request = tuple[str, tuple[int, ...], int, float, int]


@pytest.mark.parametrize(
    ("requests", "committed"),
    [
        ([("a", chain(1, 10), 160, 160.0, 10)], 170.0),
        # Two of one group, 8 shared blocks, 2 blocks each their own: 8 + 2 + 2 blocks.
        ([("a", chain(1, 10, 8, 1), 160, 160.0, 10), ("b", chain(1, 10, 8, 2), 160, 160.0, 10)],
         12 * BS + 20.0),
        # Five identical prompts: their blocks once, each one's output.
        ([(f"r{i}", chain(1, 10), 160, 160.0, 10) for i in range(5)], 160.0 + 50.0),
        # The second found 6 blocks cached: it commits 4 of its blocks, 2 of them shared.
        ([("a", chain(1, 10, 8, 1), 160, 160.0, 10), ("b", chain(1, 10, 8, 2), 160, 64.0, 10)],
         12 * BS + 20.0),
        # 5 tokens past the last full block: each request's own (engines share full blocks only).
        ([("a", chain(1, 10), 165, 165.0, 10), ("b", chain(1, 10), 165, 165.0, 10)],
         160.0 + 2 * 5 + 20.0),
        # A tier-priced hit of 100.5 tokens: blocks 6..9, block 6 for its uncached 11.5 tokens.
        ([("a", chain(1, 10), 160, 59.5, 10)], 59.5 + 10.0),
        # Output counted up to the cap, per request.
        ([("a", chain(1, 10), 160, 160.0, 5000), ("b", chain(1, 10), 160, 160.0, 5000)],
         160.0 + 2 * CAP),
        # No block hashes: the uncached tokens, per request.
        ([("a", (), 300, 300.0, 10), ("b", (), 300, 300.0, 10)], 620.0),
    ],
    ids=["alone", "shared-prefix", "same-prompt", "partly-cached", "partial-last-block",
         "fractional-hit", "output-cap", "unhashed"],
)
def test_commits_each_uncached_block_once_per_backend(
    requests: list[Request], committed: float
) -> None:
    kv = KvCommitment(CAP)
    for request_id, hashes, prompt, uncached, max_tokens in requests:
        kv.add("b0", request_id, hashes, BS, prompt, uncached, max_tokens)
    assert kv.committed("b0") == pytest.approx(committed)
    assert kv.committed("b1") == 0.0
    for request_id, hashes, *_ in requests:
        kv.remove("b0", request_id, hashes)
    assert kv.committed("b0") == 0.0


def test_a_block_is_committed_once_per_backend_not_once_per_fleet() -> None:
    kv = KvCommitment(CAP)
    kv.add("b0", "a", chain(1, 10), BS, 160, 160.0, 0)
    kv.add("b1", "b", chain(1, 10), BS, 160, 160.0, 0)
    assert kv.committed("b0") == kv.committed("b1") == 160.0


def test_a_shared_block_leaves_with_its_last_request() -> None:
    kv = KvCommitment(CAP)
    first, second = chain(1, 10, 8, 1), chain(1, 10, 8, 2)
    kv.add("b0", "a", first, BS, 160, 160.0, 10)
    kv.add("b0", "b", second, BS, 160, 160.0, 10)
    kv.remove("b0", "a", first)
    # What remains is exactly what b alone commits: its blocks (the shared 8 among them).
    assert kv.committed("b0") == 160.0 + 10.0
    kv.remove("b0", "a", first)  # finished twice: nothing more to remove
    assert kv.committed("b0") == 170.0


def test_a_finish_removes_the_tokens_its_block_was_added_with() -> None:
    # a finds block 6 priced half hit (8 of its tokens uncached); b then needs all of it.
    # The block stays at the 8 tokens it was added with, and leaves with them.
    kv = KvCommitment(CAP)
    hashes = chain(1, 10)
    kv.add("b0", "a", hashes, BS, 160, 56.0, 0)
    kv.add("b0", "b", hashes, BS, 160, 160.0, 0)
    assert kv.committed("b0") == 56.0 + 6 * BS
    kv.remove("b0", "a", hashes)
    assert kv.committed("b0") == 56.0 + 6 * BS
    kv.remove("b0", "b", hashes)
    assert kv.committed("b0") == 0.0


def test_requests_sharing_an_id_each_remove_their_own_blocks() -> None:
    kv = KvCommitment(CAP)
    one, other = chain(1, 4), chain(2, 10)
    kv.add("b0", "dup", one, BS, 64, 64.0, 0)
    kv.add("b0", "dup", other, BS, 160, 160.0, 0)
    kv.remove("b0", "dup", other)
    assert kv.committed("b0") == 64.0
    kv.remove("b0", "dup", one)
    assert kv.committed("b0") == 0.0


def test_a_removed_backend_forgets_its_commitments_and_their_late_finishes() -> None:
    kv = KvCommitment(CAP)
    old = chain(1, 10)
    kv.add("b0", "old", old, BS, 160, 160.0, 10)
    kv.remove_backend("b0")
    assert kv.committed("b0") == 0.0
    kv.add("b0", "new", old, BS, 160, 160.0, 10)  # back, and sent the same prefix again
    kv.remove("b0", "old", old)  # the old request's finish arrives late: not this one's blocks
    assert kv.committed("b0") == 170.0


def test_has_room_within_the_ratio_of_kv_memory() -> None:
    kv = KvCommitment(CAP)
    backend = BackendState(backend_id="b0", total_kv_blocks=100)  # 1,600 tokens
    assert kv.has_room(backend, 5000, BS, 0.5)  # nothing committed: always room
    for i in range(4):
        kv.add("b0", f"r{i}", chain(1, 40, 38, i), BS, 640, 640.0, 0)
    assert kv.committed("b0") == 38 * BS + 4 * 2 * BS  # 736
    assert kv.has_room(backend, 64, BS, 0.5)
    assert not kv.has_room(backend, 65, BS, 0.5)
    assert kv.has_room(BackendState(backend_id="b0"), 10_000, BS, 0.5)  # KV size unknown


_REQUESTS = st.lists(
    st.tuples(st.integers(0, 2), st.integers(1, 6), st.integers(0, 6), st.integers(0, 3),
              st.integers(0, 20), st.floats(0.0, 1.0), st.sampled_from(["b0", "b1"])),
    min_size=1, max_size=12)


@settings(max_examples=200, deadline=None)
@given(_REQUESTS, st.randoms(use_true_random=False))
def test_finishes_in_any_order_remove_exactly_what_dispatches_added(
    requests: list[tuple[int, int, int, int, int, float, str]], rng: object
) -> None:
    kv = KvCommitment(CAP)
    sent = []
    for n, (group, blocks, unique_from, suffix, tail, hit_share, backend) in enumerate(requests):
        hashes = chain(group, blocks, min(unique_from, blocks), suffix)
        prompt = blocks * BS + tail
        uncached = prompt - hit_share * (blocks - 1) * BS
        kv.add(backend, f"r{n % 4}", hashes, BS, prompt, uncached, 50)
        sent.append((backend, f"r{n % 4}", hashes, prompt, uncached))
        # Never more than counting each request's uncached tokens; its output always counts.
        assert kv.committed(backend) <= sum(u + 50 for b, *_, u in sent if b == backend) + 1e-6
        assert kv.committed(backend) >= 50 * sum(1 for b, *_ in sent if b == backend)
    rng.shuffle(sent)  # type: ignore[attr-defined]
    for backend, request_id, hashes, _prompt, _uncached in sent:
        kv.remove(backend, request_id, hashes)
        assert kv.committed(backend) >= 0.0
    assert kv.committed("b0") == kv.committed("b1") == 0.0


def chained(group: int, blocks: int, unique_from: int, suffix: int) -> tuple[int, ...]:
    """As ``chain``, but each hash covers its whole prefix, as engines' block hashes do (two
    chains that differ at one block differ at every later one)."""
    hashes, parent = [], group
    for i in range(blocks):
        parent = hash((parent, i) if i < unique_from else (parent, i, suffix))
        hashes.append(parent)
    return tuple(hashes)


@settings(max_examples=200, deadline=None)
@given(_REQUESTS, st.integers(0, 3), st.integers(1, 12), st.integers(0, 12), st.integers(0, 3),
       st.randoms(use_true_random=False))
def test_in_flight_blocks_and_shared_prefix_match_a_brute_force_over_the_chains(
    requests: list[tuple[int, int, int, int, int, float, str]], group: int, blocks: int,
    unique_from: int, suffix: int, rng: object
) -> None:
    # What admission needs: the distinct prompt blocks in flight on a backend (cached or not:
    # a hit's blocks are in use too), and the longest prefix a new chain shares with one of
    # them (blocks the engine need not take from its free KV again).
    kv = KvCommitment(CAP)
    live: list[tuple[str, str, tuple[int, ...]]] = []
    for n, (g, b, u, s, tail, hit_share, backend) in enumerate(requests):
        hashes = chained(g, b, min(u, b), s)
        prompt = b * BS + tail
        kv.add(backend, f"r{n}", hashes, BS, prompt, prompt - hit_share * (b - 1) * BS, 50)
        live.append((backend, f"r{n}", hashes))
    rng.shuffle(live)  # type: ignore[attr-defined]
    finished, live = live[: len(live) // 3], live[len(live) // 3:]
    for backend, request_id, hashes in finished:
        kv.remove(backend, request_id, hashes)
    probe = chained(group, blocks, min(unique_from, blocks), suffix)

    def shared(a: tuple[int, ...], b: tuple[int, ...]) -> int:
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return n

    for backend in ("b0", "b1"):
        chains = [h for b, _, h in live if b == backend]
        assert kv.in_flight_blocks(backend) == len({x for h in chains for x in h})
        assert kv.in_flight_prefix_blocks(backend, probe) == max(
            (shared(h, probe) for h in chains), default=0)
    assert kv.in_flight_blocks("elsewhere") == kv.in_flight_prefix_blocks("elsewhere", probe) == 0


def test_peers_commitments_count_in_room_but_not_in_what_is_shared() -> None:
    """A replica shares its own committed tokens (policies.kv.peers); its peers' sums count
    in ``committed`` and ``has_room``, never in what it shares."""
    kv = KvCommitment(CAP)
    kv.add("b", "r1", chain(1, 4), BS, 4 * BS + 3, 4 * BS + 3, max_tokens=500)  # cold
    kv.add("b", "r2", chain(1, 4), BS, 4 * BS + 3, 3, max_tokens=20)  # its prefix hit
    own = 4 * BS + 3 + CAP + 3 + 20
    assert kv.own_committed("b") == own
    kv.set_peers({"b": 1000.0})
    assert kv.committed("b") == own + 1000 and kv.own_committed("b") == own
    full = BackendState(backend_id="b", total_kv_blocks=100, kv_usage_ratio=0.0)
    assert not kv.has_room(full, 500, BS, 1.0)  # 1,190 + 500 > 1,600: the peers' 1,000 count
    kv.set_peers({})
    assert kv.has_room(full, 500, BS, 1.0)
    kv.remove("b", "r1", chain(1, 4))
    kv.remove("b", "r2", chain(1, 4))
    assert kv.own_committed("b") == 0.0
