"""The fast prompt path is exact: the Python word path, pre-token cuts and whole-prompt reuse give
the ids of a whole encode by the Rust tokenizer, over generated text (whitespace runs, control
characters, digits, contractions, punctuation, unicode, special tokens) and chats with tools."""

from __future__ import annotations

import itertools
import json
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from router.prompt import word_encoder
from router.prompt.tokenize import ModelTokenizer, _non_ascii_islands, load_tokenizer
from router.prompt.word_encoder import WordEncoder, is_safe_cut, safe_cuts
from simulator.tiny_tokenizer import _WORDS, default_path

SPECIALS = ["<|start|>", "<|end|>", "<|bos|>"]

# Pieces a prompt is made of: the pattern's edge cases sit between them.
ASCII_PIECES = [
    " ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", "\x0b", "\x0c", "\x1c", "\x1f", "\x00", "\x7f",
    "'s", "'S", "'t", "'re", "'ve", "'m", "'ll", "'d", "'", "''", "it's", "we're", "x'llz",
    "0", "42", " 2024", "3.14", "1,000", "a1b2", "?!", " ...", "--", "(", ")", "{\"k\": 1}",
    "Hello", " world", "CamelCase", "snake_case", "URL://x.y/z?q=1", "<|", "|>", "<|start",
    *(_WORDS[:40]),
]
UNICODE_PIECES = ["é", " café", "naïve", "日本語", " 東京", "\u00a0", "\u2003", "\u0085",
                  "\u3000x", "🙂", " 🙂🙂", "e\u0301", "Ωmega", "١٢٣", "ǅ"]

# The word path gets text between added tokens (the caller cuts there): none of them in it.
ascii_text = st.lists(st.sampled_from(ASCII_PIECES), max_size=60).map("".join).filter(
    lambda t: "<|" not in t)
any_text = st.lists(st.one_of(st.sampled_from(ASCII_PIECES), st.sampled_from(UNICODE_PIECES),
                              st.sampled_from(SPECIALS), st.text(max_size=4)),
                    max_size=60).map("".join)


@pytest.fixture(scope="module")
def hf():
    return load_tokenizer(default_path())


@pytest.fixture(scope="module")
def fast(hf):
    return hf.backend_tokenizer


def _variant(fast, **changes) -> Tokenizer:
    config = json.loads(fast.to_str())
    config.update(changes)
    return Tokenizer.from_str(json.dumps(config))


def _split_byte_level(pattern: str) -> dict:
    return {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
         "use_regex": False}]}


PIPELINES = ["gpt2", "llama3", "qwen2"]


@pytest.fixture(scope="module", params=PIPELINES)
def pipeline(request, fast):
    """The tiny vocabulary behind each pre-tokenizer the word path reproduces (Qwen 2's with
    its NFC normalizer): the words and the cuts do not depend on the vocabulary."""
    if request.param == "gpt2":
        return fast
    if request.param == "llama3":
        return _variant(fast, pre_tokenizer=_split_byte_level(word_encoder.LLAMA3_PATTERN))
    return _variant(fast, pre_tokenizer=_split_byte_level(word_encoder.QWEN2_PATTERN),
                    normalizer={"type": "NFC"})


@pytest.fixture(scope="module")
def words(pipeline):
    encoder = WordEncoder.for_tokenizer(pipeline, set(SPECIALS) | {"<|pad|>", "<|eos|>"})
    assert encoder is not None, "a pipeline the word path reproduces"
    return encoder


def _rust(fast, text: str) -> list[int]:
    return fast.encode(text, add_special_tokens=False).ids


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=ascii_text)
def test_word_path_equals_rust_on_ascii(words, pipeline, text):
    assert words.encode(text) == _rust(pipeline, text)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=ascii_text)
def test_words_are_the_rust_pre_tokenizers(words, pipeline, text):
    # Exactness of the word path does not depend on the vocabulary: the words themselves are
    # the ones the tokenizer's own pre-tokenizer finds (it returns them byte-mapped).
    ours = [w.translate(word_encoder._ASCII_MAP) for w in words._findall(text)]
    assert ours == [w for w, _ in pipeline.pre_tokenizer.pre_tokenize_str(text)]


def test_word_path_spells_out_onigurumas_whitespace(words, pipeline):
    # Python's \s matches U+001C-U+001F, Oniguruma's does not: "a\x1c b" is three words in
    # the tokenizer, and a pattern written with \s would find two.
    text = "a\x1c b\x1d\x1e  c\x1f"
    assert words.encode(text) == _rust(pipeline, text)
    ours = re.compile(words._findall.__self__.pattern)
    naive = re.compile(ours.pattern.replace("\\t\\n\\x0b\\x0c\\r ", "\\s"))
    assert naive.findall(text) != ours.findall(text)


def test_word_path_leaves_non_ascii_to_rust(words):
    assert words.encode("café au lait") is None
    assert words.encode("") == []


