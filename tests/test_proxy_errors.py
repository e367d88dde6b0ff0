"""Bad input and failures: each gets its OpenAI-shaped error, and the router keeps serving."""

from __future__ import annotations

import asyncio
import json
import re

import aiohttp
import pytest

from policies.base import PolicyBase
from policies.bookkeeping import PolicyChoiceError, decide
from policies.types import BackendState, ClusterView, Decision, RouteRequest


def _assert_balanced(router) -> None:
    """Every attempt released its backend: nothing leaks after an error."""
    for backend in router.state.pool:
        assert backend.in_flight_requests == 0
        assert backend.in_flight_prompt_tokens == 0


BAD_INPUTS = [
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", b"", 400, None),
    ("/v1/completions", b"[1, 2]", 400, None),
    ("/v1/completions", b'{"prompt": "x"}', 400, "model"),
    ("/v1/completions", b'{"model": 7, "prompt": "x"}', 400, "model"),
    ("/v1/completions", b'{"model": "tiny"}', 400, "prompt"),
    ("/v1/completions", b'{"model": "tiny", "prompt": {"a": 1}}', 400, "prompt"),
    ("/v1/completions", b'{"model": "tiny", "prompt": "x", "stream": "yes"}', 400, "stream"),
    ("/v1/completions", b'{"model": "tiny", "prompt": "x", "max_tokens": "9"}', 400, "max_tokens"),
    ("/v1/completions", b'{"model": "tiny", "prompt": "x", "user": 5}', 400, "user"),
    ("/v1/chat/completions", b'{"model": "tiny"}', 400, "messages"),
    ("/v1/chat/completions", b'{"model": "tiny", "messages": []}', 400, "messages"),
    ("/v1/chat/completions", b'{"model": "tiny", "messages": [{"content": "x"}]}', 400,
     "messages[0]"),
    ("/v1/chat/completions", b'{"model": "tiny", "messages": [{"role": "user", "content": 3}]}',
     400, "messages[0].content"),
]


@pytest.mark.parametrize(
    ("path", "body", "status", "param"), BAD_INPUTS,
    ids=["not-json", "empty", "not-object", "no-model", "model-int", "no-prompt", "prompt-dict",
         "stream-str", "max-tokens-str", "user-int", "no-messages", "empty-messages",
         "message-no-role", "content-int"],
)
async def test_bad_input_gets_openai_400(start_backend, start_router, http, path, body, status,
                                         param):
    a = await start_backend()
    router = await start_router({"backends": [a.url]})
    async with http.post(router.url + path, data=body,
                         headers={"Content-Type": "application/json"}) as response:
        assert response.status == status
        error = (await response.json())["error"]
        assert error["type"] == "invalid_request_error" and error["message"]
        assert error["param"] == param
    assert a.received == []


async def test_body_over_limit_gets_413(start_backend, start_router, http):
    a = await start_backend()
    router = await start_router({"backends": [a.url], "server": {"max_body_bytes": 1000}})
    big = json.dumps({"model": "tiny", "prompt": "x" * 2000}).encode()
    async with http.post(router.url + "/v1/completions", data=big) as response:
        assert response.status == 413
        assert (await response.json())["error"]["code"] == "request_too_large"
    # The same limit on every path that reads a body.
    for path in ("/debug/route", "/v1/embeddings"):
        async with http.post(router.url + path, data=big) as response:
            assert response.status == 413, path
            assert (await response.json())["error"]["code"] == "request_too_large"
    async with http.post(router.url + "/v1/completions",
                         json={"model": "tiny", "prompt": "small"}) as response:
        assert response.status == 200
    assert len(a.received) == 1


async def test_no_backend_503(start_router, http):
    router = await start_router({})
    async with http.post(router.url + "/v1/completions",
                         json={"model": "tiny", "prompt": "x"}) as response:
        assert response.status == 503
        assert (await response.json())["error"]["code"] == "no_backend_available"


