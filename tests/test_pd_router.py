"""The router's split path end to end: a real router in front of real prefill/decode servers
(``tests/pd_fakes.py``: an OpenAI front over the emulator's P/D protocol code), for both
engines' protocols, streaming and not, and each failure path."""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from pd_fakes import PdBackend, prompt_tokens_of, start_pd

from policies.base import PolicyBase
from policies.types import ClusterView, Decision, EngineKind, Role, RouteRequest
from router.pd.vllm import REMOTE_DECODE_REQUEST

LONG = "The quick brown fox jumps over the lazy dog. " * 40


class ForcedSplit(PolicyBase):
    """Splits whenever it can: the first PREFILL candidate, the first decode-side one."""

    name = "forced_split"

    def choose(self, request: RouteRequest, view: ClusterView) -> Decision:
        prefill = [b.backend_id for b in view.backends if b.role is Role.PREFILL]
        decode = [b.backend_id for b in view.backends if b.role is not Role.PREFILL]
        if prefill and decode:
            return Decision(decode[0], "forced split", prefill_backend_id=prefill[0])
        return Decision((decode or prefill)[0], "forced local")


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
        yield s


Starter = Callable[..., Awaitable[PdBackend]]


@pytest.fixture
async def pd(session: aiohttp.ClientSession) -> AsyncIterator[Starter]:
    started: list[PdBackend] = []

    async def start(role: Role, engine: EngineKind, name: str, **knobs: Any) -> PdBackend:
        backend = await start_pd(role, engine, name, session, **knobs)
        started.append(backend)
        return backend

    yield start
    for backend in started:
        await backend.stop()


def config(engine: EngineKind, prefills: list[PdBackend], decodes: list[PdBackend],
           **disagg: Any) -> dict[str, Any]:
    backends = [{"url": b.url, "role": "prefill", "engine": engine.value} for b in prefills] + [
        {"url": b.url, "role": b.node.role.value, "engine": engine.value} for b in decodes]
    disagg.setdefault("bootstrap_ports", {b.url: b.port for b in prefills})
    return {"backends": backends, "disaggregation": disagg,
            "retries": {"backoff_initial_s": 0.0, "backoff_max_s": 0.0}}


async def start(start_router: Any, raw: dict[str, Any], policy: Any = None) -> Any:
    return await start_router(raw, policy=policy or ForcedSplit(), rng=random.Random(5))


def sse_events(text: str) -> list[Any]:
    lines = [line[len("data: "):] for line in text.split("\n\n") if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


async def metric(session: aiohttp.ClientSession, router_url: str, name: str) -> float:
    text = await (await session.get(router_url + "/metrics")).text()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name))


ENGINES = pytest.mark.parametrize("engine", list(EngineKind), ids=[e.value for e in EngineKind])


@ENGINES
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_split_serves_from_decode_with_whole_usage(
    engine: EngineKind, stream: bool, pd: Starter, start_router: Any,
    session: aiohttp.ClientSession,
) -> None:
    p = await pd(Role.PREFILL, engine, "p0")
    d = await pd(Role.DECODE, engine, "d0")
    router = await start(start_router, config(engine, [p], [d]))
    body: dict[str, Any] = {"model": "tiny", "prompt": LONG, "max_tokens": 7, "stream": stream,
                            "temperature": 0}
    if stream:
        body["stream_options"] = {"include_usage": True}
    response = await session.post(router.url + "/v1/completions", json=body)
    assert response.status == 200, await response.text()
    assert response.headers["x-kvrouter-backend"] == d.url
    assert response.headers["x-kvrouter-pd"] == "split"
    prompt = prompt_tokens_of(body)
    if stream:
        events = sse_events(await response.text())
        text = "".join(e["choices"][0]["text"] for e in events if e["choices"])
        usage = events[-1]["usage"]
    else:
        answer = await response.json()
        text, usage = answer["choices"][0]["text"], answer["usage"]
        assert "kv_transfer_params" not in answer or engine is EngineKind.VLLM
    assert "d0-t6" in text and "p0" not in text
    assert usage == {"prompt_tokens": prompt, "completion_tokens": 7, "total_tokens": prompt + 7}
    # The prompt was computed once, on the prefill backend, and pulled by the decode backend.
    assert (p.node.computed_prompt_tokens, d.node.computed_prompt_tokens) == (prompt, 0)
    assert d.node.pulled_tokens == prompt
    (to_prefill,), (to_decode,) = p.received, d.received
    if engine is EngineKind.VLLM:
        assert to_prefill == {k: v for k, v in body.items() if k != "stream_options"} | {
            "max_tokens": 1, "stream": False, "kv_transfer_params": REMOTE_DECODE_REQUEST}
        params = to_decode.pop("kv_transfer_params")
        assert params["do_remote_prefill"] is True and params["remote_engine_id"] == "p0"
        assert params["remote_port"] == p.port and params["remote_block_ids"]
        assert to_decode == body
    else:
        room = to_decode["bootstrap_room"]
        assert isinstance(room, int) and 0 <= room < 2**63
        added = {"bootstrap_host": "127.0.0.1", "bootstrap_port": p.port, "bootstrap_room": room}
        assert to_prefill == to_decode == body | added
    assert await metric(session, router.url, 'kvrouter_pd_legs_total{backend="' + p.url
                        + '",role="prefill"}') == 1
    assert await metric(session, router.url, 'kvrouter_pd_legs_total{backend="' + d.url
                        + '",role="decode"}') == 1


