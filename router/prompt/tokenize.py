"""Prompt tokenization exactly as the engine does it, with a prefix cache for multi-turn chats.

``ModelTokenizer`` wraps one Hugging Face tokenizer (``transformers.AutoTokenizer``, loaded from
a local directory or an offline model id):

- chat: the body's ``messages`` are shaped the way vLLM shapes them (content parts joined or
  wrapped per the template's content format, assistant ``tool_calls`` arguments parsed, ``tools``
  filled to vLLM's pydantic dump), rendered with ``apply_chat_template(tokenize=False,
  add_generation_prompt=True unless told, continue_final_message, tools, **chat_template_kwargs)``
  and encoded with ``add_special_tokens`` (default False for chat, as vLLM does);
- completions: a string (``add_special_tokens`` default True), a list of strings (the first one
  routes), token ids, or a list of token-id lists (the first one routes);
- ``truncate_prompt_tokens`` keeps the last N tokens, as vLLM does.

Speed: the text is cut right after each special token and, for tokenizers whose pre-tokenizer
``router.prompt.word_encoder`` proves splits there (byte-level BPE with GPT-2's, Llama 3's or Qwen
2's pattern), before a space every ~``cut_chars`` characters. When the tokenizer tokenizes the
pieces independently (checked at load on sample prompts against a whole-text encode), a prompt
sharing a prefix up to any cut with an earlier one (a chat's earlier turns, a completions
prompt's shared head, the same prompt again) takes those ids from ``router.prompt.tokenize_cache``
and encodes only the rest: ASCII with the Python word path (2-4x faster than the Rust library
here), the rest in one ``encode_batch_fast`` call (Rust, no offsets). Tokenizers with other
pre-tokenizers (SentencePiece's Metaspace, unknown patterns) keep the Rust encoder and
special-token cuts only (``bench/README.md`` has the cost). A piece of at least
``_PIECE_MIN_CHARS`` seen in any earlier prompt, at any position, takes its ids from a piece
cache (first in, first out, ``piece_cache_tokens`` ids in all): a prompt whose head differs
(a date, a user id, a new system prompt) but whose body was seen before encodes only its new
pieces. Exact for the same reason the prefix cache is: the pieces are independent. Otherwise
every prompt is encoded whole: parity with the engine beats speed. Calls are synchronous; the analyzer decides where
they run.

Must not import aiohttp, asyncio or anything from ``simulator``.
"""

from __future__ import annotations

import itertools
import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import xxhash

from policies.types import value_type
from router.prompt.chat_render import PromptError, PromptRejected, render_chat
from router.prompt.tokenize_cache import PrefixCache, PromptRun
from router.prompt.word_encoder import WordEncoder, is_safe_cut, safe_cuts

__all__ = ["ModelTokenizer", "PromptError", "TokenizedPrompt", "load_tokenizer"]

log = logging.getLogger(__name__)

# Pieces shorter than this are cheaper to encode than to look up and keep.
_PIECE_MIN_CHARS = 64
# Words of the vocabulary the word path learns at start-up, and renders of a chat then
# (``ModelTokenizer.warm``).
_WARM_WORDS = 20_000
_WARM_RENDERS = 16


@value_type  # built per request: a frozen dataclass's init is ~7x slower
class TokenizedPrompt:
    token_ids: tuple[int, ...]
    """The run's own tuple: cached, so never changed."""
    text: str
    """The rendered prompt ('' for token-id prompts), for character-matching policies."""
    reused_tokens: int
    """Leading tokens served from the prefix cache instead of being encoded again."""
    run: PromptRun
    """Cache record of this prompt; carries block hashes from turn to turn."""


