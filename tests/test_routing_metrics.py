"""Routing metrics: predicted hit tokens, routed prompt tokens and decisions by reason.

Routers on real sockets in front of fake vLLM backends; the counters are read back from the
router's own ``/metrics`` and checked against what the responses' headers and the request
bodies say. The reason label is checked to stay a short fixed vocabulary whatever a policy
writes into ``Decision.reason``.
"""

from __future__ import annotations

import math
import random

import pytest
from prometheus_client.parser import text_string_to_metric_families

from router.metrics import MAX_REASON_LABELS, RouterMetrics, reason_label
from router.setup.kv import build_kv
from simulator.tiny_tokenizer import default_path


async def _samples(http, url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with http.get(url + "/metrics") as response:
        text = await response.text()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


async def test_round_robin_counts_prompt_tokens_and_decisions(start_backend, start_router, http):
    a = await start_backend(name="a")
    b = await start_backend(name="b")
    router = await start_router({"backends": [a.url, b.url], "policy": {"name": "round_robin"}})
    prompts = ["x" * 10, "y" * 101, "z" * 7, "w" * 40, "v" * 3]
    expected = {a.url: 0, b.url: 0}
    for prompt in prompts:
        async with http.post(router.url + "/v1/completions",
                             json={"model": "tiny", "prompt": prompt}) as response:
            assert response.status == 200
            await response.read()
            # No tokenizer: the character estimate (4 characters per token, rounded up).
            expected[response.headers["x-kvrouter-backend"]] += math.ceil(len(prompt) / 4)
    samples = await _samples(http, router.url)
    for url, tokens in expected.items():
        labels = (("backend", url),)
        assert samples[("kvrouter_routed_prompt_tokens_total", labels)] == tokens
        assert samples[("kvrouter_predicted_hit_tokens_total", labels)] == 0
    assert samples[("kvrouter_routing_decisions_total",
                    (("policy", "round_robin"), ("reason", "round_robin")))] == len(prompts)


async def test_kv_aware_predicted_hits_match_the_response_headers(
        start_backend, start_router, http):
    a = await start_backend(name="a")
    b = await start_backend(name="b")
    config = {"backends": [a.url, b.url], "policy": {"name": "kv_aware", "seed": 3},
              "models": {"tiny": {"tokenizer": str(default_path()), "block_size": 16}}}
    from router.config import parse_config

    parsed = parse_config(config)
    kv = build_kv(parsed)
    rng = random.Random(3)
    router = await start_router(parsed, background=[kv.background], analyzer=kv.analyzer,
                                index=kv.index, policy=kv.policy(rng), rng=rng)
    system = "A long shared system prompt that every request starts with. " * 12
    predicted = {a.url: 0, b.url: 0}
    for i in range(6):
        async with http.post(router.url + "/v1/chat/completions", json={
                "model": "tiny", "max_tokens": 2,
                "messages": [{"role": "system", "content": system},
                             {"role": "user", "content": f"question {i}"}]}) as response:
            assert response.status == 200, await response.text()
            await response.read()
            predicted[response.headers["x-kvrouter-backend"]] += int(
                response.headers["x-kvrouter-predicted-hit-tokens"])
    # Approximate mode (no KV events): the second request on a backend finds the first's blocks.
    assert sum(predicted.values()) > 0
    samples = await _samples(http, router.url)
    routed = 0.0
    for url, hits in predicted.items():
        labels = (("backend", url),)
        # A backend the policy never chose has no series yet.
        assert samples.get(("kvrouter_predicted_hit_tokens_total", labels), 0.0) == hits
        routed += samples.get(("kvrouter_routed_prompt_tokens_total", labels), 0.0)
    assert routed > sum(predicted.values())
    decisions = {labels: v for (name, labels), v in samples.items()
                 if name == "kvrouter_routing_decisions_total"}
    assert sum(decisions.values()) == 6
    assert all(dict(labels)["policy"] == "kv_aware" and dict(labels)["reason"].startswith(
        "kv_aware") for labels in decisions)


@pytest.mark.parametrize(("reason", "label"), [
    ("round_robin", "round_robin"),
    ("session_affinity:new:hash", "session_affinity:new:hash"),
    ("kv_aware: lowest predicted TTFT prefill, least-loaded decode",
     "kv_aware: lowest predicted TTFT prefill"),
    ("disaggregation: split, prefill on http://10.0.0.7:8000 then decode; predicted TTFT 0.1 s",
     "disaggregation: split"),
    ("disaggregation: local, 300 uncached tokens < min_uncached_tokens 512",
     "disaggregation: local"),
    ("disaggregation: local on prefill (no decode backend); kv_aware: lowest predicted TTFT",
     "disaggregation: local on prefill"),
    ("", "none"),
], ids=["constant", "colon-variants", "comma-clause", "split-with-url", "local-with-numbers",
        "parenthesis", "empty"])
def test_reason_label_keeps_the_fixed_head(reason: str, label: str) -> None:
    assert reason_label(reason) == label


def test_reason_labels_are_bounded() -> None:
    metrics = RouterMetrics("p")
    for i in range(5 * MAX_REASON_LABELS):
        metrics.routed("b", f"rule{i}", 10, 0)
    values = [s for s in metrics.decisions.collect()[0].samples if s.name.endswith("_total")]
    assert len(values) == MAX_REASON_LABELS + 1
    assert sum(s.value for s in values) == 5 * MAX_REASON_LABELS
    other = [s for s in values if s.labels["reason"] == "other"]
    assert other and other[0].value == 4 * MAX_REASON_LABELS