@ENGINES
async def test_chat_stream_split(engine: EngineKind, pd: Starter, start_router: Any,
                                 session: aiohttp.ClientSession) -> None:
    p = await pd(Role.PREFILL, engine, "p0")
    d = await pd(Role.DECODE, engine, "d0")
    router = await start(start_router, config(engine, [p], [d]))
    body = {"model": "tiny", "messages": [{"role": "user", "content": LONG}],
            "max_completion_tokens": 4, "stream": True}
    response = await session.post(router.url + "/v1/chat/completions", json=body)
    events = sse_events(await response.text())
    assert [e["choices"][0]["delta"]["content"] for e in events] == [
        f"d0-t{i} " for i in range(4)]
    if engine is EngineKind.VLLM:
        assert p.received[0]["max_completion_tokens"] == 1
        assert p.received[0]["stream"] is False


@ENGINES
async def test_failed_prefill_retries_on_another_prefill_backend(
    engine: EngineKind, pd: Starter, start_router: Any, session: aiohttp.ClientSession
) -> None:
    bad = await pd(Role.PREFILL, engine, "p-bad", fail_status=500)
    good = await pd(Role.PREFILL, engine, "p-good")
    d = await pd(Role.DECODE, engine, "d0")
    router = await start(start_router, config(engine, [bad, good], [d]))
    response = await session.post(router.url + "/v1/completions",
                                  json={"model": "tiny", "prompt": LONG, "max_tokens": 3})
    assert response.status == 200
    assert "d0-t2" in (await response.json())["choices"][0]["text"]
    assert len(bad.received) == 1 and len(good.received) == 1
    assert d.node.computed_prompt_tokens == 0 and d.node.pulled_tokens > 0
    assert await metric(session, router.url, "kvrouter_pd_fallbacks_total{action=\"retry_prefill"
                        "\"}") == 1
    assert await metric(session, router.url, "kvrouter_pd_transfer_failures_total{reason="
                        "\"status_500\",stage=\"prefill\"}") == 1


# SGLang prefill answers carry no transfer parameters, so "no_params" is vLLM's alone.
@pytest.mark.parametrize(("engine", "failure"), [
    (engine, failure) for engine in EngineKind for failure in ("dropped", "timeout", "no_params")
    if not (engine is EngineKind.SGLANG and failure == "no_params")])
