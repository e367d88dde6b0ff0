"""The router's own chained block hashes over token ids (xxh3-64), namespaced per cache.

A prompt of N tokens has ``N // block_size`` full blocks; only full blocks are hashed, as the
engines cache only full blocks. Block ``i``'s hash is ``xxh3_64(tokens of block i, seed=hash of
block i-1)``; block 0 is seeded with the namespace's root hash, so two namespaces (model, LoRA
adapter, ``cache_salt``, block size) never share a chain. Token ids are packed as little-endian
uint32 so the hash does not depend on the host.

API::

    hasher = BlockHasher(Namespace(model="llama-8b", lora=None, cache_salt=None), block_size=16)
    hashes = hasher.hash_tokens(token_ids)                 # tuple[int, ...], one per full block
    more = hasher.extend(hashes[-1], token_ids[len(hashes) * 16:])   # the next turn's blocks

``extend(prev_hash, tokens)`` continues a chain from the hash of the last full block already
hashed (``None`` = start of the prompt); ``tokens`` must start on a block boundary and a
partial tail is ignored. A multi-turn conversation therefore hashes each block once. Hashing
8,000 tokens costs ~0.2 ms (``bench/index.py``): one ``array`` pack, then one xxh3 call per
block over a memoryview slice, no per-token Python loop.

``Namespace.model`` is the backend's served (base) model name, ``lora`` the adapter name
(vLLM's ``lora_name``) or ``None``. Must not import anything outside the standard library,
``xxhash`` and ``policies``.
"""

from __future__ import annotations

import json
import sys
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field

import xxhash

__all__ = ["BlockHasher", "Namespace", "TokenIdError", "pack_tokens"]

_UINT32 = "I" if array("I").itemsize == 4 else "L"
assert array(_UINT32).itemsize == 4, "no 4-byte unsigned array type on this platform"
_BIG_ENDIAN = sys.byteorder == "big"
_xxh3 = xxhash.xxh3_64_intdigest


class TokenIdError(ValueError):
    """A token id is not an integer in [0, 2**32): the caller's input is wrong (a router maps
    it to a client error, not a crash)."""


def pack_tokens(tokens: Sequence[int] | array[int]) -> bytes:
    """Token ids as little-endian uint32 bytes; TokenIdError on ids outside [0, 2**32)."""
    try:
        packed = tokens if isinstance(tokens, array) and tokens.typecode == _UINT32 else array(
            _UINT32, tokens
        )
    except (OverflowError, TypeError) as exc:
        raise TokenIdError(f"token ids must be integers in [0, 2**32): {exc}") from None
    if _BIG_ENDIAN:
        packed = array(_UINT32, packed)
        packed.byteswap()
    return packed.tobytes()


@dataclass(frozen=True, slots=True)
class Namespace:
    """What makes two equal token sequences different caches. Folded into block 0's seed."""

    model: str
    lora: str | None = None
    cache_salt: str | None = None

    def root_hash(self, block_size: int) -> int:
        # JSON keeps the fields unambiguous ("a","bc" vs "ab","c"); a version tag lets the
        # scheme change without silently matching old chains.
        key = json.dumps(["kvrouter-blocks/1", self.model, self.lora, self.cache_salt, block_size])
        return _xxh3(key.encode("utf-8"))


@dataclass(frozen=True, slots=True)
class BlockHasher:
    """Chained hashes of full blocks for one namespace and block size."""

    namespace: Namespace
    block_size: int
    root: int = field(init=False)

    def __post_init__(self) -> None:
        if self.block_size <= 0:
            raise ValueError(f"block_size must be positive, got {self.block_size}")
        object.__setattr__(self, "root", self.namespace.root_hash(self.block_size))

    def hash_tokens(self, tokens: Sequence[int] | array[int]) -> tuple[int, ...]:
        """Hashes of every full block of a prompt, from its start."""
        return self.extend(None, tokens)

    def extend(
        self, prev_hash: int | None, tokens: Sequence[int] | array[int]
    ) -> tuple[int, ...]:
        """Hashes of the full blocks of ``tokens``, chained after ``prev_hash``.

        ``prev_hash`` is the hash of the block just before ``tokens`` (``None`` when ``tokens``
        start the prompt). The partial tail block is ignored.
        """
        n_blocks = len(tokens) // self.block_size
        if n_blocks == 0:
            return ()
        step = self.block_size * 4
        whole = n_blocks * self.block_size
        data = memoryview(pack_tokens(tokens if len(tokens) == whole else tokens[:whole]))
        h = self.root if prev_hash is None else prev_hash
        out: list[int] = []
        append = out.append
        for start in range(0, n_blocks * step, step):
            h = _xxh3(data[start : start + step], h)
            append(h)
        return tuple(out)
