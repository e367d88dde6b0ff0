"""The overhead benchmark's 0-latency backend: canned OpenAI answers from a bare asyncio
protocol on uvloop, one process listening on every port.

It answers everything the routers send or probe at start-up: completions and chat
completions (a fixed JSON body, or 8 SSE chunks then ``data: [DONE]`` when the body asks to
stream), /health, /health_generate, /get_server_info and /server_info, /get_model_info and
/model_info, /v1/models, /tokenize and both render endpoints.

Why not aiohttp: the backend shares the machine's two cores with the client and the routers
under test. aiohttp's server spent ~0.12 ms of CPU per request, which left a router little
idle CPU to show what a second core buys it (``serve --workers 2``). This parses only what
a request needs (the request line, Content-Length, Connection) and answers from bytes made at
start-up: ~5x less CPU per request. Request bodies must carry Content-Length (every router
and client here sends one); a chunked request gets 411.

    python bench/zero_backend.py --ports 8001 8002
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

MODEL = "tiny"
SSE_CHUNKS = 8


def _answer(status: str, content_type: bytes, body: bytes) -> bytes:
    return (b"HTTP/1.1 " + status.encode() + b"\r\nContent-Type: " + content_type
            + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


def _answers(port: int) -> tuple[dict[bytes, bytes], bytes]:
    """(path -> whole response for a plain request, the streamed completion)."""
    completion = json.dumps({
        "id": "cmpl-bench", "object": "text_completion", "created": 0, "model": MODEL,
        "choices": [{"index": 0, "text": " ok" * 16, "logprobs": None, "finish_reason": "length",
                     "stop_reason": None}],
        "usage": {"prompt_tokens": 500, "completion_tokens": 16, "total_tokens": 516},
    }).encode()
    events = [b"data: " + json.dumps({
        "id": "cmpl-bench", "object": "text_completion", "created": 0, "model": MODEL,
        "choices": [{"index": 0, "text": " ok", "logprobs": None,
                     "finish_reason": "length" if i == SSE_CHUNKS - 1 else None,
                     "stop_reason": None}]}).encode() + b"\n\n" for i in range(SSE_CHUNKS)]
    events.append(b"data: [DONE]\n\n")
    # One HTTP chunk per SSE event, as a streaming server writes them.
    stream = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
              b"Transfer-Encoding: chunked\r\n\r\n"
              + b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events) + b"0\r\n\r\n")
    info = json.dumps({
        "model_path": MODEL, "tokenizer_path": MODEL, "is_generation": True,
        "served_model_name": MODEL, "port": port, "max_total_num_tokens": 65536,
        "disaggregation_mode": "null", "dp_size": 1, "tp_size": 1, "version": "bench"}).encode()
    models = json.dumps({"object": "list", "data": [{
        "id": MODEL, "object": "model", "owned_by": "vllm", "root": MODEL,
        "max_model_len": 4096}]}).encode()
    tokens = json.dumps({"tokens": list(range(16)), "count": 16,
                         "max_model_len": 4096}).encode()
    js = b"application/json"
    ok = _answer("200 OK", js, completion)
    paths = {
        b"/v1/completions": ok, b"/v1/chat/completions": ok,
        b"/health": _answer("200 OK", js, b"{}"), b"/health_generate": _answer("200 OK", js, b"{}"),
        b"/v1/models": _answer("200 OK", js, models),
        b"/tokenize": _answer("200 OK", js, tokens),
        b"/v1/completions/render": _answer("200 OK", js, tokens),
        b"/v1/chat/completions/render": _answer("200 OK", js, tokens),
    }
    for path in (b"/get_server_info", b"/server_info", b"/get_model_info", b"/model_info"):
        paths[path] = _answer("200 OK", js, info)
    return paths, stream


_NOT_FOUND = _answer("404 Not Found", b"application/json", b'{"error": "not found"}')
_CHUNKED = _answer("411 Length Required", b"application/json", b'{"error": "send Content-Length"}')


class _Connection(asyncio.Protocol):
    def __init__(self, paths: dict[bytes, bytes], stream: bytes) -> None:
        self._paths = paths
        self._stream = stream
        self._buffer = b""
        self._transport: Any = None  # uvloop's TCPTransport is no asyncio.Transport subclass

    def connection_made(self, transport: Any) -> None:
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer + data if self._buffer else data
        out = []
        close = False
        while True:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                break
            head = buffer[:end]
            lower = head.lower()
            length = 0
            at = lower.find(b"\r\ncontent-length:")
            if at >= 0:
                stop = lower.find(b"\r\n", at + 2)
                length = int(lower[at + 17: stop if stop >= 0 else len(lower)])
            elif b"\r\ntransfer-encoding:" in lower:
                out.append(_CHUNKED)
                close = True
                buffer = b""
                break
            if len(buffer) < end + 4 + length:
                break
            body = buffer[end + 4: end + 4 + length]
            buffer = buffer[end + 4 + length:]
            path = head[head.find(b" ") + 1: head.find(b" ", head.find(b" ") + 1)]
            path = path.split(b"?", 1)[0]
            answer = self._paths.get(path, _NOT_FOUND)
            if answer is not _NOT_FOUND and path.endswith(b"completions") and (
                    b'"stream": true' in body or b'"stream":true' in body):
                answer = self._stream
            out.append(answer)
            close = close or b"\r\nconnection: close" in lower
        self._buffer = buffer
        transport = self._transport
        if out:
            transport.write(b"".join(out))
        if close:
            transport.close()


async def serve(ports: list[int]) -> None:
    loop = asyncio.get_running_loop()
    servers = []
    try:
        for port in ports:
            paths, stream = _answers(port)
            servers.append(await loop.create_server(
                lambda p=paths, s=stream: _Connection(p, s), "127.0.0.1", port))
        print("ready", flush=True)
        await asyncio.Event().wait()
    finally:
        for server in servers:
            server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ports", type=int, nargs="+", required=True)
    import uvloop

    uvloop.run(serve(parser.parse_args().ports))


if __name__ == "__main__":
    main()