class _NamesAStranger(PolicyBase):
    """A policy bug: answers with a backend that is not among the candidates."""

    name = "names_a_stranger"

    def choose(self, request: RouteRequest, view: ClusterView) -> Decision:
        return Decision(backend_id="http://127.0.0.1:9", reason="bug")


def test_decide_refuses_a_non_candidate():
    view = ClusterView(0.0, (BackendState(backend_id="a"),))
    request = RouteRequest(request_id="r", model="tiny", prompt_tokens=1)
    with pytest.raises(PolicyChoiceError, match=re.escape("non-candidate backend 'http://127.0.0.1:9'")):
        decide(_NamesAStranger(), request, view)


async def test_a_policy_bug_is_a_500_and_the_router_keeps_serving(start_backend, start_router,
                                                                    http):
    a = await start_backend()
    router = await start_router({"backends": [a.url]}, policy=_NamesAStranger())
    for _ in range(2):  # the second request too: nothing was left half-done by the first
        async with http.post(router.url + "/v1/completions",
                             json={"model": "tiny", "prompt": "x"}) as response:
            assert response.status == 500
            error = (await response.json())["error"]
            assert error["type"] == "internal_error"
            assert "non-candidate backend" in error["message"]
    assert a.received == []
    _assert_balanced(router)


async def test_all_unhealthy_503(start_backend, start_router, http):
    a = await start_backend(health_status=503)
    router = await start_router({"backends": [{"url": a.url, "models": ["tiny"]}]})
    await router.state.health.check_all()
    async with http.post(router.url + "/v1/completions",
                         json={"model": "tiny", "prompt": "x"}) as response:
        assert response.status == 503
    assert a.received == []


async def test_connect_failure_after_retries_502(start_backend, start_router, http):
    a = await start_backend()
    b = await start_backend()
    router = await start_router({"backends": [a.url, b.url],
                                 "retries": {"backoff_initial_s": 0.01}})
    await router.state.health.check_all()
    await a.stop()  # both die after their last passed health check
    await b.stop()
    async with http.post(router.url + "/v1/completions",
                         json={"model": "tiny", "prompt": "x"}) as response:
        assert response.status == 502
        assert (await response.json())["error"]["code"] == "upstream_connect_error"
    async with http.get(router.url + "/metrics") as response:
        assert 'kvrouter_retries_total{reason="connect"} 1.0' in await response.text()
    _assert_balanced(router)


async def test_upstream_timeout_504(start_backend, start_router, http):
    slow = await start_backend(delay_s=30)
    router = await start_router({"backends": [slow.url], "retries": {"max_attempts": 1},
                                 "upstream": {"first_byte_timeout_s": 1.0}})
    async with http.post(router.url + "/v1/completions",
                         json={"model": "tiny", "prompt": "x"}) as response:
        assert response.status == 504
        assert (await response.json())["error"]["code"] == "upstream_timeout"
    _assert_balanced(router)


@pytest.mark.parametrize("failure", ["connect", "status_503", "timeout"])
async def test_retry_goes_to_another_backend(start_backend, start_router, http, failure):
    good = await start_backend(name="good")
    bad = await start_backend(name="bad", fail_status=503 if failure == "status_503" else None,
                              delay_s=30 if failure == "timeout" else 0)
    router = await start_router({"backends": [bad.url, good.url],
                                 "retries": {"backoff_initial_s": 0.01},
                                 "upstream": {"first_byte_timeout_s": 2.0}})
    await router.state.health.check_all()
    if failure == "connect":
        await bad.stop()
    async with http.post(router.url + "/v1/completions",
                         json={"model": "tiny", "prompt": "x"}) as response:
        assert response.status == 200  # round robin tried `bad` first
        assert response.headers["x-kvrouter-backend"] == good.url
    async with http.get(router.url + "/metrics") as response:
        assert f'kvrouter_retries_total{{reason="{failure}"}} 1.0' in await response.text()
    _assert_balanced(router)


