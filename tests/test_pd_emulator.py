"""The router's split path against the emulator's prefill and decode pods (in-process), for both
protocols, streaming and not: the prompt is prefilled once, on the prefill pod, and the split
shows in each pod's ``vllm:prompt_tokens_total`` / ``vllm:generation_tokens_total``."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from test_pd_router import ForcedSplit

from simulator.emulator.fleet import EmulatedCluster

PROMPT = "Summarize the following report about cache-aware routing. " * 30


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
        yield s


async def counter(session: aiohttp.ClientSession, url: str, name: str) -> float:
    text = await (await session.get(url + "/metrics")).text()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


async def first_health_round_done(router: Any) -> None:
    """Wait until the router has checked every backend once (GET /health, then /v1/models).

    A pod stopped while a connection to it is being accepted leaks that socket: aiohttp's
    runner looks for connections to close one loop turn after stopping its listener, and the
    accepted one registers itself later than that (a ResourceWarning, an error under
    filterwarnings = error). Stopping a pod only once the router's probes are over avoids it."""
    for _ in range(500):
        if all(backend.discovered_models for backend in router.state.pool):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the router never finished its first health round")


def pods(engine: str, role: str, count: int = 1) -> EmulatedCluster:
    return EmulatedCluster(count=count, engine=engine, role=role, time_scale=50.0,
                           kv_events_endpoint=None, num_gpu_blocks=2048)


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_split_through_emulated_pods(
    engine: str, stream: bool, start_router: Any, session: aiohttp.ClientSession
) -> None:
    async with pods(engine, "prefill") as prefill, pods(engine, "decode", 2) as decode:
        p_url = prefill.urls[0]
        raw = {
            "backends": [{"url": p_url, "role": "prefill", "engine": engine}] + [
                {"url": u, "role": "decode", "engine": engine} for u in decode.urls],
            "disaggregation": {"bootstrap_ports": {p_url: prefill.pd_nodes[0].port}},
        }
        router = await start_router(raw, policy=ForcedSplit(), rng=random.Random(3))
        body: dict[str, Any] = {"model": "tiny-llama", "prompt": PROMPT, "max_tokens": 6,
                                "stream": stream}
        if stream:
            body["stream_options"] = {"include_usage": True}
        response = await session.post(router.url + "/v1/completions", json=body)
        assert response.status == 200, await response.text()
        assert response.headers["x-kvrouter-pd"] == "split"
        if stream:
            chunks = [json.loads(line[6:]) for line in (await response.text()).split("\n\n")
                      if line.startswith("data: {")]
            usage = chunks[-1]["usage"]
            assert sum(1 for c in chunks if c["choices"]) == 6
        else:
            usage = (await response.json())["usage"]
        prompt = usage["prompt_tokens"]
        assert prompt > 100 and usage["completion_tokens"] == 6
        d_url = response.headers["x-kvrouter-backend"]
        prefix = "vllm" if engine == "vllm" else "sglang"
        # Prefilled once, on the prefill pod (one token there); decoded on the decode pod.
        assert await counter(session, p_url, f"{prefix}:prompt_tokens_total") == prompt
        assert await counter(session, p_url, f"{prefix}:generation_tokens_total") == 1
        assert await counter(session, d_url, f"{prefix}:prompt_tokens_total") == 0
        assert await counter(session, d_url, f"{prefix}:generation_tokens_total") == 6
        node = decode.pd_nodes[decode.urls.index(d_url)]
        assert node.pulled_tokens == prompt and node.failed_pulls == 0


async def test_emulated_decode_pod_failing_is_replaced(start_router: Any,
                                                       session: aiohttp.ClientSession) -> None:
    # vLLM: the first decode pod is gone; the next one pulls with the same parameters.
    async with pods("vllm", "prefill") as prefill, pods("vllm", "decode", 2) as decode:
        raw = {"backends": [{"url": prefill.urls[0], "role": "prefill"}] + [
            {"url": u, "role": "decode"} for u in decode.urls]}
        router = await start_router(raw, policy=ForcedSplit(), rng=random.Random(3))
        await first_health_round_done(router)
        await decode._runners[0].cleanup()
        response = await session.post(router.url + "/v1/completions", json={
            "model": "tiny-llama", "prompt": PROMPT, "max_tokens": 3})
        assert response.status == 200, await response.text()
        assert response.headers["x-kvrouter-backend"] == decode.urls[1]
        assert decode.pd_nodes[1].pulled_tokens > 0
        assert await counter(session, decode.urls[1], "vllm:prompt_tokens_total") == 0
