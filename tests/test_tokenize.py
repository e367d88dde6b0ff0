"""Router tokenization matches what vLLM feeds its engine (the tiny tokenizer's template), and
the tokenizing analyzer turns it into the right block hashes, or a counted estimate."""

from __future__ import annotations

import itertools
import math

import pytest

from policies.kv.hashing import BlockHasher, Namespace
from router.kv.metrics import KvMetrics
from router.prompt.analyzer import Endpoint, RequestFields
from router.prompt.chat_render import PromptError, content_format, shape_tools
from router.prompt.token_analyzer import ModelShape, TokenizingAnalyzer
from router.prompt.tokenize import ModelTokenizer, load_tokenizer
from simulator.tiny_tokenizer import default_path


@pytest.fixture(scope="module")
def hf():
    return load_tokenizer(default_path())


@pytest.fixture()
def tok(hf):
    return ModelTokenizer(hf)


def _reference(hf, messages, *, tools=None, add_generation_prompt=True, cont=False, **kw):
    """What vLLM does: apply_chat_template to text, then encode without special tokens."""
    text = hf.apply_chat_template(
        messages, tools=tools, add_generation_prompt=add_generation_prompt,
        continue_final_message=cont, tokenize=False, **kw,
    )
    return text, hf(text, add_special_tokens=False)["input_ids"]


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


@pytest.mark.parametrize(
    ("body", "ref_kwargs"),
    [
        ({"messages": [{"role": "user", "content": "Hello there"}]}, {}),
        ({"messages": [{"role": "system", "content": "Be brief."},
                       {"role": "user", "content": "What is 2+2?"}],
          "add_generation_prompt": False}, {"add_generation_prompt": False}),
        ({"messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": TOOLS},
         {"tools": TOOLS}),
        ({"messages": [{"role": "user", "content": "Write a poem"},
                       {"role": "assistant", "content": "Roses are"}],
          "continue_final_message": True, "add_generation_prompt": False},
         {"cont": True, "add_generation_prompt": False}),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "part one"},
                                                    {"type": "text", "text": " part two"}]}]},
         {}),
    ],
    ids=["plain", "no-generation-prompt", "tools", "continue-final-message", "content-parts"],
)
def test_chat_matches_apply_chat_template(tok, hf, body, ref_kwargs):
    result = tok.tokenize_body(body, chat=True)
    text, ids = _reference(hf, body["messages"], **ref_kwargs)
    assert result.text == text
    assert list(result.token_ids) == ids


def test_tools_are_filled_like_vllm_pydantic_dump():
    shaped = shape_tools([{"type": "function", "function": {"name": "f"}}])
    assert shaped == [{"type": "function",
                       "function": {"name": "f", "description": None, "parameters": None}}]


def test_content_format_detection():
    assert content_format("{% for m in messages %}{{ m['content'] }}{% endfor %}") == "string"
    assert content_format(
        "{% for m in messages %}{% for p in m['content'] %}{{ p.text }}{% endfor %}{% endfor %}"
    ) == "openai"


def test_completion_shapes(tok, hf):
    text = "The quick brown fox"
    expected = hf(text, add_special_tokens=True)["input_ids"]
    assert list(tok.tokenize_body({"prompt": text}, chat=False).token_ids) == expected
    assert list(tok.tokenize_body({"prompt": [text, "other"]}, chat=False).token_ids) == expected
    assert list(tok.tokenize_body({"prompt": [5, 6, 7]}, chat=False).token_ids) == [5, 6, 7]
    assert list(tok.tokenize_body({"prompt": [[9, 8], [1]]}, chat=False).token_ids) == [9, 8]
    truncated = tok.tokenize_body({"prompt": text, "truncate_prompt_tokens": 2}, chat=False)
    assert list(truncated.token_ids) == expected[-2:]


@pytest.mark.parametrize(
    "body",
    [{"prompt": {"x": 1}}, {"prompt": [1.5, 2]}, {"prompt": "x", "add_special_tokens": "yes"}],
    ids=["object", "floats", "bad-flag"],
)
def test_bad_completion_prompts_raise(tok, body):
    with pytest.raises(PromptError):
        tok.tokenize_body(body, chat=False)


def test_bad_chat_bodies_raise(tok):
    with pytest.raises(PromptError):
        tok.tokenize_body({"messages": []}, chat=True)
    with pytest.raises(PromptError):
        tok.tokenize_body({"messages": [{"content": "no role"}]}, chat=True)