async def test_last_attempt_relays_upstream_5xx(start_backend, start_router, http):
    bad = await start_backend(fail_status=503)
    router = await start_router({"backends": [bad.url], "retries": {"max_attempts": 1}})
    async with http.post(router.url + "/v1/completions",
                         json={"model": "tiny", "prompt": "x"}) as response:
        assert response.status == 503
        assert "failing" in (await response.json())["message"]


async def test_broken_stream_ends_with_sse_error_event(start_backend, start_router, http):
    a = await start_backend(chunks=5, break_after_chunks=2)
    router = await start_router({"backends": [a.url]})
    async with http.post(router.url + "/v1/completions",
                         json={"model": "tiny", "prompt": "x", "stream": True}) as response:
        assert response.status == 200
        data = await response.read()
    events = [e for e in data.split(b"\n\n") if e]
    assert len(events) == 3
    assert json.loads(events[-1][len(b"data: "):])["error"]["code"] == "upstream_connect_error"
    assert b"[DONE]" not in data
    _assert_balanced(router)
    # No retry after the first byte.
    assert len(a.received) == 1


async def test_client_disconnect_cancels_upstream(start_backend, start_router):
    a = await start_backend(chunks=100, chunk_delay_s=0.1)
    router = await start_router({"backends": [a.url]})
    async with aiohttp.ClientSession() as session:
        response = await session.post(router.url + "/v1/completions",
                                      json={"model": "tiny", "prompt": "x", "stream": True})
        await response.content.readuntil(b"\n\n")
        response.close()  # drop the connection mid-stream
    for _ in range(100):
        if a.cancelled:
            break
        await asyncio.sleep(0.05)
    assert a.cancelled == 1 and a.finished == 0
    for _ in range(100):
        if router.state.pool.get(a.url).in_flight_requests == 0:
            break
        await asyncio.sleep(0.05)
    _assert_balanced(router)


async def test_breaker_opens_after_consecutive_failures_then_recovers(start_backend,
                                                                      start_router, http):
    a = await start_backend(name="a", fail_status=500)
    b = await start_backend(name="b")
    router = await start_router({
        "backends": [a.url, b.url], "retries": {"max_attempts": 1},
        "health": {"ejection_consecutive_failures": 2, "ejection_s": 0.5},
    })
    statuses = []
    for _ in range(8):
        async with http.post(router.url + "/v1/completions",
                             json={"model": "tiny", "prompt": "x"}) as response:
            statuses.append((response.headers["x-kvrouter-backend"], response.status))
    # Two 500s from `a`, then `a` is ejected and everything goes to `b`.
    assert statuses.count((a.url, 500)) == 2
    assert statuses[-4:] == [(b.url, 200)] * 4
    async with http.get(router.url + "/metrics") as response:
        assert f'kvrouter_breaker_state{{backend="{a.url}"}} 2.0' in await response.text()
    a.fail_status = None
    await asyncio.sleep(0.6)
    seen = set()
    for _ in range(4):  # the half-open probe goes to `a`, succeeds, and closes the breaker
        async with http.post(router.url + "/v1/completions",
                             json={"model": "tiny", "prompt": "x"}) as response:
            assert response.status == 200
            seen.add(response.headers["x-kvrouter-backend"])
    assert seen == {a.url, b.url}
    assert router.state.pool.get(a.url).breaker.state == 0


