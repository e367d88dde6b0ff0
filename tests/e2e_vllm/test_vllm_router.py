"""The router in front of real vLLM engines: ``kvrouter serve`` processes over CPU engines.

Proves, with two engines (small KV caches) and kv_aware fed by the engines' KV events
(precise mode): the router's blocks equal the engines' (parity counter 0 with blocks checked,
completions and chat); requests sharing a long prefix follow it and come back with
``cached_tokens`` > 0 while round_robin gets half of that; evictions (BlockRemoved) and
``/reset_prefix_cache`` (AllBlocksCleared) reach the index; a router started after the engines
learns their caches through the replay socket; responses are byte-identical to the engine's
own (ids and timestamps normalised: vLLM stamps each response afresh); an engine killed
mid-stream ends that stream with a clean error, later requests keep being served, and the
dead engine's blocks leave the index.

What the index holds is read through ``POST /debug/route`` (each backend's matched tokens)
and ``/metrics``. Figures (hit rates, TTFTs) are printed and written to
``out/e2e_vllm_figures.json``.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from vllm_client import (
    MODEL,
    Result,
    chat_body,
    completion_body,
    normalised,
    post,
    sse_events,
    text,
)

pytestmark = pytest.mark.vllm

ROOT = Path(__file__).resolve().parents[2]
BLOCK = 32
INDEX_TIMEOUT_S = 60.0
GROUPS = 8  # shared-prefix groups; each has one warm-up and two follow-ups


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as s:
        yield s


async def _until(check: Callable[[], Awaitable[bool]], what: str,
                 timeout_s: float = INDEX_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        await asyncio.sleep(0.25)


async def _metrics(session: aiohttp.ClientSession, router: Any) -> dict[str, float]:
    """Sample name (with sorted labels) -> value, plus plain name -> sum over labels."""
    async with session.get(f"{router.url}/metrics") as resp:
        assert resp.status == 200
        raw = await resp.text()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(raw):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}"] = sample.value
            out[sample.name] = out.get(sample.name, 0.0) + sample.value
    return out


def _events_of(metrics: dict[str, float], backend: str, kind: str) -> float:
    """Applied KV events of one type for one backend (type label matched loosely)."""
    return sum(v for k, v in metrics.items()
               if k.startswith("kvrouter_kv_events_total{") and f"backend={backend}" in k
               and kind.lower() in k.lower())


async def _matched(session: aiohttp.ClientSession, router: Any, body: dict[str, Any]
                   ) -> dict[str, int]:
    """Each candidate's matched tokens for ``body`` as the router's index sees them now."""
    async with session.post(f"{router.url}/debug/route", json=body) as resp:
        assert resp.status == 200, await resp.text()
        answer = await resp.json()
    return {s["backend_id"]: int(s["matched_tokens"]) for s in answer["decision"]["scores"]}


def _probe(prefix: str) -> dict[str, Any]:
    # A longer prompt than the cached one, so the "prompt - 1" cap never hides a match.
    return completion_body(prefix + " " + text(999, 80))


async def _direct(session: aiohttp.ClientSession, engine: Any, body: dict[str, Any]) -> Result:
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    result = await post(session, f"{engine.url}{path}", body)
    assert result.status == 200, result.body[:500]
    return result


async def _routed(session: aiohttp.ClientSession, router: Any, body: dict[str, Any]) -> Result:
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    result = await post(session, f"{router.url}{path}", body)
    assert result.status == 200, result.body[:500]
    return result


# ---------------------------------------------------------------------------------- parity


async def test_router_blocks_equal_engine_blocks(
    cluster: Any, start_router: Any, session: aiohttp.ClientSession
) -> None:
    router = start_router(cluster.pair)
    bodies = [completion_body(text(100 + i, 200 + 40 * i)) for i in range(3)]
    bodies += [chat_body([{"role": "system", "content": text(110 + i, 60)},
                          {"role": "user", "content": text(120 + i, 150 + 30 * i)}])
               for i in range(3)]
    for body in bodies:
        await _routed(session, router, body)

    async def checked() -> bool:
        # Each request stores at least 6 new full blocks on its engine.
        return (await _metrics(session, router)).get(
            "kvrouter_token_parity_checked_blocks_total", 0.0) >= 6 * len(bodies)

    await _until(checked, "the parity check to cover the requests' blocks")
    metrics = await _metrics(session, router)
    assert metrics.get("kvrouter_token_parity_mismatch_total", 0.0) == 0.0
    assert metrics.get("kvrouter_tokenize_fallback_total", 0.0) == 0.0


# ---------------------------------------------------------------------------- hit rates


async def _shared_prefix_run(session: aiohttp.ClientSession, router: Any, seed: int
                             ) -> dict[str, Any]:
    """Per group: a warm-up with a fresh ~1,024-token prefix, then two follow-ups sharing it.

    The order (warm, follow, follow) makes round_robin send exactly one follow-up of each
    group to the engine that holds the prefix, whatever its starting point.

    With KV events, the follow-ups go out once the warm-up's blocks are in the router's index:
    what this checks is that routing follows the engine holding the prefix. A follow-up sent
    the instant the warm-up ends can reach the router before the engine's events do (kv_aware
    counts only events for event-fed engines, not its own dispatches there); the router's
    prompt path used to take long enough (~2-5 ms on these shared cores) to hide that race.
    """
    groups = []
    for g in range(GROUPS):
        prefix = text(seed + g, 1024)
        sent = []
        for k in range(3):
            body = completion_body(prefix + " " + text(seed + 100 * (g + 1) + k, 48),
                                   max_tokens=4, stream=True)
            sent.append(await _routed(session, router, body))
            if k == 0 and router.kv_backends:
                holder = sent[0].backend

                async def indexed(prefix: str = prefix, holder: str = holder) -> bool:
                    return (await _matched(session, router, _probe(prefix))).get(holder, 0) >= 512

                await _until(indexed, "the warm-up's blocks in the router's index")
        groups.append(sent)
    follow = [r for sent in groups for r in sent[1:]]
    prompt_tokens = sum(r.usage()["prompt_tokens"] for r in follow)
    return {
        "groups": groups,
        "follow_ups": follow,
        "hit_rate": sum(r.cached_tokens() for r in follow) / prompt_tokens,
        "follow_ups_with_hits": sum(1 for r in follow if r.cached_tokens() > 0),
        "ttft_hit_ms": [1000 * r.ttft_s for r in follow if r.cached_tokens() > 0 and r.ttft_s],
        "ttft_miss_ms": [1000 * r.ttft_s for r in follow if r.cached_tokens() == 0 and r.ttft_s],
        "ttft_ms": [1000 * r.ttft_s for r in follow if r.ttft_s is not None],
    }


def _summary(run: dict[str, Any]) -> dict[str, Any]:
    def mean(xs: list[float]) -> float | None:
        return round(statistics.fmean(xs), 1) if xs else None

    return {
        "follow_up_hit_rate": round(run["hit_rate"], 3),
        "follow_ups_with_hits": f"{run['follow_ups_with_hits']}/{len(run['follow_ups'])}",
        "ttft_mean_ms": mean(run["ttft_ms"]),
        "ttft_median_ms": round(statistics.median(run["ttft_ms"]), 1),
        "ttft_mean_ms_hits": mean(run["ttft_hit_ms"]),
        "ttft_mean_ms_misses": mean(run["ttft_miss_ms"]),
    }


async def test_shared_prefix_follows_its_engine_and_beats_round_robin(
    cluster: Any, start_router: Any, session: aiohttp.ClientSession
) -> None:
    router = start_router(cluster.pair)
    kv = await _shared_prefix_run(session, router, seed=1000)
    router.stop()
    for sent in kv["groups"]:
        holder = sent[0].backend
        assert holder in (cluster.a.url, cluster.b.url)
        for follow in sent[1:]:
            assert follow.backend == holder
            # The whole 1,024-token prefix (32 blocks) was cached.
            assert follow.cached_tokens() >= 1024
    rr_router = start_router(cluster.pair, "round_robin", kv_events=False)
    rr = await _shared_prefix_run(session, rr_router, seed=2000)
    assert kv["follow_ups_with_hits"] == len(kv["follow_ups"])
    assert rr["follow_ups_with_hits"] == len(rr["follow_ups"]) // 2
    assert 0.35 < rr["hit_rate"] / kv["hit_rate"] < 0.65
    figures = {"kv_aware": _summary(kv), "round_robin": _summary(rr),
               "prefix_tokens": 1024, "follow_ups": len(kv["follow_ups"]),
               "engines": 2, "model": MODEL}
    print("\nreal-vLLM shared-prefix figures:", json.dumps(figures, indent=2))
    out = ROOT / "out"
    out.mkdir(exist_ok=True)
    (out / "e2e_vllm_figures.json").write_text(json.dumps(figures, indent=2) + "\n")


# ---------------------------------------------------------------- eviction and reset


async def test_evictions_and_reset_reach_the_index(
    cluster: Any, start_router: Any, session: aiohttp.ClientSession
) -> None:
    engine = cluster.a
    router = start_router(cluster.pair)
    victim = text(3000, 640)  # 20 full blocks
    await _direct(session, engine, completion_body(victim, max_tokens=1))

    async def indexed() -> bool:
        return (await _matched(session, router, _probe(victim))).get(engine.url, 0) >= 640

    await _until(indexed, "the victim prompt's blocks in the index")
    # Flood the engine (256 blocks) with 8 x 59 blocks of fresh prompts: the victim is evicted.
    for i in range(8):
        await _direct(session, engine, completion_body(text(3100 + i, 1900), max_tokens=1))

    async def evicted() -> bool:
        return (await _matched(session, router, _probe(victim))).get(engine.url, 0) < 640

    await _until(evicted, "the victim's evicted blocks to leave the index")
    metrics = await _metrics(session, router)
    assert _events_of(metrics, engine.url, "removed") > 0

    survivor = text(3200, 320)
    await _direct(session, engine, completion_body(survivor, max_tokens=1))

    async def survivor_indexed() -> bool:
        return (await _matched(session, router, _probe(survivor))).get(engine.url, 0) >= 320

    await _until(survivor_indexed, "the survivor prompt's blocks in the index")
    cleared_before = _events_of(await _metrics(session, router), engine.url, "cleared")
    async with session.post(f"{engine.url}/reset_prefix_cache") as resp:
        assert resp.status == 200, await resp.text()
    # vLLM publishes AllBlocksCleared with the next scheduler step's events: give it one.
    await _direct(session, engine, completion_body("hi", max_tokens=1))

    async def cleared() -> bool:
        return (await _matched(session, router, _probe(survivor))).get(engine.url, 0) == 0

    await _until(cleared, "the reset engine's blocks to leave the index")
    metrics = await _metrics(session, router)
    assert _events_of(metrics, engine.url, "cleared") == cleared_before + 1
    # The engine really lost them: the same prompt now misses.
    again = await _direct(session, engine, completion_body(survivor, max_tokens=1))
    assert again.cached_tokens() == 0


# ------------------------------------------------------------------------------ replay


async def test_router_started_after_engines_learns_caches_by_replay(
    cluster: Any, start_router: Any, session: aiohttp.ClientSession
) -> None:
    # No router is bound where the engines publish: these events are lost on the live socket.
    prefix = text(4000, 512)
    await _direct(session, cluster.b, completion_body(prefix, max_tokens=1))
    router = start_router(cluster.pair)

    async def recovered() -> bool:
        return (await _matched(session, router, _probe(prefix))).get(cluster.b.url, 0) >= 512

    await _until(recovered, "the late router to learn engine b's blocks")
    metrics = await _metrics(session, router)
    assert metrics.get("kvrouter_kv_event_replays_total", 0.0) > 0
    follow = await _routed(session, router, _probe(prefix))
    assert follow.backend == cluster.b.url
    assert follow.cached_tokens() >= 512


# ------------------------------------------------------------------------ byte identity


IDENTITY_CASES = [
    ("completion", False), ("completion-stream", True), ("chat", False), ("chat-stream", True),
]


@pytest.mark.parametrize(("name", "stream"), IDENTITY_CASES, ids=[c[0] for c in IDENTITY_CASES])
async def test_responses_byte_identical_to_engine(
    cluster: Any, start_router: Any, session: aiohttp.ClientSession, name: str, stream: bool
) -> None:
    seed = 5000 + 10 * IDENTITY_CASES.index((name, stream))
    if name.startswith("chat"):
        body = chat_body([{"role": "user", "content": text(seed, 200)}], max_tokens=24,
                         stream=stream)
    else:
        body = completion_body(text(seed, 200), max_tokens=24, stream=stream)
    # Warm both engines so the routed and the direct request see the same cache state (the
    # usage block reports cached tokens).
    for engine in cluster.pair:
        await _direct(session, engine, body)
    router = start_router(cluster.pair)
    # vLLM's CPU kernels are not always bit-reproducible on this random-weight model (top-2
    # logprob gaps down to 2e-4 were seen, and a rare rerun picks the other token), and on a
    # loaded machine its API server now and then puts several tokens in one stream event. So
    # a routed answer must equal ONE of three direct answers of the same engine, and up to
    # three routed answers get that chance: a router that changed a single byte matches none.
    for _attempt in range(3):
        routed = await _routed(session, router, body)
        engine = cluster.a if routed.backend == cluster.a.url else cluster.b
        assert routed.backend == engine.url
        if stream:
            assert sse_events(routed.body)[-1] == "[DONE]"
        assert routed.cached_tokens() > 0
        for _ in range(3):
            direct = await _direct(session, engine, body)
            assert routed.headers["content-type"] == direct.headers["content-type"]
            if normalised(routed.body) == normalised(direct.body):
                return
    if stream:
        assert sse_events(normalised(routed.body)) == sse_events(normalised(direct.body))
    assert normalised(routed.body) == normalised(direct.body)


# ------------------------------------------------------------------------ engine crash


async def test_engine_killed_mid_stream(
    cluster: Any, start_router: Any, session: aiohttp.ClientSession
) -> None:
    spare = cluster.spare
    prefix = text(6000, 512)
    await _direct(session, spare, completion_body(prefix, max_tokens=1))
    router = start_router([cluster.a, spare])

    async def indexed() -> bool:
        return (await _matched(session, router, _probe(prefix))).get(spare.url, 0) >= 512

    await _until(indexed, "the spare engine's blocks in the index")

    body = completion_body(prefix + " " + text(6001, 40), max_tokens=1200, stream=True)
    chunks: list[bytes] = []
    async with session.post(f"{router.url}/v1/completions", json=body) as resp:
        assert resp.status == 200
        assert resp.headers["x-kvrouter-backend"] == spare.url
        async for chunk in resp.content.iter_any():
            chunks.append(chunk)
            if len(sse_events(b"".join(chunks))) >= 5:
                break
        cluster.kill(spare)
        # The rest of the stream must end by itself, cleanly (no hang, no half chunk).
        async with asyncio.timeout(120):
            async for chunk in resp.content.iter_any():
                chunks.append(chunk)
    events = sse_events(b"".join(chunks))
    assert "[DONE]" not in events
    error = json.loads(events[-1])["error"]
    assert error["message"] and error["type"] and error["code"]

    # The router keeps serving: the same prefix now goes to the live engine.
    after = await _routed(session, router, _probe(prefix))
    assert after.backend == cluster.a.url

    async def spare_out() -> bool:
        return spare.url not in await _matched(session, router, _probe(prefix))

    await _until(spare_out, "the dead engine to leave the candidates")

    # Bring the engine back on the same port: the router must not believe it still holds
    # the prefix (its cache died with it), before it has sent a single event.
    cluster.restart_spare()

    async def back() -> bool:
        return spare.url in await _matched(session, router, _probe(prefix))

    await _until(back, "the restarted engine to be a candidate again", timeout_s=120.0)
    assert (await _matched(session, router, _probe(prefix)))[spare.url] == 0
