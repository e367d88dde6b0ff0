"""Client input the router must answer itself: a 400 naming the problem, never a 500, and
every answer the router makes itself (errors of every status, ``/v1/models``) carries
``x-request-id``."""

from __future__ import annotations

import asyncio
import json

import pytest

from router.kv.metrics import KvMetrics
from router.prompt.token_analyzer import ModelShape, TokenizingAnalyzer
from router.prompt.tokenize import ModelTokenizer, load_tokenizer
from simulator.tiny_tokenizer import default_path


@pytest.fixture(scope="module")
def hf():
    return load_tokenizer(default_path())


@pytest.fixture()
def analyzer(hf):
    a = TokenizingAnalyzer({"tiny": ModelTokenizer(hf)}, KvMetrics(),
                           shape_of=lambda m: ModelShape(m, None, 16))
    yield a
    a.close()


DEEP = b'{"model": "tiny", "prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}"
SURROGATE = b'{"model": "tiny", "prompt": "hello \\ud800 world"}'
SURROGATE_CHAT = b'{"model": "tiny", "messages": [{"role": "user", "content": "a\\udfff"}]}'
IDS_TOO_BIG = json.dumps({"model": "tiny", "prompt": [2**32] * 20}).encode()
IDS_NEGATIVE = json.dumps({"model": "other", "prompt": [-1] * 40}).encode()
TOOL_CALLS = json.dumps({"model": "tiny", "messages": [
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "x", "tool_calls": 5}]}).encode()


@pytest.mark.parametrize(("path", "body", "param", "words"), [
    ("/v1/completions", DEEP, None, "nested too deeply"),
    ("/v1/chat/completions", DEEP.replace(b'"prompt"', b'"messages"'), None, "nested too deeply"),
    ("/v1/completions", SURROGATE, "prompt", "lone surrogate"),
    ("/v1/chat/completions", SURROGATE_CHAT, "messages", "lone surrogate"),
    ("/v1/completions", IDS_TOO_BIG, "prompt", "[0, 2**32)"),
    ("/v1/completions", IDS_NEGATIVE, "prompt", "[0, 2**32)"),  # a model with no tokenizer
    ("/v1/chat/completions", TOOL_CALLS, "messages[1].tool_calls", "must be a list"),
], ids=["deep-json", "deep-json-chat", "surrogate", "surrogate-chat", "ids-too-big",
        "ids-negative", "tool-calls-int"])
async def test_bad_input_is_a_400_naming_the_problem(start_backend, start_router, http, analyzer,
                                                     path, body, param, words):
    a = await start_backend(models=["tiny", "other"])
    router = await start_router({"backends": [a.url]}, analyzer=analyzer)
    async with http.post(router.url + path, data=body,
                         headers={"Content-Type": "application/json"}) as response:
        assert response.status == 400, await response.text()
        assert response.headers.get("x-request-id")
        error = (await response.json())["error"]
    assert error["type"] == "invalid_request_error"
    assert words in error["message"] and error["param"] == param
    assert a.received == []


async def test_tool_calls_not_a_list_is_a_prompt_error_in_rendering(hf):
    from router.prompt.chat_render import PromptError

    tokenizer = ModelTokenizer(hf)
    with pytest.raises(PromptError, match=r"messages\[0\].tool_calls must be a list"):
        tokenizer.tokenize_body({"messages": [{"role": "assistant", "tool_calls": 7}]},
                                chat=True)


async def _raw(port: int, data: bytes) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in
               (line.partition(":") for line in lines[1:] if line)}
    body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), 5)
    writer.close()
    return int(lines[0].split()[1]), headers, body


async def test_every_router_made_answer_carries_a_request_id(start_backend, start_router,
                                                             http):
    a = await start_backend()
    router = await start_router({"backends": [a.url, "http://127.0.0.1:9"],
                                 "server": {"max_body_bytes": 1000},
                                 "retries": {"max_attempts": 1}})
    url = router.url
    port = int(url.rsplit(":", 1)[1])
    seen = []
    cases = [("GET", "/nope", None, 404), ("DELETE", "/v1/completions", None, 405),
             ("POST", "/v1/completions", b"x" * 2000, 413),
             ("POST", "/v1/completions", b"{", 400)]
    for method, path, body, status in cases:
        async with http.request(method, url + path, data=body) as response:
            assert response.status == status, path
            seen.append(response.headers.get("x-request-id"))
            assert (await response.json())["error"]["message"]
    async with http.get(url + "/v1/models") as response:
        assert response.status == 200
        seen.append(response.headers.get("x-request-id"))
    # The client's own id is kept.
    async with http.get(url + "/nope", headers={"x-request-id": "mine-1"}) as response:
        assert response.headers.get("x-request-id") == "mine-1"
    # Errors the HTTP layer answers before any handler runs.
    status, headers, body = await _raw(port, b"GARBAGE\r\n\r\n")
    assert status == 400 and headers.get("x-request-id") and json.loads(body)["error"]
    seen.append(headers.get("x-request-id"))
    status, headers, body = await _raw(
        port, b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n")
    assert status == 431 and headers.get("x-request-id")
    # 502 from a backend that refuses connections, 503 with none healthy.
    for backend in router.state.pool:
        backend.healthy = backend.url.endswith(":9")
    async with http.post(url + "/v1/completions", json={"model": "tiny", "prompt": "x"}) as r:
        assert r.status == 502 and r.headers.get("x-request-id")
    for backend in router.state.pool:
        backend.healthy = False
    async with http.post(url + "/v1/completions", json={"model": "tiny", "prompt": "x"}) as r:
        assert r.status == 503 and r.headers.get("x-request-id")
    async with http.get(url + "/ready") as r:
        assert r.status == 503 and r.headers.get("x-request-id")
    assert all(seen) and len(set(seen)) == len(seen)


async def test_router_times_out_a_stalled_body_with_its_configured_timeout(start_backend,
                                                                           start_router):
    a = await start_backend()
    router = await start_router({"backends": [a.url], "server": {"body_timeout_s": 0.3}})
    port = int(router.url.rsplit(":", 1)[1])
    status, headers, body = await _raw(
        port, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nx-request-id: stalled-1\r\n"
              b"Content-Length: 100000\r\n\r\n" + b"{" * 50_000)
    assert status == 408 and headers["x-request-id"] == "stalled-1"
    assert json.loads(body)["error"]["type"] == "invalid_request_error"
    assert a.received == []