async def test_a_passing_health_check_lets_an_ejected_backend_in_before_ejection_s(
        start_backend, start_router, http):
    a = await start_backend(name="a", fail_status=500)
    b = await start_backend(name="b")
    router = await start_router({
        "backends": [a.url, b.url], "retries": {"max_attempts": 1},
        "health": {"ejection_consecutive_failures": 2, "ejection_s": 60, "interval_s": 60},
    })
    breaker = router.state.pool.get(a.url).breaker
    for _ in range(4):
        async with http.post(router.url + "/v1/completions",
                             json={"model": "tiny", "prompt": "x"}) as response:
            await response.read()
    assert breaker.state == 2  # open, for a minute
    a.fail_status = None  # the pod is back
    await router.state.health.check_all()  # the health loop's next round
    seen = set()
    for _ in range(4):
        async with http.post(router.url + "/v1/completions",
                             json={"model": "tiny", "prompt": "x"}) as response:
            assert response.status == 200
            seen.add(response.headers["x-kvrouter-backend"])
    assert a.url in seen and breaker.state == 0


async def test_debug_route_needs_admin_token_and_does_not_send(start_backend, start_router, http):
    a = await start_backend()
    b = await start_backend()
    router = await start_router({"backends": [a.url, b.url], "server": {"admin_token": "s3cret"}})
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}]}
    async with http.post(router.url + "/debug/route", json=body) as response:
        assert response.status == 401
    for _ in range(2):  # choose does not advance round robin: same answer twice
        async with http.post(router.url + "/debug/route", json=body,
                             headers={"Authorization": "Bearer s3cret"}) as response:
            assert response.status == 200
            explained = await response.json()
        assert explained["decision"]["backend_id"] == a.url
    assert [c["backend_id"] for c in explained["candidates"]] == [a.url, b.url]
    assert explained["request"]["prompt_text"] == "hello"
    assert a.received == [] and b.received == []


async def test_no_task_outlives_failed_requests(start_backend, start_router):
    a = await start_backend(chunks=50, chunk_delay_s=0.05)
    b = await start_backend(chunks=5, break_after_chunks=1)
    router = await start_router({"backends": [a.url, b.url], "retries": {"max_attempts": 1}})
    await asyncio.sleep(0.2)  # the health loop's first round is done
    baseline = len(asyncio.all_tasks())
    async with aiohttp.ClientSession() as session:
        for body, status in ((b"{bad", 400), (b'{"model": "tiny"}', 400),
                             (b'{"model": "x", "prompt": "y"}', 404)):
            async with session.post(router.url + "/v1/completions", data=body) as response:
                assert response.status == status
        # One stream cut by the client (to `a`), one cut by the backend (`b`).
        response = await session.post(router.url + "/v1/completions",
                                       json={"model": "tiny", "prompt": "x", "stream": True})
        await response.content.readuntil(b"\n\n")
        response.close()
        async with session.post(router.url + "/v1/completions",
                                json={"model": "tiny", "prompt": "x", "stream": True}) as r:
            assert b'"error"' in await r.read()
    for _ in range(100):
        if len(asyncio.all_tasks()) <= baseline:
            break
        await asyncio.sleep(0.05)
    assert len(asyncio.all_tasks()) <= baseline
    assert a.cancelled == 1  # the client's cut reached the backend
    _assert_balanced(router)


async def test_body_cut_short_is_a_clean_502_and_a_failed_attempt(start_router, http):
    """A backend that sends a whole-response head, then closes before the body is complete:
    the client gets a clean OpenAI 502 (nothing was written yet) and the breaker counts a
    failure, not a success."""

    async def backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            await reader.readexactly(length)
            if head.startswith(b"GET"):  # health checks and model discovery
                body = b'{"object": "list", "data": [{"id": "tiny", "object": "model"}]}'
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\nConnection: close\r\n\r\n%b"
                             % (len(body), body))
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 100\r\n\r\n{\"partial\":")
            await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_server(backend, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        router = await start_router({"backends": [url], "retries": {"max_attempts": 1}})
        async with http.post(router.url + "/v1/completions",
                             json={"model": "tiny", "prompt": "x"}) as response:
            assert response.status == 502
            assert (await response.json())["error"]["code"] == "upstream_connect_error"
            assert response.headers["x-kvrouter-backend"] == url
        assert router.state.pool.get(url).breaker.consecutive_failures == 1
        _assert_balanced(router)
    finally:
        server.close()
