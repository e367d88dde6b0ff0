"""Block hashing: chaining, incremental extension, namespaces, packing, bad input."""

from __future__ import annotations

import struct

import pytest
import xxhash
from hypothesis import given
from hypothesis import strategies as st

from policies.kv.hashing import BlockHasher, Namespace, pack_tokens

token_lists = st.lists(st.integers(min_value=0, max_value=2**32 - 1), max_size=200)
block_sizes = st.integers(min_value=1, max_value=32)


def reference_hashes(namespace: Namespace, block_size: int, tokens: list[int]) -> list[int]:
    """The documented scheme written out independently: xxh3_64 over little-endian uint32
    token ids of each full block, seeded by the previous block's hash (block 0: the root)."""
    h = namespace.root_hash(block_size)
    out = []
    for start in range(0, len(tokens) - block_size + 1, block_size):
        block = tokens[start : start + block_size]
        h = xxhash.xxh3_64_intdigest(struct.pack(f"<{len(block)}I", *block), seed=h)
        out.append(h)
    return out


@given(tokens=token_lists, block_size=block_sizes)
def test_matches_the_documented_scheme(tokens: list[int], block_size: int) -> None:
    ns = Namespace("m")
    assert list(BlockHasher(ns, block_size).hash_tokens(tokens)) == reference_hashes(
        ns, block_size, tokens
    )


@given(tokens=token_lists, block_size=block_sizes, cut_blocks=st.integers(0, 20))
def test_extend_continues_a_chain(tokens: list[int], block_size: int, cut_blocks: int) -> None:
    hasher = BlockHasher(Namespace("m"), block_size)
    whole = hasher.hash_tokens(tokens)
    cut = min(cut_blocks, len(tokens) // block_size) * block_size
    head = hasher.hash_tokens(tokens[:cut])
    tail = hasher.extend(head[-1] if head else None, tokens[cut:])
    assert head + tail == whole
    assert len(whole) == len(tokens) // block_size


@given(tokens=token_lists, block_size=block_sizes, n=st.integers(0, 200))
def test_a_prefix_hashes_to_a_prefix(tokens: list[int], block_size: int, n: int) -> None:
    hasher = BlockHasher(Namespace("m"), block_size)
    whole = hasher.hash_tokens(tokens)
    part = hasher.hash_tokens(tokens[:n])
    assert whole[: len(part)] == part


@given(
    tokens=st.lists(st.integers(0, 1000), min_size=8, max_size=64),
    position=st.integers(0, 63),
)
def test_a_changed_token_changes_its_block_and_every_later_one(
    tokens: list[int], position: int
) -> None:
    hasher = BlockHasher(Namespace("m"), 4)
    position %= len(tokens) // 4 * 4
    changed = list(tokens)
    changed[position] += 1
    a, b = hasher.hash_tokens(tokens), hasher.hash_tokens(changed)
    block = position // 4
    assert a[:block] == b[:block]
    assert all(x != y for x, y in zip(a[block:], b[block:], strict=True))


namespaces = st.builds(
    Namespace,
    model=st.sampled_from(["llama-8b", "llama-8b ", "qwen", ""]),
    lora=st.sampled_from([None, "", "sql-adapter", "llama-8b"]),
    cache_salt=st.sampled_from([None, "", "tenant-a", "tenant-b"]),
)


@given(a=namespaces, b=namespaces, tokens=st.lists(st.integers(0, 50), min_size=16, max_size=64))
def test_namespaces_never_share_a_chain(a: Namespace, b: Namespace, tokens: list[int]) -> None:
    ha = BlockHasher(a, 16).hash_tokens(tokens)
    hb = BlockHasher(b, 16).hash_tokens(tokens)
    if a == b:
        assert ha == hb
    else:
        assert not set(ha) & set(hb)


def test_block_size_is_part_of_the_namespace() -> None:
    tokens = list(range(64))
    ns = Namespace("m")
    assert not set(BlockHasher(ns, 16).hash_tokens(tokens)) & set(
        BlockHasher(ns, 32).hash_tokens(tokens)
    )


def test_partial_tail_is_not_hashed() -> None:
    hasher = BlockHasher(Namespace("m"), 16)
    assert hasher.hash_tokens(list(range(15))) == ()
    assert len(hasher.hash_tokens(list(range(47)))) == 2


@pytest.mark.parametrize(
    "tokens", [[-1, 2, 3, 4], [2**32, 1, 1, 1], ["a", 1, 1, 1]], ids=["negative", "too-big", "str"]
)
def test_bad_token_ids_raise_value_error(tokens: list[object]) -> None:
    with pytest.raises(ValueError, match="token ids"):
        BlockHasher(Namespace("m"), 4).hash_tokens(tokens)  # type: ignore[arg-type]


def test_block_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="block_size"):
        BlockHasher(Namespace("m"), 0)


def test_packing_is_little_endian_uint32() -> None:
    assert pack_tokens([1, 258]) == b"\x01\x00\x00\x00\x02\x01\x00\x00"