def test_word_path_learns_a_bounded_number_per_call(fast):
    encoder = WordEncoder(fast.model, learn_per_call=3, max_words=5)
    fresh = " alpha beta gamma delta"
    assert encoder.encode(fresh) is None, "four unknown words, three may be learned"
    assert len(encoder) == 3
    assert encoder.encode(fresh) == _rust(fast, fresh), "the fourth is learned on the next call"
    assert encoder.encode(" epsilon zeta") == _rust(fast, " epsilon zeta")
    assert len(encoder) <= 5, "the dictionary is bounded"


@pytest.fixture(scope="module")
def warmed(pipeline):
    """A word path that learned its vocabulary's words up front, as a router's start-up does."""
    encoder = WordEncoder.for_tokenizer(pipeline, set(SPECIALS) | {"<|pad|>", "<|eos|>"})
    assert encoder is not None
    assert encoder.learn_vocabulary(pipeline.get_vocab(), 10_000) > 100
    return encoder


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=ascii_text)
def test_vocabulary_learned_up_front_stays_exact(warmed, pipeline, text):
    assert warmed.encode(text) == _rust(pipeline, text)


def test_vocabulary_learned_up_front_spares_the_first_prompts(fast):
    encoder = WordEncoder(fast.model, learn_per_call=4)
    learned = encoder.learn_vocabulary(fast.get_vocab(), 10_000)
    text = " " + " ".join(_WORDS[:300])  # the tiny tokenizer's training words
    assert len(encoder) == learned
    assert encoder.encode(text) == _rust(fast, text), "more new words than one call may learn"
    assert len(encoder) == learned, "every word of the text was known before the first prompt"
    # Only whole ASCII words: no byte-level fragment, nothing a prompt's words never are.
    assert all(encoder._findall(w) == [w] and w.isascii() for w in encoder._words)


def test_vocabulary_learning_is_bounded(fast):
    encoder = WordEncoder(fast.model, max_words=50)
    assert encoder.learn_vocabulary(fast.get_vocab(), 30) == 30
    assert encoder.learn_vocabulary(fast.get_vocab(), 1_000) == 20, "up to max_words in all"
    assert len(encoder) == 50
    words = sorted(encoder._words, key=lambda w: fast.token_to_id(
        w.translate(word_encoder._ASCII_MAP)) or 0)
    vocab = fast.get_vocab()
    assert max(vocab[w.translate(word_encoder._ASCII_MAP)] for w in words) < 200, \
        "the lowest ids first"


def test_model_tokenizer_warm_learns_the_vocabulary(hf):
    tokenizer = ModelTokenizer(hf)
    assert tokenizer.words is not None
    before, cached = len(tokenizer.words), len(tokenizer.cache)  # (the load's self-check)
    tokenizer.warm()
    assert len(tokenizer.words) > before + 1_000
    assert len(tokenizer.cache) == cached, "the prefix cache is left untouched"


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=any_text, every=st.integers(min_value=1, max_value=12))
def test_pieces_at_safe_cuts_equal_the_whole(pipeline, text, every):
    # The property the completions prefix cache rests on, for unicode text too: cutting at
    # safe_cuts and encoding each piece alone gives the whole text's ids.
    cuts = safe_cuts(text, 0, len(text), every)
    bounds = [0, *cuts, len(text)]
    pieces = [text[a:b] for a, b in itertools.pairwise(bounds)]
    assert [i for p in pieces for i in _rust(pipeline, p)] == _rust(pipeline, text)


def test_safe_cuts_are_spaces_after_ascii_non_whitespace():
    text = "ab  cd\te f é g" + " h" * 10
    cuts = safe_cuts(text, 0, len(text), 1)
    assert cuts and all(text[c] == " " and text[c - 1] not in " \t\n" and text[c - 1].isascii()
                        for c in cuts)
    assert 3 not in cuts, "a space after a space is no cut"
    assert 12 not in cuts, "a space after a non-ASCII character is no cut"
    assert safe_cuts(text, 0, len(text), 8) == [c for c in safe_cuts(text, 0, len(text), 8)
                                                if c >= 8]


@pytest.fixture(scope="module")
def pipeline_hf(pipeline):
    return PreTrainedTokenizerFast(tokenizer_object=pipeline)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shared=any_text, first=any_text, second=any_text, add=st.booleans(),
       every=st.integers(min_value=1, max_value=16))
def test_completions_with_cached_prefixes_equal_whole_encodes(pipeline_hf, shared, first, second,
                                                             add, every):
    hf = pipeline_hf
    tok = ModelTokenizer(hf, cut_chars=every)
    assert tok.incremental and tok.words is not None
    for text in (shared + first, shared + second, shared + first, shared):
        got = tok.tokenize_body({"prompt": text, "add_special_tokens": add}, chat=False)
        assert list(got.token_ids) == hf(text, add_special_tokens=add)["input_ids"]