async def test_prefill_failure_falls_back_to_local_prefill(
    engine: EngineKind, failure: str, pd: Starter, start_router: Any,
    session: aiohttp.ClientSession,
) -> None:
    knobs = {"dropped": {"drop": True}, "timeout": {"delay_s": 5.0},
             "no_params": {"omit_params": True}}[failure]
    p = await pd(Role.PREFILL, engine, "p0", **knobs)
    d = await pd(Role.DECODE, engine, "d0")
    # vLLM's decode backends can prefill themselves; SGLang's decode-mode servers serve only
    # bootstrapped requests, so its fallback is a MIXED backend.
    m = await pd(Role.MIXED, engine, "m0")
    router = await start(start_router, config(engine, [p], [d, m], prefill_timeout_s=0.3))
    client_bytes = json.dumps({"model": "tiny", "prompt": LONG, "max_tokens": 2}).encode()
    response = await session.post(router.url + "/v1/completions", data=client_bytes,
                                  headers={"Content-Type": "application/json"})
    assert response.status == 200
    assert response.headers["x-kvrouter-pd"] == "local_fallback"
    local = d if engine is EngineKind.VLLM else m
    # Local prefill, with the client's bytes unchanged.
    assert local.raw[-1] == client_bytes
    assert local.node.computed_prompt_tokens == prompt_tokens_of(json.loads(client_bytes))
    assert await metric(session, router.url,
                        "kvrouter_pd_fallbacks_total{action=\"local_prefill\"}") == 1


@ENGINES
async def test_no_fallback_gives_a_clean_error(
    engine: EngineKind, pd: Starter, start_router: Any, session: aiohttp.ClientSession
) -> None:
    p = await pd(Role.PREFILL, engine, "p0", fail_status=503)
    d = await pd(Role.DECODE, engine, "d0")
    router = await start(start_router, config(engine, [p], [d], fallback_to_local=False))
    response = await session.post(router.url + "/v1/completions",
                                  json={"model": "tiny", "prompt": LONG, "max_tokens": 2})
    assert response.status == 502
    error = (await response.json())["error"]
    assert error["code"] == "upstream_connect_error" and p.url in error["message"]
    assert set(error) == {"message", "type", "param", "code"}


@ENGINES
async def test_prefill_rejection_reaches_the_client(
    engine: EngineKind, pd: Starter, start_router: Any, session: aiohttp.ClientSession
) -> None:
    p = await pd(Role.PREFILL, engine, "p0", fail_status=400)
    d = await pd(Role.DECODE, engine, "d0")
    router = await start(start_router, config(engine, [p], [d]))
    response = await session.post(router.url + "/v1/completions",
                                  json={"model": "tiny", "prompt": LONG, "max_tokens": 2})
    assert response.status == 400
    assert (await response.json())["message"] == "p0 failing"
    assert response.headers["x-kvrouter-pd"] == "prefill_error"
    assert d.node.generated_tokens == 0


@ENGINES
async def test_failed_decode_before_first_byte(
    engine: EngineKind, pd: Starter, start_router: Any, session: aiohttp.ClientSession
) -> None:
    p = await pd(Role.PREFILL, engine, "p0")
    bad = await pd(Role.DECODE, engine, "d-bad", fail_status=503)
    good = await pd(Role.DECODE, engine, "d-good")
    router = await start(start_router, config(engine, [p], [bad, good]))
    response = await session.post(router.url + "/v1/completions",
                                  json={"model": "tiny", "prompt": LONG, "max_tokens": 3})
    assert response.status == 200
    assert response.headers["x-kvrouter-backend"] == good.url
    assert good.node.computed_prompt_tokens == 0 and good.node.pulled_tokens > 0
    if engine is EngineKind.VLLM:
        # The same transfer parameters on the next decode backend; one prefill.
        assert len(p.received) == 1
        assert bad.received[0]["kv_transfer_params"] == good.received[0]["kv_transfer_params"]
        action = "retry_decode"
    else:
        # A room pairs one prefill with one decode: the prefill is redone with a new room.
        assert len(p.received) == 2
        assert p.received[0]["bootstrap_room"] != p.received[1]["bootstrap_room"]
        assert good.received[0]["bootstrap_room"] == p.received[1]["bootstrap_room"]
        action = "redo_prefill"
    assert await metric(session, router.url,
                        "kvrouter_pd_fallbacks_total{action=\"" + action + "\"}") == 1


@ENGINES
async def test_every_decode_failing_ends_in_an_error_not_a_hang(
    engine: EngineKind, pd: Starter, start_router: Any, session: aiohttp.ClientSession
) -> None:
    p = await pd(Role.PREFILL, engine, "p0")
    d0 = await pd(Role.DECODE, engine, "d0", drop=True)
    d1 = await pd(Role.DECODE, engine, "d1", drop=True)
    router = await start(start_router, config(engine, [p], [d0, d1]))
    response = await session.post(router.url + "/v1/completions",
                                  json={"model": "tiny", "prompt": LONG, "max_tokens": 3,
                                        "stream": True})
    assert response.status == 502
    assert (await response.json())["error"]["code"] == "upstream_connect_error"
    assert len(d0.received) == 1 and len(d1.received) == 1


