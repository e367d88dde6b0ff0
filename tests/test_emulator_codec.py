"""The emulator's codec encodes a rendered chat piece by piece between special tokens; its ids
must be the tokenizer's own for the whole text, or every parity check against it means
nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken
from transformers import AutoTokenizer

from simulator.emulator.chat import shape_chat
from simulator.emulator.pod import HfCodec
from simulator.tiny_tokenizer import default_path

SPECIALS = ["<|start|>", "<|end|>", "<|bos|>", "<|eos|>", "<|pad|>"]
# Text that sits next to a special token in interesting ways: spaces and newlines on either
# side (ByteLevel folds a leading space into the next word), half a special token, non-ASCII.
ATOMS = [*SPECIALS, "<|", "|>", "<|start", " ", "  ", "\n", "\n\n", "the", " cache", "block",
         "é", "日本", "123", "!?", "\t", "<", "|"]


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return AutoTokenizer.from_pretrained(str(default_path()))


def _whole(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(ATOMS), max_size=40))
def test_pieces_between_special_tokens_encode_to_the_whole_texts_ids(
        tokenizer: Any, atoms: list[str]) -> None:
    codec = HfCodec(tokenizer, "tiny")
    assert codec._specials is not None
    text = "".join(atoms)
    assert codec.encode_rendered(text) == _whole(tokenizer, text)
    # Twice: the second answer comes from the memory of the pieces.
    assert codec.encode_rendered(text) == _whole(tokenizer, text)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["system", "user", "assistant"]),
                          st.lists(st.sampled_from(ATOMS), max_size=12)),
                min_size=1, max_size=5))
def test_a_rendered_chat_encodes_to_the_tokenizers_ids(
        tokenizer: Any, turns: list[tuple[str, list[str]]]) -> None:
    codec = HfCodec(tokenizer, "tiny")
    body = {"messages": [{"role": role, "content": "".join(atoms)} for role, atoms in turns]}
    inputs = shape_chat(body)
    whole = _whole(tokenizer, codec.render_chat(inputs))
    assert codec.chat(inputs) == whole
    assert codec.chat(inputs) == whole


def test_a_shared_system_message_is_encoded_once(tokenizer: Any) -> None:
    codec = HfCodec(tokenizer, "tiny")
    system = " ".join(["cache block router"] * 200)
    calls: list[str] = []
    encode = codec._encode

    def counting(text: str, special: bool) -> list[int]:
        calls.append(text)
        return encode(text, special)

    codec._encode = counting  # type: ignore[method-assign]
    for question in ("first question", "second question", "third question"):
        codec.chat(shape_chat({"messages": [{"role": "system", "content": system},
                                            {"role": "user", "content": question}]}))
    assert sum(system in c for c in calls) == 1


def test_a_token_that_strips_its_neighbours_turns_the_cut_off(tmp_path: Path) -> None:
    tok = AutoTokenizer.from_pretrained(str(default_path()))
    tok.add_special_tokens({"additional_special_tokens": [AddedToken("<|tool|>", lstrip=True)]})
    codec = HfCodec(tok, "tiny+lstrip")
    assert codec._specials is None
    text = "<|start|>user\n  <|tool|> x<|end|>"
    assert codec.encode_rendered(text) == _whole(tok, text)


def test_the_memory_keeps_at_most_its_token_budget_and_the_newest_piece(tokenizer: Any) -> None:
    codec = HfCodec(tokenizer, "tiny")
    codec.MEMO_TOKENS = 300  # type: ignore[misc]
    texts = [f"<|start|>user\n{' '.join(['cache block'] * (40 + i))}<|end|>" for i in range(8)]
    for text in texts:
        assert codec.encode_rendered(text) == _whole(tokenizer, text)
        assert codec._memo_tokens == sum(len(ids) for ids in codec._memo.values()) <= 300
    newest = texts[-1][len("<|start|>"):-len("<|end|>")]
    assert (newest, False) in codec._memo
    assert ("user\n" + " ".join(["cache block"] * 40), False) not in codec._memo  # evicted
    assert codec.encode_rendered(texts[0]) == _whole(tokenizer, texts[0])
    # One piece larger than the whole budget is still kept until the next one arrives.
    big = "<|start|>" + " ".join(["router"] * 400) + "<|end|>"
    assert codec.encode_rendered(big) == _whole(tokenizer, big)
    assert len(codec._memo) == 1 and codec._memo_tokens > 300
