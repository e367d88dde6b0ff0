"""Byte-level BPE over ASCII text at Python speed, id for id what the Rust tokenizer gives.

The ``tokenizers`` library spends most of an encode in its pre-tokenizer (an Oniguruma regex
that cuts text into words): ~0.4-1 us per token on the router's machine, where a Python regex
that finds the same words and a dictionary from word to ids take ~0.2 us (``bench/README.md``).
``WordEncoder`` does exactly that for tokenizers whose whole pipeline it can reproduce:

- no normalizer, or NFC (the identity on ASCII); a byte-level pre-tokenizer with one of the
  patterns below and no prefix space: ``ByteLevel(use_regex=True)`` (GPT-2's pattern), or
  ``Split(pattern, Isolated)`` then ``ByteLevel(use_regex=False)`` with Llama 3's pattern
  (also DeepSeek's and others') or Qwen 2's; model ``BPE`` without dropout; every added token
  split out by the caller (``router.prompt.tokenize`` cuts the text at them first);
- ASCII text only. On ASCII the pattern's Unicode classes are plain ranges (``\\p{L}`` is
  ``[A-Za-z]``, ``\\p{N}`` is ``[0-9]``) and ``\\s`` is Oniguruma's White_Space, spelled out
  because Python's ``\\s`` also takes U+001C-U+001F. Text with any other character goes to the
  Rust tokenizer, so Unicode-table differences between the two regex engines never matter.

Each word's ids come from the tokenizer's own model (``BPE.tokenize`` on the byte-mapped word),
learned once and kept in a bounded dictionary. Exactness rests on the words being the ones the
Rust pre-tokenizer finds; ``tests/test_word_encoder.py`` compares whole encodes over generated
text (whitespace runs, control characters, digits, contractions, punctuation).

``safe_cuts`` names where a text may be cut so that both halves tokenize independently
(``router.prompt.tokenize`` caches completions prompts' prefixes at such cuts): before a space whose
left neighbour is ASCII and not whitespace. In all three patterns a word holds a space only as
its first character or inside a whitespace run, so no word runs across such a space; what an
alternative looks at past the cut (a greedy letter, digit or ``[\r\n]*`` run ending, a
contraction's next letter) fails on a space as it fails at the end of the text; and nothing
looks behind, so matching after the cut starts afresh. NFC cannot join a space to either
neighbour. ``tests/test_word_encoder.py`` checks the property on generated text, unicode
included, for each pattern.

Must not import aiohttp, asyncio or anything from ``simulator``.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Mapping
from itertools import chain
from typing import Any

__all__ = ["WordEncoder", "is_safe_cut", "safe_cuts"]

_WS = "\\t\\n\\x0b\\x0c\\r "  # Oniguruma's White_Space within ASCII
# Each pattern alternative for alternative, restricted to ASCII: \p{L} -> A-Za-z, \p{N} -> 0-9,
# \s -> _WS.
_GPT2_ASCII = re.compile(
    rf"'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^{_WS}A-Za-z0-9]+"
    rf"|[{_WS}]+(?![^{_WS}])|[{_WS}]+"
)
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_PATTERN = LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")


def _llama3_like(digits: str) -> re.Pattern[str]:
    return re.compile(
        rf"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\nA-Za-z0-9]?[A-Za-z]+|[0-9]{digits}"
        rf"| ?[^{_WS}A-Za-z0-9]+[\r\n]*|[{_WS}]*[\r\n]+|[{_WS}]+(?![^{_WS}])|[{_WS}]+"
    )


_SPLIT_PATTERNS = {LLAMA3_PATTERN: _llama3_like("{1,3}"), QWEN2_PATTERN: _llama3_like("")}
_ASCII_SPACE = frozenset("\t\n\x0b\x0c\r ")


def _byte_chars() -> dict[int, str]:
    """GPT-2's byte -> printable character map (the ByteLevel pre-tokenizer's), ASCII part."""
    kept = list(range(ord("!"), ord("~") + 1))
    out = {b: chr(b) for b in kept}
    shifted = 0
    for b in range(256):
        if b not in out:
            if b < 128:
                out[b] = chr(256 + shifted)
            shifted += 1
    return out


_ASCII_MAP = str.maketrans(_byte_chars())


def is_safe_cut(text: str, i: int) -> bool:
    """``text`` may be cut before position ``i`` (0 < i < len): a space whose left neighbour is
    ASCII and not whitespace."""
    left = text[i - 1]
    return text[i] == " " and left.isascii() and left not in _ASCII_SPACE


def safe_cuts(text: str, start: int, end: int, every_chars: int) -> list[int]:
    """Positions in (start, end) where ``text`` may be cut, about ``every_chars`` apart: each is
    a space whose left neighbour is ASCII and not whitespace (see the module docstring)."""
    cuts: list[int] = []
    find = text.find
    pos = start + every_chars
    while pos < end:
        b = find(" ", pos, end)
        if b < 0:
            break
        if is_safe_cut(text, b):
            cuts.append(b)
            pos = b + every_chars
        else:
            pos = b + 1
    return cuts


def _ascii_pattern(pre: dict[str, Any]) -> re.Pattern[str] | None:
    """The ASCII pattern reproducing a serialized pre-tokenizer, if it is one of ours."""
    if pre.get("type") == "ByteLevel":
        ok = pre.get("use_regex", True) and not pre.get("add_prefix_space")
        return _GPT2_ASCII if ok else None
    parts = pre.get("pretokenizers") or []
    if pre.get("type") != "Sequence" or len(parts) != 2:
        return None
    split, byte_level = parts
    if (split.get("type") != "Split" or split.get("behavior") != "Isolated"
            or split.get("invert") or byte_level.get("type") != "ByteLevel"
            or byte_level.get("use_regex", True) or byte_level.get("add_prefix_space")):
        return None
    return _SPLIT_PATTERNS.get((split.get("pattern") or {}).get("Regex", ""))


class WordEncoder:
    """Word -> ids for one tokenizer; ``encode`` returns None where the Rust tokenizer must go.

    Safe from several threads: the dictionary is only read and assigned (atomic under the
    GIL); two threads learning one word store the same ids."""

    def __init__(self, model: Any, pattern: re.Pattern[str] = _GPT2_ASCII, *,
                 max_words: int = 100_000, learn_per_call: int = 64) -> None:
        self._tokenize = model.tokenize
        self._findall = pattern.findall
        self._words: dict[str, tuple[int, ...]] = {}
        self.max_words = max_words
        self.learn_per_call = learn_per_call
        """Unknown words one call may learn (~1.5 us each); past it the call leaves the text to
        Rust, so text made of new words (ids, base64) costs at most ~0.1 ms extra. The
        dictionary holds up to ``max_words`` (~200 B each, ~20 MB) and starts over when full."""
        self._lock = threading.Lock()

    @classmethod
    def for_tokenizer(cls, fast: Any, split_tokens: set[str]) -> WordEncoder | None:
        """A WordEncoder when ``fast`` (a ``tokenizers.Tokenizer``) is a pipeline it reproduces
        and every added token is in ``split_tokens`` (cut out before text reaches it)."""
        try:
            config = json.loads(fast.to_str())
            added = {t.content for t in fast.get_added_tokens_decoder().values()}
        except Exception:  # not a tokenizers.Tokenizer, or a future serialization
            return None
        model = config.get("model") or {}
        pattern = _ascii_pattern(config.get("pre_tokenizer") or {})
        if (config.get("normalizer") not in (None, {"type": "NFC"}) or pattern is None
                or model.get("type") != "BPE" or model.get("dropout") is not None
                or not added <= split_tokens):
            return None
        return cls(fast.model, pattern)

    def __len__(self) -> int:
        return len(self._words)

    def learn_vocabulary(self, vocab: Mapping[str, int], limit: int) -> int:
        """Learn up to ``limit`` of the vocabulary's ASCII tokens that are whole words, lowest
        ids first, and return how many. A fresh router otherwise learns each word the first
        time a prompt holds it, up to ``learn_per_call`` per call and the rest of the text
        through Rust: its first cold prompts took 2.4x a later one's time to tokenize
        (bench/README.md, "A fresh router's first prompts"). A BPE vocabulary's low ids are its
        earliest merges, the most frequent words of its training text. Exact as every learned
        word is: the ids come from the model's own ``tokenize``, whatever the word's id."""
        inverse = {c: chr(b) for b, c in _byte_chars().items()}
        known = self._words
        learned = 0
        for token, _ in sorted(vocab.items(), key=lambda item: item[1]):
            if learned >= limit or len(known) >= self.max_words:
                break
            try:
                word = "".join([inverse[c] for c in token])
            except KeyError:  # a byte outside ASCII: such text goes to Rust anyway
                continue
            if word in known or self._findall(word) != [word]:
                continue
            known[word] = tuple(t.id for t in self._tokenize(token))
            learned += 1
        return learned

    def encode(self, text: str) -> list[int] | None:
        """The ids of ``text`` (no special tokens added), or None: not ASCII, or too many
        words never seen."""
        if not text.isascii():
            return None
        words = self._findall(text)
        get = self._words.get
        parts = list(map(get, words))
        if None in parts:
            if not self._learn(words, parts):
                return None
        return list(chain.from_iterable(parts))  # type: ignore[arg-type]

    def _learn(self, words: list[str], parts: list[tuple[int, ...] | None]) -> bool:
        learned = 0
        known = self._words
        for i, part in enumerate(parts):
            if part is None:
                word = words[i]
                ids = known.get(word)
                if ids is None:
                    if learned == self.learn_per_call:
                        return False
                    ids = tuple(t.id for t in self._tokenize(word.translate(_ASCII_MAP)))
                    learned += 1
                    if len(known) >= self.max_words:
                        with self._lock:  # one thread clears; the others just re-learn
                            if len(known) >= self.max_words:
                                known.clear()
                    known[word] = ids
                parts[i] = ids
        return True