def test_multi_turn_reuses_earlier_turns(tok, hf):
    assert tok.incremental, "the tiny tokenizer splits specials first; the self-check must pass"
    history = [{"role": "system", "content": "You answer questions about caches. " * 40}]
    reused = []
    for turn in range(4):
        history.append({"role": "user", "content": f"Question {turn}: what is block {turn}?"})
        result = tok.tokenize_body({"messages": history}, chat=True)
        _, ids = _reference(hf, history)
        assert list(result.token_ids) == ids
        reused.append(result.reused_tokens)
        history.append({"role": "assistant", "content": f"Answer {turn} is cached."})
    assert reused[0] == 0
    # Every later turn reuses at least the whole previous prompt minus the generation prompt.
    assert all(later > earlier for earlier, later in itertools.pairwise(reused))
    assert tok.cache.hits >= 3


def test_shared_system_prompt_reused_across_conversations(tok, hf):
    system = {"role": "system", "content": "Shared instructions. " * 50}
    tok.tokenize_body({"messages": [system, {"role": "user", "content": "first"}]}, chat=True)
    second = tok.tokenize_body({"messages": [system, {"role": "user", "content": "second"}]},
                               chat=True)
    _, ids = _reference(hf, [system, {"role": "user", "content": "second"}])
    assert list(second.token_ids) == ids
    assert second.reused_tokens > 100


def test_the_same_prompt_again_is_its_cached_run_and_a_cached_prefix_is_not(tok, hf):
    long = "The quick brown fox jumps over the lazy dog. " * 60
    first = tok.encode(long, add_special_tokens=True)
    hits = tok.cache.hits
    again = tok.encode(long, add_special_tokens=True)
    assert again.run is first.run and again.token_ids == first.token_ids
    assert again.reused_tokens == len(first.token_ids) - len(tok._affixes[1])
    assert tok.cache.hits == hits + 1
    # A prompt ending at one of the long prompt's cuts has a cached key whose run holds more
    # tokens than it: encoded from that prefix, not handed the longer run.
    _, _, ends = tok._segments(long)
    assert len(ends) > 1
    prefix = long[: ends[0]]
    shorter = tok.encode(prefix, add_special_tokens=True)
    assert shorter.run is not first.run
    assert list(shorter.token_ids) == hf.encode(prefix, add_special_tokens=True)
    assert list(first.token_ids) == hf.encode(long, add_special_tokens=True)
    without = tok.encode(long, add_special_tokens=False)  # another key: not the same run
    assert without.run is not first.run
    assert list(without.token_ids) == hf.encode(long, add_special_tokens=False)


def test_cache_budget_bounds_tokens(hf):
    small = ModelTokenizer(hf, cache_tokens=200)
    for i in range(20):
        small.tokenize_body({"messages": [{"role": "user", "content": f"message {i} " * 20}]},
                            chat=True)
    assert small.cache.tokens <= 200


def test_a_body_seen_behind_another_head_reuses_its_pieces_and_matches_a_whole_encode(hf):
    # A document quoted after different heads (a date, a user id): the prefix cache cannot
    # help, the piece cache serves the document's pieces wherever they start.
    tok = ModelTokenizer(hf, cut_chars=64)
    document = "".join(f"Clause {i}: the tenant's  deposit, 12{i}5 units.\n" for i in range(40))
    for head in ("2026-12-03 ", "user 7781: ", "Ünïcode head — ", ""):
        for add in (False, True):
            text = head + document
            whole = list(hf(text, add_special_tokens=add)["input_ids"])
            assert list(tok.encode(text, add_special_tokens=add).token_ids) == whole
    assert tok._pieces, "the document's pieces are kept"
    hits = sum(1 for piece in tok._pieces if piece in document)
    assert hits >= len(document) // 64 - 2
    # The budget bounds the pieces' ids.
    small = ModelTokenizer(hf, cut_chars=64, piece_cache_tokens=100)
    small.encode(document, add_special_tokens=False)
    assert 0 < small._piece_tokens <= 100
    assert small._piece_tokens == sum(len(ids) for ids in small._pieces.values())


def test_tokenizer_without_independent_pieces_encodes_whole(hf):
    # Same tokenizer but the special-token splitter disabled: must fall back to whole encoding.
    class NoSpecials:
        def __init__(self, inner):
            self._inner = inner
            self.added_tokens_decoder = {}
            self.backend_tokenizer = inner.backend_tokenizer
            self.chat_template = inner.chat_template

        def __call__(self, *a, **k):
            return self._inner(*a, **k)

        def __getattr__(self, name):
            return getattr(self._inner, name)

    plain = ModelTokenizer(NoSpecials(hf))
    assert not plain.incremental
    body = {"messages": [{"role": "user", "content": "hi"}]}
    assert list(plain.tokenize_body(body, chat=True).token_ids) == _reference(hf, body["messages"])[1]