def load_tokenizer(source: str | Path, *, offline: bool = True) -> Any:
    """``AutoTokenizer.from_pretrained`` from a directory or model id, never downloading."""
    from transformers import AutoTokenizer

    looks_local = isinstance(source, Path) or str(source).startswith((".", "/", "~"))
    path = Path(source).expanduser()
    if looks_local and not path.is_dir():
        raise ValueError(f"no tokenizer directory at {str(source)!r}")
    if path.is_dir() and not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise ValueError(f"no tokenizer in {str(source)!r}: expected one of "
                         f"{', '.join(_TOKENIZER_FILES)} (a Hugging Face model directory)")
    if not path.is_dir() and offline:
        hint = "not a directory, and not in the local Hugging Face cache (nothing is downloaded)"
    else:
        hint = ""
    try:
        return AutoTokenizer.from_pretrained(str(source), local_files_only=offline)
    except Exception as exc:  # transformers raises OSError, ValueError, EnvironmentError...
        # One short line for a one-line config error: transformers' texts run to paragraphs.
        reason = (hint if isinstance(exc, OSError) else "") or " ".join(str(exc).split()).split(". ")[0][:200]
        raise ValueError(f"cannot load tokenizer {str(source)!r}: {reason}") from exc


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class ModelTokenizer:
    """One model's tokenizer with its prefix cache. Safe to call from several threads."""

    def __init__(self, hf_tokenizer: Any, *, cache_tokens: int = 1_000_000,
                 cut_chars: int = 512, word_encoder: bool = True,
                 piece_cache_tokens: int = 250_000) -> None:
        self.hf = hf_tokenizer
        self.cache = PrefixCache(cache_tokens)
        # Piece text -> its ids, oldest first: the eviction order. An OrderedDict pops its
        # oldest in O(1); a plain dict's walk to its first entry steps over every slot deleted
        # since it last resized. Single operations are atomic under the GIL, and two threads
        # storing one piece store the same ids, so no lock.
        self._pieces: OrderedDict[str, tuple[int, ...]] = OrderedDict()
        self._piece_tokens = 0
        self.piece_cache_tokens = piece_cache_tokens
        self._fast: Any = getattr(hf_tokenizer, "backend_tokenizer", None)
        self._whole_lock = threading.Lock()
        specials = [
            tok.content
            for tok in getattr(hf_tokenizer, "added_tokens_decoder", {}).values()
            if not (tok.lstrip or tok.rstrip or tok.single_word or tok.normalized)
        ]
        specials.sort(key=len, reverse=True)
        self._special_ids = {s: hf_tokenizer.convert_tokens_to_ids(s) for s in specials}
        self._split = re.compile("|".join(map(re.escape, specials))) if specials else None
        self._affixes = self._special_affixes()
        # Pre-token cuts and the Python word path need a pipeline whose splits are proven
        # (router.prompt.word_encoder); other tokenizers are cut at special tokens only.
        words = (WordEncoder.for_tokenizer(self._fast, set(specials))
                 if self._fast is not None else None)
        self._cuttable = words is not None
        self.cut_chars = cut_chars
        self.words = words if word_encoder else None
        self.incremental = self._fast is not None and (self._split is not None or self._cuttable)
        self.incremental = self.incremental and self._self_check()
        if not self.incremental:
            log.info("tokenizer %s: whole-prompt encoding (pieces are not independent)",
                     getattr(hf_tokenizer, "name_or_path", "?"))

    # ---- public API -------------------------------------------------------------------------

    def tokenize_body(self, body: Mapping[str, Any], *, chat: bool) -> TokenizedPrompt:
        """Tokens of a chat or completions request body, as the engine will see them."""
        if chat:
            text = render_chat(self.hf, body)
            add_special = _flag(body, "add_special_tokens", False)
            result = self.encode(text, add_special_tokens=add_special)
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
                prompt = prompt[0]  # a batch: the first prompt decides the route
            if isinstance(prompt, str):
                add_special = _flag(body, "add_special_tokens", True)
                result = self.encode(prompt, add_special_tokens=add_special)
            elif isinstance(prompt, list) and all(
                isinstance(t, int) and not isinstance(t, bool) for t in prompt
            ):
                run = PromptRun(prompt)
                result = TokenizedPrompt(run.token_ids, "", 0, run)
            else:
                raise PromptError("prompt must be a string, a list of strings or token ids")
        keep = body.get("truncate_prompt_tokens")
        if isinstance(keep, int) and not isinstance(keep, bool) and 0 < keep < len(result.token_ids):
            run = PromptRun(result.token_ids[-keep:])
            result = TokenizedPrompt(run.token_ids, result.text, 0, run)
        return result

    def encode(self, text: str, *, add_special_tokens: bool) -> TokenizedPrompt:
        _check_text(text)
        if not self.incremental:
            run = PromptRun(self._encode_whole(text, add_special_tokens))
            return TokenizedPrompt(run.token_ids, text, 0, run)
        suffix = self._affixes[1] if add_special_tokens else ()
        # This very prompt again: its whole text's key is its last cut's (xxh3's streaming
        # digest is the one-shot digest), so it is found without cutting the text (a
        # 2,000-character prompt: ~9 us of cuts and keys). The run is the answer, block hashes
        # included, when it holds no more tokens than this prompt.
        whole = self.cache.whole(xxhash.xxh3_64_intdigest(
            (b"\x01" if add_special_tokens else b"\x00")
            + text.encode("utf-8", "surrogatepass")), len(suffix))
        if whole is not None:
            return TokenizedPrompt(whole.run.token_ids, text, whole.tokens, whole.run)
        texts, specials, ends = self._segments(text)
        keys = _cut_keys(text, ends, add_special_tokens)
        hit = self.cache.longest(keys)
        if hit is not None:
            run = hit.run
            if hit.cut == len(keys) - 1 and len(run.token_ids) == hit.tokens + len(suffix):
                # This very prompt again (its whole text is the key, and the run holds no
                # more tokens than it): the run is the answer, block hashes included.
                return TokenizedPrompt(run.token_ids, text, hit.tokens, run)
            ids = list(run.token_ids[: hit.tokens])
            counts = run.cut_counts[: hit.cut + 1]
            start = hit.cut + 1
        else:
            ids = list(self._affixes[0]) if add_special_tokens else []
            counts = []
            start = 0
        reused = len(ids) if hit is not None else 0
        encoded = self._encode_texts([t for t in texts[start:] if t])
        for j in range(start, len(texts)):
            if texts[j]:
                ids.extend(next(encoded))
            if specials[j] >= 0:
                ids.append(specials[j])
            counts.append(len(ids))
        ids.extend(suffix)
        run = PromptRun(ids, counts)
        if hit is not None:
            run.inherit(hit.run, hit.tokens)
        self.cache.add(run, keys, counts)
        return TokenizedPrompt(run.token_ids, text, reused, run)

    def _encode_texts(self, texts: list[str]) -> Iterator[Sequence[int]]:
        """Ids of each text, independently: the Python word path where it applies (for a text
        with a few non-ASCII characters, on the ASCII stretches between safe cuts around them),
        the rest in one ``encode_batch_fast`` call (Rust, GIL released, no offsets)."""
        words = self.words
        pieces = self._pieces
        plans: list[list[Sequence[int] | int]] = []  # per text: ids, or an index into ``rust``
        rust: list[str] = []
        for t in texts:
            if len(t) >= _PIECE_MIN_CHARS and (seen := pieces.get(t)) is not None:
                plans.append([seen])
                continue
            ids = words.encode(t) if words is not None else None
            if ids is not None:
                plans.append([ids])
                continue
            if words is None or t.isascii():  # no word path, or too many new words
                plans.append([len(rust)])
                rust.append(t)
                continue
            plan: list[Sequence[int] | int] = []
            pos = 0
            for a, b in _non_ascii_islands(t):
                for piece, ascii_only in ((t[pos:a], True), (t[a:b], False)):
                    if piece:
                        ids = words.encode(piece) if ascii_only else None
                        plan.append(ids if ids is not None else len(rust))
                        if ids is None:
                            rust.append(piece)
                pos = b
            plans.append(plan)
        encoded = ([e.ids for e in self._fast.encode_batch_fast(rust, add_special_tokens=False)]
                   if rust else [])
        for t, plan in zip(texts, plans, strict=True):
            parts = [encoded[p] if isinstance(p, int) else p for p in plan]
            out = parts[0] if len(parts) == 1 else list(itertools.chain.from_iterable(parts))
            if len(t) >= _PIECE_MIN_CHARS and t not in pieces:
                self._keep_piece(t, out)
            yield out

    def _keep_piece(self, text: str, ids: Sequence[int]) -> None:
        if len(ids) > self.piece_cache_tokens:
            return
        pieces = self._pieces
        self._piece_tokens += len(ids)
        pieces[text] = tuple(ids)  # a tuple, as the prefix cache keeps its runs
        while self._piece_tokens > self.piece_cache_tokens and pieces:
            try:
                self._piece_tokens -= len(pieces.popitem(last=False)[1])
            except KeyError:  # another thread emptied it first
                break

    # ---- segments ---------------------------------------------------------------------------

    def _segments(self, text: str) -> tuple[list[str], list[int], list[int]]:
        """The text cut after each special token and, where the pre-tokenizer provably splits,
        every ~``cut_chars`` characters: per segment its text, the special token id that ends
        it (-1 for none) and its end offset. The ids of the whole are the segments' ids in
        order, so a prompt sharing a prefix up to any segment end reuses that prefix's ids."""
        texts: list[str] = []
        specials: list[int] = []
        ends: list[int] = []
        pos = 0
        matches = self._split.finditer(text) if self._split is not None else ()
        for m in itertools.chain(matches, (None,)):
            stop = len(text) if m is None else m.start()
            if self._cuttable:
                for cut in safe_cuts(text, pos, stop, self.cut_chars):
                    texts.append(text[pos:cut])
                    specials.append(-1)
                    ends.append(cut)
                    pos = cut
            if m is not None:
                texts.append(text[pos:stop])
                specials.append(self._special_ids[m.group()])
                ends.append(m.end())
                pos = m.end()
            elif pos < len(text) or not ends:
                texts.append(text[pos:])
                specials.append(-1)
                ends.append(len(text))
        return texts, specials, ends

    # ---- checks at load ---------------------------------------------------------------------

    def warm(self) -> None:
        """Pay the one-time costs at start-up, not in the first requests: compiling the chat
        template (jinja, ~20-40 ms for a Llama-style one, cached by transformers after that)
        and the tokenizer's first batch call, and the word path's most frequent words
        (``WordEncoder.learn_vocabulary``). A burst of requests at start otherwise waits
        behind them all at once. The prefix and piece caches are left untouched."""
        body: dict[str, Any] = {"messages": [{"role": "system", "content": "warm"},
                                             {"role": "user", "content": "up"}]}
        tool = {"type": "function", "function": {
            "name": "warm", "description": "up",
            "parameters": {"type": "object", "properties": {"x": {"type": "string"}}}}}
        text = "warm up"
        # Several times: the interpreter specialises a function's bytecode only after it ran
        # a few times, and rendering is pure-Python jinja and transformers code. With tools
        # too: they take their own branches (shaping, the template's tool section). The first
        # cold chat of a fresh router took 2.4-3.5 ms from its read to its upstream write, a
        # later one ~1.6 ms; 1.6-1.9 ms with this (bench/README.md, "A fresh router's first
        # prompts").
        for warm in (body, {**body, "tools": [tool]}):
            try:
                for _ in range(_WARM_RENDERS):
                    rendered = render_chat(self.hf, warm)
            except PromptError:  # no chat template (or none for tools): a clear error later
                continue
            if warm is body:
                text = rendered
        if self._fast is not None:
            self._fast.encode_batch([text], add_special_tokens=False)
            if self.words is not None:
                # ~1.5 us a word: 20,000 of a 128k vocabulary's are ~30 ms at start-up, ~4 MB.
                self.words.learn_vocabulary(self._fast.get_vocab(),
                                            min(_WARM_WORDS, self.words.max_words // 4))
        self._encode_whole(text, False)

    def _encode_whole(self, text: str, add_special_tokens: bool) -> list[int]:
        # transformers' __call__ may reset truncation/padding on the shared Rust tokenizer,
        # which is not safe from several threads at once ("Already borrowed").
        with self._whole_lock:
            return list(self.hf(text, add_special_tokens=add_special_tokens)["input_ids"])

    def _special_affixes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Tokens the post-processor adds around a prompt (BOS/EOS) with add_special_tokens."""
        probe = "hello world"
        bare = self._encode_whole(probe, False)
        full = self._encode_whole(probe, True)
        for i in range(len(full) - len(bare) + 1):
            if full[i : i + len(bare)] == bare:
                return tuple(full[:i]), tuple(full[i + len(bare) :])
        return (), ()

    def _self_check(self) -> bool:
        samples = ["plain text, no specials at all", " leading space\n\n  and gaps  "]
        specials = list(self._special_ids)
        for s in specials[:4]:
            samples.append(f"before {s}after {s} {s}\n x{s}")
        # Long enough for pre-token cuts, with whitespace runs and digits around them.
        long_sample = "Words and  gaps,\tdigits 12345 it's\n\n " * 3
        samples.append(long_sample * min(self.cut_chars // len(long_sample) + 2, 100))
        if getattr(self.hf, "chat_template", None):
            try:
                samples.append(render_chat(self.hf, {"messages": [
                    {"role": "system", "content": "You are terse."},
                    {"role": "user", "content": " Hi there!  1234 "},
                    {"role": "assistant", "content": "Hello.\n"},
                    {"role": "user", "content": "again"}]}))
            except Exception:  # a template without system support still self-checks the rest
                pass
        for sample in samples:
            for add in (False, True):
                # The doubled sample goes through the cache hit path (the first copy is cached).
                for text in (sample, sample + sample):
                    if list(self.encode(text, add_special_tokens=add).token_ids) != (
                            self._encode_whole(text, add)):
                        return False
        # The checks went through the cache; start serving with an empty one.
        self.cache = PrefixCache(self.cache.max_tokens)
        self._pieces = OrderedDict()
        self._piece_tokens = 0
        return True


def _cut_keys(text: str, cuts: list[int], add_special_tokens: bool) -> list[int]:
    """Per cut, a hash of the text before it (and of the flag): equal prefixes, equal keys.
    xxh3's streaming digest equals the digest of the concatenation, so a key does not depend
    on where the earlier cuts fell."""
    h = xxhash.xxh3_64(b"\x01" if add_special_tokens else b"\x00")
    keys: list[int] = []
    pos = 0
    for cut in cuts:
        h.update(text[pos:cut].encode("utf-8", "surrogatepass"))
        keys.append(h.intdigest())
        pos = cut
    return keys


_NON_ASCII = re.compile(r"[^\x00-\x7f]+")
_ISLAND_GAP_CHARS = 128


def _non_ascii_islands(text: str) -> list[tuple[int, int]]:
    """Spans of ``text`` from the safe cut before each non-ASCII run to the safe cut after it
    (``router.prompt.word_encoder.safe_cuts``' rule), merged when less than ``_ISLAND_GAP_CHARS`` of
    ASCII lies between two; ending with the empty span at the end, so the text between islands
    and after the last one is ASCII."""
    out: list[tuple[int, int]] = []
    pos = 0
    end = len(text)
    for m in _NON_ASCII.finditer(text):
        if m.start() < pos:
            continue  # inside the island before
        a = text.rfind(" ", pos, m.start())
        while a > pos and not is_safe_cut(text, a):
            a = text.rfind(" ", pos, a)
        a = max(a, pos)
        b = text.find(" ", m.end())
        while b != -1 and not is_safe_cut(text, b):
            b = text.find(" ", b + 1)
        b = end if b == -1 else b
        if out and a - pos < _ISLAND_GAP_CHARS:
            a = out.pop()[0]  # one Rust call costs ~10 us: join islands with little between
        out.append((a, b))
        pos = b
    out.append((end, end))
    return out


def _check_text(text: str) -> None:
    """Text the Rust tokenizer can take: a lone surrogate (legal in a JSON escape, and kept by
    Python's ``json``) is not Unicode text, and the tokenizer would raise a TypeError."""
    if text.isascii():  # the common case, a fast scan
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise PromptRejected(
            f"the prompt contains a lone surrogate (U+{ord(text[exc.start]):04X}) at character "
            f"{exc.start}: not valid Unicode text") from None


def _flag(body: Mapping[str, Any], key: str, default: bool) -> bool:
    value = body.get(key, default)
    if not isinstance(value, bool):
        raise PromptError(f"{key} must be true or false")
    return value

