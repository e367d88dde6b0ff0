"""The proxy's happy paths against real fake-vLLM backends on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json

import aiohttp


async def test_completions_round_robin_forwards_bytes_unchanged(start_backend, start_router, http):
    a = await start_backend(name="a")
    b = await start_backend(name="b")
    router = await start_router({"backends": [a.url, b.url]})
    # Odd spacing, key order, unicode escapes and an unknown field must all survive unchanged.
    body = b'{ "prompt":"caf\\u00e9 \xc3\xa9",  "model": "tiny", "max_tokens": 3, "x_extra": [1,2]}'
    seen = []
    for _ in range(4):
        async with http.post(router.url + "/v1/completions", data=body,
                             headers={"Content-Type": "application/json"}) as response:
            assert response.status == 200
            payload = await response.json()
            seen.append(response.headers["x-kvrouter-backend"])
            assert payload["choices"][0]["text"].startswith(
                "a " if seen[-1] == a.url else "b ")
            assert response.headers["x-kvrouter-predicted-hit-tokens"] == "0"
            assert len(response.headers["x-request-id"]) >= 16
            # The backend's own headers cross unchanged, framing headers are the router's.
            assert response.headers["x-engine"] == ("a" if seen[-1] == a.url else "b")
            assert response.headers["content-type"] == "application/json; charset=utf-8"
            assert response.headers["content-length"] == str(len(await response.read()))
    assert seen == [a.url, b.url, a.url, b.url]
    assert [r.body for r in a.received + b.received] == [body] * 4


async def test_request_id_propagated_to_backend_and_client(start_backend, start_router, http):
    a = await start_backend()
    router = await start_router({"backends": [a.url]})
    async with http.post(router.url + "/v1/completions", json={"model": "tiny", "prompt": "hi"},
                         headers={"x-request-id": "req-42"}) as response:
        assert response.status == 200
        assert response.headers["x-request-id"] == "req-42"
    assert a.received[0].headers["x-request-id"] == "req-42"


async def test_chat_stream_relayed_chunk_by_chunk(start_backend, start_router, http):
    a = await start_backend(name="a", chunks=4, chunk_delay_s=0.5)
    router = await start_router({"backends": [a.url]})
    request = {"model": "tiny", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    async with http.post(router.url + "/v1/chat/completions", json=request) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        assert response.headers["X-Engine"] == "a"
        assert response.headers["x-kvrouter-backend"] == a.url
        first = await response.content.readuntil(b"\n\n")
        # The first event reached the client while the backend was still generating.
        assert a.finished == 0
        rest = await response.read()
    events = [e for e in (first + rest).split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]"
    deltas = [json.loads(e[len(b"data: "):])["choices"][0]["delta"]["content"] for e in events[:-1]]
    assert deltas == [f"a-t{i} " for i in range(4)]


async def test_models_union_and_unknown_model_404(start_backend, start_router, http):
    a = await start_backend(models=["m1"])
    b = await start_backend(models=["m2"])
    router = await start_router({"backends": [a.url, b.url]})
    await router.state.health.check_all()  # discovery, deterministically before requests
    async with http.get(router.url + "/v1/models") as response:
        models = await response.json()
    assert sorted(m["id"] for m in models["data"]) == ["m1", "m2"]
    assert models["data"][0]["owned_by"] == "vllm"  # the backends' own entries, not synthesized
    for model, backend in (("m1", a), ("m2", b), ("m2", b), ("m1", a)):
        async with http.post(router.url + "/v1/completions",
                             json={"model": model, "prompt": "x"}) as response:
            assert response.status == 200
            assert response.headers["x-kvrouter-backend"] == backend.url
    async with http.post(router.url + "/v1/completions",
                         json={"model": "nope", "prompt": "x"}) as response:
        assert response.status == 404
        error = (await response.json())["error"]
        assert error["code"] == "model_not_found" and "nope" in error["message"]


async def test_configured_models_win_over_discovery(start_backend, start_router, http):
    a = await start_backend(models=["m1", "m2"])
    router = await start_router({"backends": [{"url": a.url, "models": ["m2"]}]})
    await router.state.health.check_all()
    async with http.get(router.url + "/v1/models") as response:
        assert [m["id"] for m in (await response.json())["data"]] == ["m2"]
    async with http.post(router.url + "/v1/completions",
                         json={"model": "m1", "prompt": "x"}) as response:
        assert response.status == 404


async def test_health_ready_metrics(start_backend, start_router, http):
    a = await start_backend()
    router = await start_router({"backends": [a.url]})
    async with http.get(router.url + "/health") as response:
        assert response.status == 200
    async with http.get(router.url + "/ready") as response:
        assert response.status == 200
        assert (await response.json())["healthy_backends"] == 1
    async with http.post(router.url + "/v1/completions", json={"model": "tiny", "prompt": "x"}):
        pass
    async with http.get(router.url + "/metrics") as response:
        text = await response.text()
    assert f'kvrouter_requests_total{{backend="{a.url}",policy="round_robin",status="200"}} 1.0' in text
    for name in ("kvrouter_request_duration_seconds_bucket", "kvrouter_time_to_first_byte_seconds",
                 "kvrouter_in_flight_requests", "kvrouter_breaker_state",
                 "kvrouter_healthy_backends 1.0", "kvrouter_retries_total"):
        assert name in text


async def test_unknown_paths_and_methods_get_openai_errors(start_router, http):
    router = await start_router({"backends": []})
    async with http.get(router.url + "/nope") as response:
        assert response.status == 404
        assert (await response.json())["error"]["code"] == "404"
    async with http.put(router.url + "/health") as response:
        assert response.status == 405
        assert response.headers["Allow"] == "GET, HEAD"
        assert (await response.json())["error"]["type"] == "invalid_request_error"


async def test_other_v1_paths_pass_through(start_backend, start_router, http):
    a = await start_backend()
    router = await start_router({"backends": [a.url]})
    async with http.post(router.url + "/v1/embeddings?trace=1", data=b"\x00not json") as response:
        assert response.status == 200
        assert response.headers["x-kvrouter-backend"] == a.url
    assert a.received[-1].path == "/v1/embeddings?trace=1"
    assert a.received[-1].body == b"\x00not json"


async def test_ready_is_503_when_no_backend_is_healthy(start_backend, start_router, http):
    a = await start_backend(health_status=500)
    router = await start_router({"backends": [a.url]})
    await router.state.health.check_all()
    async with http.get(router.url + "/ready") as response:
        assert response.status == 503
        assert (await response.json())["error"]["code"] == "no_backend_available"
    async with http.get(router.url + "/metrics") as response:
        assert "kvrouter_healthy_backends 0.0" in await response.text()


async def test_two_routers_in_one_process_have_separate_metrics(start_backend, start_router, http):
    a = await start_backend()
    r1 = await start_router({"backends": [a.url]})
    r2 = await start_router({"backends": [a.url]})
    async with http.post(r1.url + "/v1/completions", json={"model": "tiny", "prompt": "x"}):
        pass
    async with http.get(r2.url + "/metrics") as response:
        assert "kvrouter_requests_total{" not in await response.text()
    assert isinstance(http, aiohttp.ClientSession)


async def test_session_affinity_through_the_proxy(start_backend, start_router, http):
    backends = [await start_backend(name=n) for n in "abc"]
    router = await start_router({"backends": [b.url for b in backends],
                                 "policy": {"name": "session_affinity", "seed": 1},
                                 "server": {"session_header": "x-conversation"}})
    homes = {}
    for turn in range(3):
        for session in ("s1", "s2", "s3", "s4"):
            async with http.post(router.url + "/v1/chat/completions",
                                 json={"model": "tiny", "messages": [
                                     {"role": "user", "content": f"turn {turn}"}]},
                                 headers={"x-conversation": session}) as response:
                assert response.status == 200
                homes.setdefault(session, set()).add(response.headers["x-kvrouter-backend"])
        # The OpenAI `user` field keys a session when the header is absent.
        async with http.post(router.url + "/v1/completions",
                             json={"model": "tiny", "prompt": "x", "user": "u9"}) as response:
            homes.setdefault("u9", set()).add(response.headers["x-kvrouter-backend"])
    assert all(len(h) == 1 for h in homes.values()), homes
    assert len(set().union(*homes.values())) >= 2  # new sessions spread by load


async def test_hop_by_hop_headers_stay_on_their_hop(start_backend, start_router):
    a = await start_backend()
    router = await start_router({"backends": [a.url]})
    port = int(router.url.rsplit(":", 1)[1])
    body = b'{"model": "tiny", "prompt": "x"}'
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                 b"Connection: keep-alive, X-Secret-Hop , x-other-hop\r\n"
                 b"X-Secret-Hop: s3cret\r\nX-Other-Hop: 1\r\nProxy-Connection: keep-alive\r\n"
                 b"Keep-Alive: timeout=5\r\nTE: trailers\r\nX-End-To-End: kept\r\n"
                 b"Content-Length: %d\r\n\r\n%b" % (len(body), body))
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    writer.close()
    assert head.startswith(b"HTTP/1.1 200")
    sent = a.received[0].headers
    assert sent["x-end-to-end"] == "kept"
    for name in ("x-secret-hop", "x-other-hop", "proxy-connection", "keep-alive", "te"):
        assert name not in sent, name


def test_response_headers_named_in_connection_are_dropped():
    from router.http.upstream import response_header_lines

    lines = response_header_lines([(b"content-type", b"text/plain"),
                                   (b"connection", b"close, x-hop"), (b"x-hop", b"1"),
                                   (b"proxy-connection", b"close"), (b"x-kept", b"2")])
    assert lines == b"content-type: text/plain\r\nx-kept: 2\r\n"


def test_hop_by_hop_names_for_the_prefill_leg_include_those_connection_lists():
    from router.http.upstream import HOP_BY_HOP, hop_by_hop

    assert hop_by_hop([("Accept", "x")]) == HOP_BY_HOP
    names = hop_by_hop([("Connection", "keep-alive, X-Secret-Hop"), ("X-Secret-Hop", "1")])
    assert "x-secret-hop" in names and "proxy-connection" in names and "accept" not in names


async def test_stream_to_an_http_1_0_client_is_relayed_unframed_until_close(start_backend,
                                                                            start_router):
    """The relay writes each token from the backend's socket callback; an HTTP/1.0 client
    gets the bytes as they are (no chunked framing) and the end as the connection's close."""
    a = await start_backend(name="a", chunks=4, chunk_delay_s=0.05)
    router = await start_router({"backends": [a.url]})
    host, port = router.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    body = json.dumps({"model": "tiny", "stream": True,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    writer.write(b"POST /v1/chat/completions HTTP/1.0\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    raw = await asyncio.wait_for(reader.read(), 10)  # until the router closes
    writer.close()
    head, _, payload = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding" not in head.lower()
    events = [e for e in payload.split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]"
    deltas = [json.loads(e[len(b"data: "):])["choices"][0]["delta"]["content"]
              for e in events[:-1]]
    assert deltas == [f"a-t{i} " for i in range(4)]