def test_load_tokenizer_error_names_the_path(tmp_path):
    with pytest.raises(ValueError, match="no tokenizer directory"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(ValueError, match="cannot load tokenizer 'no-such/model-id'"):
        load_tokenizer("no-such/model-id")


# ---- the tokenizing analyzer -----------------------------------------------------------------

def _fields(body, endpoint=Endpoint.CHAT, rid="r1", text="", ids=None):
    return RequestFields(endpoint, "/v1/x", body, {}, rid, body["model"], prompt_text=text,
                         prompt_token_ids=ids)


@pytest.fixture()
def analyzer(hf):
    shapes = {"tiny": ModelShape("tiny", None, 16), "tiny-lora": ModelShape("tiny", "tiny-lora", 16)}
    a = TokenizingAnalyzer({"tiny": ModelTokenizer(hf)}, KvMetrics(),
                           shape_of=lambda m: shapes.get(m, ModelShape(m, None, 16)))
    yield a
    a.close()


async def test_analyzer_exact_tokens_and_block_hashes(analyzer, hf):
    messages = [{"role": "user", "content": "tell me about caches " * 30}]
    request = await analyzer.analyze(_fields({"model": "tiny", "messages": messages}))
    _, ids = _reference(hf, messages)
    assert request.tokens_exact and request.prompt_tokens == len(ids)
    assert request.block_size == 16
    assert request.block_hashes == BlockHasher(Namespace("tiny"), 16).hash_tokens(ids)


async def test_analyzer_multi_turn_hashes_equal_fresh_hashes(analyzer, hf):
    history = [{"role": "system", "content": "system words " * 100}]
    for turn in range(3):
        history.append({"role": "user", "content": f"turn {turn} " * 20})
        request = await analyzer.analyze(_fields({"model": "tiny", "messages": list(history)},
                                                 rid=f"t{turn}"))
        _, ids = _reference(hf, history)
        assert request.block_hashes == BlockHasher(Namespace("tiny"), 16).hash_tokens(ids)
        history.append({"role": "assistant", "content": f"answer {turn} " * 10})
    reused = analyzer.metrics.registry.get_sample_value("kvrouter_tokenize_reused_tokens_total",
                                                        {"model": "tiny"})
    assert reused and reused > 300


async def test_the_same_prompt_again_hands_over_the_same_hash_chain(analyzer, hf):
    body = {"model": "tiny", "prompt": "caches hold blocks of tokens " * 40}
    first = await analyzer.analyze(_fields(body, Endpoint.COMPLETIONS, rid="a"))
    second = await analyzer.analyze(_fields(dict(body), Endpoint.COMPLETIONS, rid="b"))
    ids = hf.encode(body["prompt"], add_special_tokens=True)
    assert second.block_hashes is first.block_hashes  # the policy's index reuses its walk
    assert second.block_hashes == BlockHasher(Namespace("tiny"), 16).hash_tokens(ids)


@pytest.mark.parametrize("endpoint", [Endpoint.CHAT, Endpoint.COMPLETIONS])
async def test_small_prompts_are_analyzed_on_the_loop_large_ones_in_the_pool(hf, endpoint):
    text = "words on the loop " * 20
    body = ({"model": "tiny", "messages": [{"role": "user", "content": text}]}
            if endpoint == Endpoint.CHAT else {"model": "tiny", "prompt": text})
    fields = _fields(body, endpoint=endpoint, text=text)
    results = []
    for inline_chars in (len(text), len(text) - 1):
        a = TokenizingAnalyzer({"tiny": ModelTokenizer(hf)}, KvMetrics(),
                               shape_of=lambda m: ModelShape(m, None, 16), inline_chars=inline_chars)
        results.append(await a.analyze(fields))
        a.close()  # a closed pool refuses work: only a prompt analyzed inline still gets through
        if inline_chars == len(text):
            assert (await a.analyze(fields)).block_hashes == results[0].block_hashes
        else:
            with pytest.raises(RuntimeError):
                await a.analyze(fields)
    assert results[0].block_hashes == results[1].block_hashes and results[0].block_hashes


async def test_analyzer_namespaces_salt_and_lora(analyzer):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "same words " * 40}]}
    plain = await analyzer.analyze(_fields(body))
    salted = await analyzer.analyze(_fields({**body, "cache_salt": "tenant-a"}))
    lora = await analyzer.analyze(_fields({**body, "model": "tiny-lora"}))
    assert plain.prompt_tokens == salted.prompt_tokens == lora.prompt_tokens
    assert len({plain.block_hashes[0], salted.block_hashes[0], lora.block_hashes[0]}) == 3
    # Only the salted one is kept away from engine events (they carry no salt).
    assert salted.salted and not plain.salted and not lora.salted
    assert plain.matches_events and lora.matches_events and not salted.matches_events