async def test_sglang_failed_prefill_is_surfaced_not_left_hanging(
    pd: Starter, start_router: Any, session: aiohttp.ClientSession
) -> None:
    # The decode side waits on the room; the prefill's failure must end it promptly.
    p = await pd(Role.PREFILL, EngineKind.SGLANG, "p0", fail_status=500)
    d = await pd(Role.DECODE, EngineKind.SGLANG, "d0")
    d.node.room_wait_s = 30.0
    router = await start(start_router, config(EngineKind.SGLANG, [p], [d],
                                              fallback_to_local=False))
    response = await session.post(router.url + "/v1/completions",
                                  json={"model": "tiny", "prompt": LONG, "max_tokens": 2},
                                  timeout=aiohttp.ClientTimeout(total=20))
    assert response.status == 502
    assert "prefill backend" in (await response.json())["error"]["message"]


async def test_transfer_params_are_never_logged(
    pd: Starter, start_router: Any, session: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    p = await pd(Role.PREFILL, EngineKind.VLLM, "p0")
    bad = await pd(Role.DECODE, EngineKind.VLLM, "d-bad", drop=True)
    good = await pd(Role.DECODE, EngineKind.VLLM, "d-good")
    router = await start(start_router, config(EngineKind.VLLM, [p], [bad, good]))
    with caplog.at_level(logging.DEBUG):
        response = await session.post(router.url + "/v1/completions",
                                      json={"model": "tiny", "prompt": LONG, "max_tokens": 2})
        assert response.status == 200
    params = good.received[0]["kv_transfer_params"]
    assert caplog.records, "the failed decode leg should have been logged"
    for record in caplog.records:
        message = record.getMessage()
        assert "remote_block_ids" not in message and str(params["remote_block_ids"]) not in message


async def test_real_decider_explains_itself_in_debug_route_and_metrics(
    pd: Starter, start_router: Any, session: aiohttp.ClientSession
) -> None:
    p = await pd(Role.PREFILL, EngineKind.VLLM, "p0")
    d = await pd(Role.DECODE, EngineKind.VLLM, "d0")
    raw = config(EngineKind.VLLM, [p], [d], min_uncached_tokens=100)
    raw["policy"] = {"name": "kv_aware"}
    router = await start_router(raw, rng=random.Random(1))
    short = {"model": "tiny", "prompt": "hello there", "max_tokens": 2}
    explained = await (await session.post(router.url + "/debug/route", json=short)).json()
    decision = explained["decision"]
    assert decision["backend_id"] == d.url and decision["prefill_backend_id"] is None
    assert "min_uncached_tokens 100" in decision["reason"]
    decode_scores = [s for s in decision["scores"] if "decode_score_s" in s["terms"]]
    assert [s["backend_id"] for s in decode_scores] == [d.url]
    assert (await session.post(router.url + "/v1/completions", json=short)).status == 200
    assert d.node.computed_prompt_tokens > 0 and not p.received
    assert await metric(session, router.url, 'kvrouter_pd_decisions_total{mode="local"}') == 1


@ENGINES
async def test_client_leaving_mid_split_releases_everything(
    engine: EngineKind, pd: Starter, start_router: Any, session: aiohttp.ClientSession
) -> None:
    p = await pd(Role.PREFILL, engine, "p0")
    d = await pd(Role.DECODE, engine, "d0", delay_s=30.0)
    router = await start(start_router, config(engine, [p], [d]))
    with pytest.raises(TimeoutError):
        await session.post(router.url + "/v1/completions",
                           json={"model": "tiny", "prompt": LONG, "max_tokens": 2},
                           timeout=aiohttp.ClientTimeout(total=0.5))
    for _ in range(200):
        if d.cancelled and all(b.in_flight_requests == 0 for b in router.state.pool):
            break
        await asyncio.sleep(0.02)
    assert d.cancelled == 1
    assert [b.in_flight_prompt_tokens for b in router.state.pool] == [0, 0]
    assert all(b.in_flight_requests == 0 for b in router.state.pool)
