"""The emulator answers what vLLM answers where peers and clients depend on it: the render
endpoints vllm-router calls, tools rendered into the chat template exactly as the router renders
them (token parity, hence hits), a forced named tool call, ``n`` choices, ``logprobs``, and one
pod made slower than the others. Real local servers throughout."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from router.prompt.chat_render import render_chat
from simulator.emulator.fleet import EmulatedCluster
from simulator.tiny_tokenizer import default_path

MODEL = "tiny-llama"
SYSTEM = "shared instructions of a tool-using agent. " * 30
TOOLS = [
    {"type": "function", "function": {
        "name": "search_docs", "description": "Search the documents.",
        "parameters": {"type": "object", "properties": {"query": {"type": "string"}},
                       "required": ["query"]}}},
    {"type": "function", "function": {"name": "read_file"}},
]  # fmt: skip
MESSAGES = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "find the latency numbers"},
    {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function",
     "function": {"name": "search_docs", "arguments": "{\"query\": \"latency\"}"}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "p99 is 0.2 s"},
]  # fmt: skip


@pytest.fixture
async def cluster() -> AsyncIterator[EmulatedCluster]:
    async with EmulatedCluster(count=2, time_scale=100.0, scale_out=True) as c:
        yield c


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
        yield s


async def post(s: aiohttp.ClientSession, url: str, body: Any) -> tuple[int, Any]:
    async with s.post(url, json=body) as r:
        return r.status, await r.json()


async def sse(s: aiohttp.ClientSession, url: str, body: Any) -> list[Any]:
    async with s.post(url, json=body) as r:
        assert r.status == 200, await r.text()
        text = await r.text()
    events = [line[len("data: "):] for line in text.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


# -- render ------------------------------------------------------------------------------------

async def test_render_endpoints_answer_generate_requests(
    cluster: EmulatedCluster, session: aiohttp.ClientSession
) -> None:
    url = cluster.urls[0]
    status, tok = await post(session, f"{url}/tokenize", {"model": MODEL, "prompt": "hello"})
    assert status == 200
    status, out = await post(session, f"{url}/v1/completions/render",
                             {"model": MODEL, "prompt": ["hello", "bye now"], "max_tokens": 5})
    assert status == 200 and isinstance(out, list) and len(out) == 2
    assert out[0]["token_ids"] == tok["tokens"] and out[1]["token_ids"] != tok["tokens"]
    assert out[0]["request_id"].startswith("cmpl-") and out[0]["model"] == MODEL
    assert out[0]["sampling_params"]["max_tokens"] == 5 and out[0]["token_offsets"] is None
    body = {"model": MODEL, "messages": MESSAGES, "tools": TOOLS, "temperature": 0.25,
            "stream": True, "stream_options": {"include_usage": True}}
    status, chat = await post(session, f"{url}/v1/chat/completions/render", body)
    assert status == 200 and isinstance(chat, dict)
    assert chat["request_id"].startswith("chatcmpl-")
    assert chat["sampling_params"]["temperature"] == 0.25
    assert chat["stream"] is True and chat["stream_options"] == {"include_usage": True}
    status, tok = await post(session, f"{url}/tokenize",
                             {"model": MODEL, "messages": MESSAGES, "tools": TOOLS})
    assert chat["token_ids"] == tok["tokens"]
    status, err = await post(session, f"{url}/v1/chat/completions/render",
                             {"model": "other", "messages": MESSAGES})
    assert status == 404 and err["error"]["type"] == "NotFoundError"


async def test_render_endpoints_need_scale_out(session: aiohttp.ClientSession) -> None:
    async with EmulatedCluster(count=1, time_scale=100.0) as plain:
        async with session.post(f"{plain.urls[0]}/v1/completions/render",
                                json={"model": MODEL, "prompt": "hi"}) as r:
            assert r.status == 404


# -- tools -------------------------------------------------------------------------------------

async def test_tools_render_like_the_router_and_hit(
    cluster: EmulatedCluster, session: aiohttp.ClientSession
) -> None:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(default_path()))
    body = {"model": MODEL, "messages": MESSAGES, "tools": TOOLS, "max_tokens": 2}
    expected = hf.encode(render_chat(hf, body), add_special_tokens=False)
    _, tok = await post(session, f"{cluster.urls[0]}/tokenize", body)
    assert tok["tokens"] == expected  # token parity with the router's tokenizer path
    _, plain = await post(session, f"{cluster.urls[0]}/tokenize",
                               {"model": MODEL, "messages": MESSAGES})
    assert plain["count"] < tok["count"]  # the tools are in the prompt
    url = f"{cluster.urls[0]}/v1/chat/completions"
    _, first = await post(session, url, body)
    _, second = await post(session, url, body)
    assert first["usage"]["prompt_tokens"] == len(expected)
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] >= len(expected) - 16


async def test_forced_named_tool_choice_answers_a_tool_call(
    cluster: EmulatedCluster, session: aiohttp.ClientSession
) -> None:
    url = f"{cluster.urls[0]}/v1/chat/completions"
    body = {"model": MODEL, "messages": MESSAGES, "tools": TOOLS, "max_tokens": 4,
            "tool_choice": {"type": "function", "function": {"name": "search_docs"}}}
    status, out = await post(session, url, body)
    assert status == 200
    choice = out["choices"][0]
    call = choice["message"]["tool_calls"][0]
    assert choice["message"]["content"] == "" and choice["finish_reason"] == "stop"
    assert call["type"] == "function" and call["id"].startswith("chatcmpl-tool-")
    assert call["function"]["name"] == "search_docs"
    assert set(json.loads(call["function"]["arguments"])) == {"query"}
    chunks = await sse(session, url, {**body, "stream": True})
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0] == {"role": "assistant", "content": ""}
    calls = [d["tool_calls"][0] for d in deltas[1:]]
    assert calls[0]["function"]["name"] == "search_docs" and "id" in calls[0]
    assert all("name" not in c["function"] for c in calls[1:])
    args = "".join(c["function"]["arguments"] for c in calls)
    assert json.loads(args) == json.loads(call["function"]["arguments"])
    status, err = await post(session, url, {**body, "tool_choice": {
        "type": "function", "function": {"name": "nope"}}})
    assert status == 400 and err["error"]["param"] == "tool_choice"


# -- n and logprobs ----------------------------------------------------------------------------

async def test_n_choices_whole_and_streamed(
    cluster: EmulatedCluster, session: aiohttp.ClientSession
) -> None:
    url = f"{cluster.urls[1]}/v1/chat/completions"
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
            "n": 3}
    status, out = await post(session, url, body)
    assert status == 200 and [c["index"] for c in out["choices"]] == [0, 1, 2]
    assert out["usage"]["completion_tokens"] == 9
    chunks = await sse(session, url, {**body, "n": 2, "stream": True,
                                      "stream_options": {"include_usage": True}})
    roles = [c["choices"][0]["index"] for c in chunks
             if c["choices"] and c["choices"][0]["delta"].get("role")]
    assert sorted(roles) == [0, 1]
    finished = [c["choices"][0]["index"] for c in chunks
                if c["choices"] and c["choices"][0]["finish_reason"] == "length"]
    assert sorted(finished) == [0, 1]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6
    status, err = await post(session, url, {**body, "n": 0})
    assert status == 400 and err["error"]["param"] == "n"


async def test_logprobs_in_vllm_shapes(
    cluster: EmulatedCluster, session: aiohttp.ClientSession
) -> None:
    url = cluster.urls[0]
    status, out = await post(session, f"{url}/v1/completions",
                             {"model": MODEL, "prompt": "hello", "max_tokens": 3, "logprobs": 2})
    assert status == 200
    lp = out["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["text_offset"]) == 3
    assert "".join(lp["tokens"]) == out["choices"][0]["text"]
    assert all(len(t) == 2 and max(t.values()) <= 0 for t in lp["top_logprobs"])
    assert lp["text_offset"][1] == len(lp["tokens"][0])
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
            "logprobs": True, "top_logprobs": 3}
    status, out = await post(session, f"{url}/v1/chat/completions", chat)
    content = out["choices"][0]["logprobs"]["content"]
    assert len(content) == 3 and all(len(e["top_logprobs"]) == 3 for e in content)
    assert content[0]["bytes"] == list(content[0]["token"].encode())
    assert content[0]["top_logprobs"][0]["token"] == content[0]["token"]
    chunks = await sse(session, f"{url}/v1/chat/completions", {**chat, "stream": True})
    streamed = [e for c in chunks[1:] for e in c["choices"][0]["logprobs"]["content"]]
    assert [e["token"] for e in streamed] == [e["token"] for e in content]
    status, err = await post(session, f"{url}/v1/chat/completions",
                             {**chat, "logprobs": False})
    assert status == 400 and err["error"]["param"] == "top_logprobs"


# -- a slow pod --------------------------------------------------------------------------------

async def test_one_pod_slower(session: aiohttp.ClientSession) -> None:
    # Real time (time_scale 1) and 48 decode steps: ~0.2 s of engine time on the fast pod,
    # ~0.8 s on the slow one, so a loaded machine's ~0.1 s of event-loop delay per request
    # cannot hide a 4x factor (at time_scale 4 it did: 0.11 s against 0.12 s).
    async with EmulatedCluster(count=2, time_scale=1.0, slow_pods={1: 4.0}) as c:
        body = {"model": MODEL, "prompt": "a long enough prompt " * 100, "max_tokens": 48}
        took = []
        for url in c.urls:
            start = time.monotonic()
            status, _ = await post(session, f"{url}/v1/completions", body)
            assert status == 200
            took.append(time.monotonic() - start)
    assert took[1] > 2.0 * took[0], took
    with pytest.raises(ValueError, match="slow pod index 2"):
        EmulatedCluster(count=2, slow_pods={2: 4.0})


async def test_choices_on_a_prefill_decode_pod_are_a_clear_400(
    session: aiohttp.ClientSession,
) -> None:
    async with EmulatedCluster(count=1, time_scale=100.0, role="decode") as pd:
        status, err = await post(session, f"{pd.urls[0]}/v1/completions",
                                 {"model": MODEL, "prompt": "hi", "n": 2})
    assert status == 400 and "prefill/decode" in err["error"]["message"]


async def test_rendering_on_every_pod_tokenizes_once(
    cluster: EmulatedCluster, session: aiohttp.ClientSession
) -> None:
    """vllm-router renders each request on every pod, then sends it to one: the pods share
    one process here (real pods have a CPU each), so each piece of the prompt between its
    special tokens is encoded once, not N+1 times, and every answer still carries the same
    tokens."""
    codec = cluster.pods[0].codec
    calls = []
    encode = codec._encode  # type: ignore[attr-defined]

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(args[0])
        return encode(*args, **kwargs)

    codec._encode = counting  # type: ignore[attr-defined]
    body = {"model": MODEL, "messages": MESSAGES, "tools": TOOLS, "max_tokens": 2}
    renders = []
    for url in cluster.urls:
        status, out = await post(session, f"{url}/v1/chat/completions/render", body)
        assert status == 200
        renders.append(out["token_ids"])
    status, answer = await post(session, f"{cluster.urls[1]}/v1/chat/completions", body)
    assert status == 200 and answer["usage"]["prompt_tokens"] == len(renders[0])
    assert renders[0] == renders[1]
    assert calls and len(calls) == len(set(calls))