async def test_analyzer_falls_back_and_counts(analyzer):
    text = "x" * 1000
    request = await analyzer.analyze(_fields(
        {"model": "unknown", "prompt": text}, Endpoint.COMPLETIONS, text=text))
    assert not request.tokens_exact and request.prompt_tokens == 250
    assert len(request.block_hashes) == 1000 // 64
    ids = await analyzer.analyze(_fields(
        {"model": "unknown", "prompt": list(range(40))}, Endpoint.COMPLETIONS, ids=tuple(range(40))))
    assert ids.tokens_exact and ids.block_hashes == BlockHasher(
        Namespace("unknown"), 16).hash_tokens(list(range(40)))
    # A body the tokenizer rejects is routed on the estimate too (the engine answers it).
    bad = await analyzer.analyze(_fields(
        {"model": "tiny", "prompt": "hello", "add_special_tokens": "yes"}, Endpoint.COMPLETIONS,
        text="hello"))
    assert not bad.tokens_exact
    fallback = analyzer.metrics.registry.get_sample_value
    assert fallback("kvrouter_tokenize_fallback_total", {"model": "unknown"}) == 1
    assert fallback("kvrouter_tokenize_fallback_total", {"model": "tiny"}) == 1


def test_chat_template_kwargs_and_string_content_format(hf):
    import copy

    custom = copy.deepcopy(hf)
    # A string-format template (it prints content, never loops over it) reading a kwarg.
    custom.chat_template = ("{% for m in messages %}<|start|>{{ m['role'] }} {{ flavor }}\n"
                            "{{ m['content'] }}<|end|>\n{% endfor %}"
                            "{% if add_generation_prompt %}<|start|>assistant\n{% endif %}")
    tok = ModelTokenizer(custom)
    parts = [{"type": "text", "text": "one"}, {"type": "image_url", "image_url": {"url": "x"}},
             {"type": "text", "text": "two"}]
    body = {"messages": [{"role": "user", "content": parts}],
            "chat_template_kwargs": {"flavor": "salty"}}
    result = tok.tokenize_body(body, chat=True)
    # vLLM joins a string-format template's text parts with newlines and passes the kwargs.
    assert result.text == "<|start|>user salty\none\ntwo<|end|>\n<|start|>assistant\n"
    assert list(result.token_ids) == hf(result.text, add_special_tokens=False)["input_ids"]


def test_warm_compiles_the_chat_template_and_leaves_the_caches_alone(hf):
    from transformers.utils import chat_template_utils

    chat_template_utils._compile_jinja_template.cache_clear()
    tok = ModelTokenizer(hf)
    tok.warm()
    assert chat_template_utils._compile_jinja_template.cache_info().currsize >= 1
    assert tok.cache.tokens == 0 and len(tok.cache) == 0 and not tok._pieces


def test_warm_renders_with_tools_and_survives_a_tokenizer_without_a_template(hf):
    import copy

    from transformers.utils import chat_template_utils

    chat_template_utils._compile_jinja_template.cache_clear()
    ModelTokenizer(hf).warm()
    # Plain and tool-bearing renders of the shipped template: both compiled at start-up.
    assert chat_template_utils._compile_jinja_template.cache_info().hits >= 2
    bare = copy.deepcopy(hf)
    bare.chat_template = None
    tok = ModelTokenizer(bare)
    tok.warm()  # chat requests get their clear error later, not the start-up
    assert tok.words is not None and len(tok.words) > 1_000


async def test_a_base_model_without_chat_template_serves_completions_and_estimates_chats(hf):
    # A base model's tokenizer has no chat template: the router must still start (warm) and
    # tokenize its completions exactly; a chat request to it is the engine's to refuse, so the
    # router routes it on the estimate instead of failing it with a 500.
    import copy

    bare = copy.deepcopy(hf)
    bare.chat_template = None
    tokenizer = ModelTokenizer(bare)
    tokenizer.warm()
    analyzer = TokenizingAnalyzer({"base": tokenizer}, KvMetrics(),
                                  shape_of=lambda m: ModelShape(m, None, 16))
    try:
        text = "plain completion words " * 10
        completion = await analyzer.analyze(_fields(
            {"model": "base", "prompt": text}, Endpoint.COMPLETIONS, text=text))
        assert completion.tokens_exact
        assert completion.prompt_tokens == len(hf.encode(text, add_special_tokens=True))
        chat = await analyzer.analyze(_fields(
            {"model": "base", "messages": [{"role": "user", "content": text}]}, text=text))
        assert not chat.tokens_exact and chat.prompt_tokens == math.ceil(len(text) / 4)
        assert analyzer.metrics.registry.get_sample_value(
            "kvrouter_tokenize_fallback_total", {"model": "base"}) == 1
    finally:
        analyzer.close()
