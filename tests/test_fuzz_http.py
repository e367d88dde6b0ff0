"""Property: whatever body and headers a client sends, the router itself never answers 5xx,
and every error it makes is OpenAI-shaped JSON with ``x-request-id``.

One router (kv_aware, the tiny tokenizer, so prompts go through rendering, tokenizing and
hashing) in front of one fake backend, on real 127.0.0.1 sockets. Hypothesis drives a
blocking client in a worker thread while the router serves on the test's event loop (both
loops, see conftest). Bounded to a few seconds: ``max_examples`` per run, no deadline. A
longer run belongs in the chaos benchmark.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import random
import socket
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from router.app import create_app, serve
from router.config import parse_config
from router.setup.kv import build_kv
from simulator.tiny_tokenizer import default_path

MODEL = "tiny"
EXAMPLES = 120

# Text with every kind of character JSON can carry, lone surrogates included (json.dumps
# escapes them; Python's json takes them back, orjson refuses them).
_text = st.text(st.characters(codec=None, categories=("L", "N", "P", "S", "Z", "Cc", "Cs")),
                max_size=40)
_scalar = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                    st.floats(allow_nan=True), _text)
_json = st.recursive(
    _scalar,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.sampled_from(
                                ["model", "prompt", "messages", "role", "content", "tool_calls",
                                 "function", "arguments", "tools", "stream", "max_tokens",
                                 "user", "cache_salt", "type", "text", "name",
                                 "chat_template_kwargs", "add_generation_prompt",
                                 "truncate_prompt_tokens", "add_special_tokens"]) | _text,
                                inner, max_size=5)),
    max_leaves=20)
_message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system", "tool"]) | _json},
    optional={"content": _json | _text, "tool_calls": _json, "name": _json,
              "tool_call_id": _json})
_body_obj = st.fixed_dictionaries(
    {"model": st.just(MODEL) | _json},
    optional={"prompt": _text | st.lists(st.integers(-5, 2**33), max_size=40) | _json,
              "messages": st.lists(_message, max_size=3) | _json,
              "stream": st.booleans() | _json, "max_tokens": st.integers(-3, 10) | _json,
              "tools": _json, "cache_salt": _json, "user": _json,
              "chat_template_kwargs": _json, "add_generation_prompt": _json,
              "truncate_prompt_tokens": _json})


def _deep(depth: int) -> bytes:
    return b'{"model": "tiny", "prompt": ' + b"[" * depth + b"]" * depth + b"}"


_body = st.one_of(
    _body_obj.map(lambda o: json.dumps(o).encode()),
    _body_obj.map(lambda o: json.dumps(o).encode()),
    _json.map(lambda o: json.dumps(o).encode()),
    st.binary(max_size=200),
    st.integers(900, 3000).map(_deep),
)
_token = st.text(st.sampled_from("abcdefghijklmnopqrstuvwxyz0123456789-_!#$%&'*+.^`|~"),
                 min_size=1, max_size=20)
_header_value = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF,
                                      exclude_characters="\x7f"), max_size=60)
_header = st.one_of(
    st.tuples(st.sampled_from(["content-type", "x-request-id", "connection", "upgrade",
                               "x-session-id", "authorization", "accept", "te", "keep-alive",
                               "proxy-connection", "accept-encoding", "host"]), _header_value),
    st.tuples(_token, _header_value),
)
# Most examples go where bodies are read and analysed.
_path = st.one_of(
    st.sampled_from(["/v1/completions", "/v1/chat/completions"]),
    st.sampled_from(["/v1/completions", "/v1/chat/completions", "/debug/route",
                     "/v1/models", "/v1/embeddings", "/health", "/ready", "/metrics",
                     "/", "/v1/", "/nope"]) | _token.map(lambda t: "/" + t))
_method = st.sampled_from(["POST"] * 6 + ["GET", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH"])
_FRAMING = {"content-length", "transfer-encoding", "expect"}  # the client frames the body


def _request(port: int, method: str, path: str, headers: list[tuple[str, str]],
             body: bytes) -> tuple[int, dict[str, str], bytes]:
    lines = [f"{method} {path} HTTP/1.1".encode(), b"Host: fuzz"]
    lines += [f"{n}: {v}".encode("latin-1") for n, v in headers if n.lower() not in _FRAMING]
    lines.append(b"Content-Length: %d" % len(body))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"\r\n".join(lines) + b"\r\n\r\n" + body)
        response = http.client.HTTPResponse(sock, method=method)
        response.begin()
        data = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, data


def _check(status: int, headers: dict[str, str], data: bytes, method: str) -> None:
    assert headers.get("x-request-id"), (status, headers)
    router_made = "x-kvrouter-backend" not in headers
    if router_made:
        assert status < 500, (status, data[:300])
    if router_made and status >= 400 and method != "HEAD":
        error = json.loads(data)["error"]
        assert set(error) == {"message", "type", "param", "code"}, error
        assert isinstance(error["message"], str) and error["message"]


@pytest.fixture
async def router_port(start_backend) -> Any:
    backend = await start_backend(models=[MODEL])
    config = parse_config({
        "backends": [backend.url], "policy": {"name": "kv_aware", "seed": 3},
        "models": {MODEL: {"tokenizer": str(default_path()), "block_size": 4}},
        "server": {"body_timeout_s": 5.0},
    })
    plumbing = build_kv(config)
    rng = random.Random(3)
    app = create_app(config, analyzer=plumbing.analyzer, index=plumbing.index,
                     policy=plumbing.policy(rng), rng=rng)
    runner, port = await serve(app, "127.0.0.1", 0)
    yield port
    await runner.cleanup(grace_s=1.0)
    plumbing.analyzer.close()


async def test_the_router_never_answers_5xx_for_client_input(router_port):
    port = router_port

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(method=_method, path=_path, headers=st.lists(_header, max_size=6), body=_body)
    def prop(method: str, path: str, headers: list[tuple[str, str]], body: bytes) -> None:
        if method in ("GET", "HEAD") and path not in ("/v1/completions",):
            body = b""
        status, got, data = _request(port, method, path, headers, body)
        _check(status, got, data, method)

    await asyncio.to_thread(prop)