def test_completions_reuse_at_pre_token_cuts(hf):
    tok = ModelTokenizer(hf, cut_chars=64)
    base = " ".join(_WORDS[i % len(_WORDS)] for i in range(400))
    tok.tokenize_body({"prompt": base + " first question"}, chat=False)
    second = tok.tokenize_body({"prompt": base + " second one"}, chat=False)
    assert list(second.token_ids) == hf(base + " second one")["input_ids"]
    assert second.reused_tokens > len(second.token_ids) - 40, "all but the last cut is reused"
    again = tok.tokenize_body({"prompt": base + " second one"}, chat=False)
    assert again.reused_tokens == len(again.token_ids) - 0 and again.run is second.run


def test_same_prompt_with_eos_suffix_is_not_taken_from_a_longer_run(hf):
    # A run of a longer text shares the shorter text's whole-text key when the shorter ends at
    # one of the longer's cuts; it must not be returned for the shorter (different length).
    tok = ModelTokenizer(hf, cut_chars=1)
    long = tok.tokenize_body({"prompt": "alpha beta gamma"}, chat=False)
    short = tok.tokenize_body({"prompt": "alpha beta"}, chat=False)
    assert list(short.token_ids) == hf("alpha beta")["input_ids"]
    assert short.run is not long.run


CONTENTS = st.lists(st.one_of(st.sampled_from(ASCII_PIECES), st.sampled_from(UNICODE_PIECES)),
                    min_size=0, max_size=40).map("".join)
TOOLS = [{"type": "function", "function": {"name": "lookup", "description": "Find  it\n",
          "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(turns=st.lists(CONTENTS, min_size=1, max_size=6), tools=st.booleans(),
       every=st.sampled_from([4, 64, 512]))
def test_chat_turn_by_turn_equals_whole_encodes(hf, turns, tools, every):
    tok = ModelTokenizer(hf, cut_chars=every)
    messages: list[dict] = [{"role": "system", "content": "You help.  Be exact: 1,234."}]
    for i, content in enumerate(turns):
        messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": content})
        if i % 3 == 2:
            messages.append({"role": "assistant", "content": None, "tool_calls": [
                {"id": f"c{i}", "type": "function",
                 "function": {"name": "lookup", "arguments": json.dumps({"q": content})}}]})
            messages.append({"role": "tool", "tool_call_id": f"c{i}", "content": content[::-1]})
        body = {"messages": messages, **({"tools": TOOLS} if tools else {})}
        got = tok.tokenize_body(body, chat=True)
        text = hf.apply_chat_template(messages, tools=TOOLS if tools else None,
                                      add_generation_prompt=True, tokenize=False)
        assert got.text == text
        assert list(got.token_ids) == hf(text, add_special_tokens=False)["input_ids"]


def test_only_pipelines_it_reproduces_get_the_word_path(fast):
    all_added = {t.content for t in fast.get_added_tokens_decoder().values()}
    assert WordEncoder.for_tokenizer(fast, all_added) is not None
    assert WordEncoder.for_tokenizer(fast, all_added - {"<|pad|>"}) is None, \
        "an added token the caller does not cut out would be missed"
    lowercase = _variant(fast, normalizer={"type": "Lowercase"})
    assert WordEncoder.for_tokenizer(lowercase, all_added) is None
    prefix_space = _variant(fast, pre_tokenizer={"type": "ByteLevel", "add_prefix_space": True,
                                                 "trim_offsets": True, "use_regex": True})
    assert WordEncoder.for_tokenizer(prefix_space, all_added) is None
    other_split = _variant(fast, pre_tokenizer=_split_byte_level(r"\s+|\w+|[^\s\w]+"))
    assert WordEncoder.for_tokenizer(other_split, all_added) is None, "an unknown pattern"
    metaspace = _variant(fast, pre_tokenizer={"type": "Metaspace", "replacement": "\u2581",
                                              "prepend_scheme": "always", "split": True})
    assert WordEncoder.for_tokenizer(metaspace, all_added) is None
    assert WordEncoder.for_tokenizer(object(), all_added) is None


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=any_text)
def test_non_ascii_islands_leave_ascii_between_safe_cuts(text):
    islands = _non_ascii_islands(text)
    assert islands[-1] == (len(text), len(text))
    pos = 0
    for a, b in islands:
        assert pos <= a <= b
        assert text[pos:a].isascii(), "what the word path gets is ASCII"
        for cut in (a, b):
            assert cut in (0, len(text)) or is_safe_cut(text, cut), "islands end at safe cuts"
        pos = b


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=any_text)
def test_mostly_ascii_text_in_one_segment_equals_whole_encode(hf, text):
    # No pre-token cuts (one segment per text between specials): ASCII stretches around
    # non-ASCII islands take the word path, the islands the Rust encoder.
    tok = ModelTokenizer(hf, cut_chars=10**9)
    assert list(tok.tokenize_body({"prompt": text}, chat=False).token_ids) == hf(text)["input_ids"]


def test_ascii_around_an_island_takes_the_word_path(hf):
    tok = ModelTokenizer(hf, cut_chars=10**9)
    tail = " zyxw vutsr"
    text = "plain words before “quoted” and after" + tail
    assert list(tok.tokenize_body({"prompt": text}, chat=False).token_ids) == hf(text)["input_ids"]
    assert tok.words is not None and tok.words._words.get(" vutsr") is not None
