"""The prefix cache behind ``router.prompt.tokenize``: rendered-prompt prefixes -> token ids.

A prompt is cut at its special tokens (the chat template's role markers). When the tokenizer
splits special tokens out before anything else, which ``ModelTokenizer`` verifies when it loads,
the tokens of ``text[:b]`` for a cut ``b`` right after a special token never change when more
text is appended, so a later turn of a conversation reuses them and tokenizes only what is new.

Each tokenized prompt becomes one ``PromptRun`` (its token list, plus the block hashes the
analyzer computed for it); every cut of the prompt is a key pointing into that run with its
token count. Bounded by a token budget (least recently used runs go first). Thread-safe: the
tokenizer pool's threads share it, and a lock guards only dictionary updates, never encoding.

Must not import aiohttp, asyncio or anything from ``simulator``.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence

from policies.types import value_type

__all__ = ["CacheHit", "PrefixCache", "PromptRun"]


class PromptRun:
    """One tokenized prompt: its tokens and, per (namespace, block size), its block hashes."""

    __slots__ = ("_hashes", "_lock", "cut_counts", "keys", "token_ids")

    def __init__(self, token_ids: Sequence[int], cut_counts: list[int] | None = None) -> None:
        # A tuple: the collector untracks a tuple of ints the first time it sees one, where
        # it walks every item of a list in every full collection (with this cache and the
        # piece cache full, 8 ms with the event loop stopped: bench/collector.py).
        self.token_ids: tuple[int, ...] = tuple(token_ids)
        self.cut_counts = cut_counts or []
        """Tokens up to each cut of the prompt (a cut follows each special token)."""
        self.keys = 0
        self._hashes: dict[tuple[str, int], tuple[int, ...]] = {}
        self._lock = threading.Lock()

    def cached_hashes(self, namespace: str, block_size: int) -> tuple[int, ...]:
        """Block hashes already known for this run's leading full blocks (maybe fewer). A
        tuple, kept: the same prompt again hands the policy the very same chain object."""
        with self._lock:
            return self._hashes.get((namespace, block_size), ())

    def store_hashes(self, namespace: str, block_size: int, hashes: tuple[int, ...]) -> None:
        with self._lock:
            known = self._hashes.get((namespace, block_size))
            if known is None or len(known) < len(hashes):
                self._hashes[(namespace, block_size)] = hashes

    def inherit(self, parent: PromptRun, shared_tokens: int) -> None:
        """Take over ``parent``'s hashes for the blocks inside the shared token prefix."""
        with parent._lock:
            items = list(parent._hashes.items())
        for (namespace, block_size), hashes in items:
            self.store_hashes(namespace, block_size, hashes[: shared_tokens // block_size])


@value_type  # built per request: a frozen dataclass's init is ~7x slower
class CacheHit:
    run: PromptRun
    tokens: int
    cut: int
    """Index of the matched cut in the caller's list of cuts (-1 from ``whole``: the last)."""


class PrefixCache:
    """Prefix key (a hash of the text up to a cut) -> (run, token count), LRU by token budget."""

    def __init__(self, max_tokens: int = 1_000_000) -> None:
        if max_tokens < 0:
            raise ValueError("max_tokens must be >= 0")
        self.max_tokens = max_tokens
        self._entries: OrderedDict[int, tuple[PromptRun, int]] = OrderedDict()
        self._tokens = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def tokens(self) -> int:
        """Tokens held by live runs (what the budget bounds)."""
        return self._tokens

    def __len__(self) -> int:
        return len(self._entries)

    def longest(self, keys: list[int]) -> CacheHit | None:
        """The longest cut whose key is cached (``keys`` in text order)."""
        with self._lock:
            for i in range(len(keys) - 1, -1, -1):
                entry = self._entries.get(keys[i])
                if entry is not None:
                    self._entries.move_to_end(keys[i])
                    self.hits += 1
                    return CacheHit(entry[0], entry[1], i)
            self.misses += 1
            return None

    def whole(self, key: int, suffix_tokens: int) -> CacheHit | None:
        """The run cached under ``key`` (a whole prompt's key, its last cut's) when it is that
        prompt's own: no more tokens than the key's count plus ``suffix_tokens`` (the special
        tokens the tokenizer appends). Counted and refreshed as ``longest`` would."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or len(entry[0].token_ids) != entry[1] + suffix_tokens:
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return CacheHit(entry[0], entry[1], -1)

    def add(self, run: PromptRun, keys: list[int], token_counts: list[int]) -> None:
        """Point every cut's key at ``run``; evict least recently used runs past the budget."""
        if self.max_tokens == 0 or not keys:
            return
        with self._lock:
            for key, count in zip(keys, token_counts, strict=True):
                old = self._entries.pop(key, None)
                if old is not None:
                    self._release(old[0])
                if run.keys == 0:
                    self._tokens += len(run.token_ids)
                run.keys += 1
                self._entries[key] = (run, count)
            while self._tokens > self.max_tokens and self._entries:
                _, (old_run, _) = self._entries.popitem(last=False)
                self._release(old_run)

    def _release(self, run: PromptRun) -> None:
        run.keys -= 1
        if run.keys == 0:
            self._tokens -= len(run.token_ids)
