"""The emulator's vLLM-compatible HTTP API against real local servers: completions and chat,
streaming and not, cached_tokens growing on a repeated prefix, metric names, tokenize, errors,
and the SGLang flavour."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from simulator.emulator.chat import shape_chat
from simulator.emulator.fleet import EmulatedCluster
from simulator.emulator.pod import ByteCodec, load_codec

MODEL = "tiny-llama"
LONG_PROMPT = "the system prompt of a tenant with a long shared prefix. " * 20


@pytest.fixture
async def cluster() -> AsyncIterator[EmulatedCluster]:
    async with EmulatedCluster(count=2, time_scale=100.0, block_size=16) as c:
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
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/event-stream")
        text = await r.text()
    events = [line[len("data: ") :] for line in text.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def metrics(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


async def test_completion_cached_tokens_grow_on_a_repeated_prefix(
    cluster: EmulatedCluster, session: aiohttp.ClientSession
) -> None:
    url = cluster.urls[0] + "/v1/completions"
    body = {"model": MODEL, "prompt": LONG_PROMPT, "max_tokens": 4}
    status, first = await post(session, url, body)
    assert status == 200
    assert first["object"] == "text_completion"
    assert first["choices"][0]["finish_reason"] == "length"
    prompt_tokens = first["usage"]["prompt_tokens"]
    assert first["usage"]["completion_tokens"] == 4
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    status, second = await post(session, url, body)
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached == (prompt_tokens - 1) // 16 * 16 > 0
    assert second["choices"][0]["text"] == first["choices"][0]["text"] != ""
    # A longer prompt sharing the prefix hits the same blocks; the other pod has nothing.
    status, third = await post(
        session, url, {**body, "prompt": LONG_PROMPT + " and a new question?"}
    )
    assert third["usage"]["prompt_tokens_details"]["cached_tokens"] >= cached
    status, other = await post(session, cluster.urls[1] + "/v1/completions", body)
    assert other["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


async def test_token_id_prompt_matches_text_prompt(
    cluster: EmulatedCluster, session: aiohttp.ClientSession
) -> None:
    base = cluster.urls[0]
    status, tok = await post(session, base + "/tokenize", {"model": MODEL, "prompt": LONG_PROMPT})
    assert status == 200 and tok["count"] == len(tok["tokens"]) and tok["max_model_len"] == 8192
    await post(
        session, base + "/v1/completions", {"model": MODEL, "prompt": LONG_PROMPT, "max_tokens": 1}
    )
    status, by_ids = await post(
        session,
        base + "/v1/completions",
        {"model": MODEL, "prompt": tok["tokens"], "max_tokens": 1},
    )
    assert by_ids["usage"]["prompt_tokens"] == tok["count"]
    assert by_ids["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    status, detok = await post(
        session, base + "/detokenize", {"model": MODEL, "tokens": tok["tokens"]}
    )
    assert detok["prompt"] == LONG_PROMPT


async def test_streaming_completion_with_usage(
    cluster: EmulatedCluster, session: aiohttp.ClientSession
) -> None:
    chunks = await sse(
        session,
        cluster.urls[0] + "/v1/completions",
        {
            "model": MODEL,
            "prompt": "hello",
            "max_tokens": 5,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    texts = [c["choices"][0]["text"] for c in chunks if c["choices"]]
    assert len(texts) == 5
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]] == [None] * 4 + [
        "length"
    ]
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == 5
    assert "prompt_tokens_details" in chunks[-1]["usage"]


async def test_chat_streaming_first_chunk_is_the_role(
    cluster: EmulatedCluster, session: aiohttp.ClientSession
) -> None:
    messages = [{"role": "system", "content": LONG_PROMPT}, {"role": "user", "content": "hi"}]
    chunks = await sse(
        session,
        cluster.urls[0] + "/v1/chat/completions",
        {"model": MODEL, "messages": messages, "max_tokens": 3, "stream": True},
    )
    assert chunks[0]["object"] == "chat.completion.chunk"
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert len(chunks) == 4 and all("usage" not in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    # Non-streaming chat of the same conversation hits the cached system prompt.
    status, reply = await post(
        session,
        cluster.urls[0] + "/v1/chat/completions",
        {"model": MODEL, "messages": messages, "max_tokens": 2},
    )
    assert status == 200 and reply["object"] == "chat.completion"
    assert reply["choices"][0]["message"]["role"] == "assistant"
    assert reply["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    status, tok = await post(
        session, cluster.urls[0] + "/tokenize", {"model": MODEL, "messages": messages}
    )
    assert tok["count"] == reply["usage"]["prompt_tokens"]


async def test_next_turn_hits_the_previous_answer(
    cluster: EmulatedCluster, session: aiohttp.ClientSession
) -> None:
    url = cluster.urls[0] + "/v1/chat/completions"
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    status, turn1 = await post(
        session, url, {"model": MODEL, "messages": messages, "max_tokens": 40}
    )
    assert status == 200
    answer = turn1["choices"][0]["message"]["content"]
    messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": "more"}]
    status, turn2 = await post(
        session, url, {"model": MODEL, "messages": messages, "max_tokens": 1}
    )
    # The cached prefix reaches past the first turn's prompt into its answer (vLLM caches
    # output blocks; the tiny tokenizer re-encodes the filler answer to the same ids).
    cached = turn2["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached >= turn1["usage"]["prompt_tokens"] + 16


async def test_metrics_have_vllm_names_and_labels(
    cluster: EmulatedCluster, session: aiohttp.ClientSession
) -> None:
    body = {"model": MODEL, "prompt": LONG_PROMPT, "max_tokens": 3}
    await post(session, cluster.urls[0] + "/v1/completions", body)
    await post(session, cluster.urls[0] + "/v1/completions", body)
    async with session.get(cluster.urls[0] + "/metrics") as r:
        found = metrics(await r.text())
    labels = (("engine", "0"), ("model_name", MODEL))
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:prefix_cache_queries_total",
        "vllm:prefix_cache_hits_total",
        "vllm:num_preemptions_total",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "vllm:time_to_first_token_seconds_count",
    ):
        assert labels in found[name], name
    assert found["vllm:generation_tokens_total"][labels] == 6
    assert found["vllm:time_to_first_token_seconds_count"][labels] == 2
    queries = found["vllm:prefix_cache_queries_total"][labels]
    hits = found["vllm:prefix_cache_hits_total"][labels]
    assert 0 < hits < queries
    (info_labels,) = found["vllm:cache_config_info"]
    assert dict(info_labels)["block_size"] == "16"
    assert dict(info_labels)["num_gpu_blocks"] == "4096"


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ({"prompt": "hi"}, 400, "model"),
        ({"model": "other", "prompt": "hi"}, 404, "does not exist"),
        ({"model": MODEL, "prompt": "hi", "max_tokens": 9000}, 400, "maximum context length"),
        ({"model": MODEL, "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
        ({"model": MODEL, "prompt": {"x": 1}}, 400, "prompt"),
        ({"model": MODEL, "prompt": ""}, 400, "empty"),
        ({"model": MODEL, "prompt": [5, 10**6]}, 400, "out of vocabulary"),
    ],
    ids=[
        "missing-model",
        "unknown-model",
        "too-long",
        "zero-max-tokens",
        "bad-prompt",
        "empty",
        "out-of-vocabulary",
    ],
)
async def test_rejects_like_vllm(
    cluster: EmulatedCluster,
    session: aiohttp.ClientSession,
    body: dict[str, Any],
    status: int,
    fragment: str,
) -> None:
    got, answer = await post(session, cluster.urls[0] + "/v1/completions", body)
    assert got == status
    assert set(answer["error"]) == {"message", "type", "param", "code"}
    assert answer["error"]["code"] == status
    assert fragment in answer["error"]["message"]


async def test_bad_json_and_info_endpoints(
    cluster: EmulatedCluster, session: aiohttp.ClientSession
) -> None:
    base = cluster.urls[0]
    async with session.post(base + "/v1/chat/completions", data=b"{not json") as r:
        assert r.status == 400
        assert (await r.json())["error"]["type"] == "BadRequestError"
    async with session.get(base + "/health") as r:
        assert r.status == 200
    async with session.get(base + "/v1/models") as r:
        data = (await r.json())["data"]
    assert data[0]["id"] == MODEL and data[0]["max_model_len"] == 8192
    async with session.get(base + "/kv_event_sources") as r:
        (source,) = await r.json()
    assert source["endpoint"].startswith("tcp://*:") and source["topic"] == "kv@pod-0"
    assert source["replay_endpoint"].startswith("tcp://*:")


async def test_reset_prefix_cache_drops_hits(
    cluster: EmulatedCluster, session: aiohttp.ClientSession
) -> None:
    url = cluster.urls[0] + "/v1/completions"
    body = {"model": MODEL, "prompt": LONG_PROMPT, "max_tokens": 1}
    await post(session, url, body)
    async with session.post(cluster.urls[0] + "/reset_prefix_cache") as r:
        assert r.status == 200
    _status, again = await post(session, url, body)
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


async def test_sglang_flavour(session: aiohttp.ClientSession) -> None:
    async with EmulatedCluster(
        count=1, engine="sglang", time_scale=100.0, kv_events_endpoint=None
    ) as c:
        base = c.urls[0]
        body = {"model": MODEL, "prompt": LONG_PROMPT, "max_tokens": 2}
        await post(session, base + "/v1/completions", body)
        _status, second = await post(session, base + "/v1/completions", body)
        assert second["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
        async with session.get(base + "/get_server_info") as r:
            info = await r.json()
        assert info["page_size"] == 16 and info["context_length"] == 8192
        async with session.get(base + "/get_model_info") as r:
            assert (await r.json())["is_generation"] is True
        async with session.get(base + "/metrics") as r:
            found = metrics(await r.text())
        for name in ("sglang:num_running_reqs", "sglang:num_queue_reqs", "sglang:token_usage"):
            assert (("model_name", MODEL),) in found[name]
        rate = found["sglang:cache_hit_rate"][(("model_name", MODEL),)]
        assert 0.3 < rate < 0.6  # the second of two identical prompts hit almost all of it
        assert not any(name.startswith("vllm:") for name in found)
        async with session.get(base + "/kv_event_sources") as r:
            assert await r.json() == []


def test_byte_fallback_is_deterministic_and_reversible(tmp_path: Any) -> None:
    codec = load_codec(tmp_path / "no-tokenizer-here")
    assert isinstance(codec, ByteCodec)
    ids = codec.encode("héllo")
    assert ids == codec.encode("héllo") and codec.decode(ids) == "héllo"
    messages = [{"role": "user", "content": "hi"}]
    assert codec.chat(shape_chat({"messages": messages})) == codec.encode(
        "user: hi\nassistant: "
    )
    tools = [{"type": "function", "function": {"name": "f"}}]
    assert codec.chat(shape_chat({"messages": messages, "tools": tools})) == codec.encode(
        'tool: {"function": {"description": null, "name": "f", "parameters": null}, '
        '"type": "function"}\nuser: hi\nassistant: '
    )


async def test_pods_warm_their_chat_template_before_serving() -> None:
    # vLLM 0.32 compiles its chat template at start-up (OnlineRenderer.warmup), so the first
    # chat request does not pay it; the emulated pods do the same.
    from transformers.utils import chat_template_utils

    chat_template_utils._compile_jinja_template.cache_clear()
    async with EmulatedCluster(count=1, time_scale=100.0, block_size=16):
        assert chat_template_utils._compile_jinja_template.cache_info().currsize >= 1


async def test_a_pod_steps_as_an_engine_core_of_its_own_would() -> None:
    # Every emulated pod shares one event loop: a pod's engine may run only after other work
    # (here 30 ms of it, blocking the loop) although two cold requests reached it 5 ms apart.
    # A vLLM engine core would have started on the first at once, alone: its first token comes
    # a whole prefill before the second's, not in the same step.
    import asyncio
    import time

    async with EmulatedCluster(count=1, time_scale=1.0, block_size=16,
                               kv_events_endpoint=None) as c:
        pod = c.pods[0]
        ids = pod.codec.encode(" ".join(f"w{i}" for i in range(3000)))[:2000]
        first = pod.submit(ids, 1, streaming=True)
        time.sleep(0.005)  # noqa: ASYNC251 - blocking on purpose: the loop is busy
        second = pod.submit([7, *ids[1:]], 1, streaming=True)
        time.sleep(0.030)  # noqa: ASYNC251 - busy elsewhere; an engine core would not be
        loop = asyncio.get_running_loop()
        at = {}

        async def first_token(name: str, stream: Any) -> None:
            await stream.next_token()
            at[name] = loop.time()

        await asyncio.gather(first_token("first", first), first_token("second", second))
        # ~2,000-token prefills take ~60 ms each on the H200 profile.
        assert at["second"] - at["first"] > 0.03, at
