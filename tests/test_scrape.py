"""Engine-metric scraping: vLLM and SGLang expositions, staleness, errors never fatal."""

from __future__ import annotations

import aiohttp
import pytest
from aiohttp import web

from policies.bookkeeping import EngineSignals
from router.kv.metrics import KvMetrics
from router.pool import BackendPool
from router.scrape import EngineScraper, parse_engine_metrics

VLLM_TEXT = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="tiny"} 3.0
vllm:num_requests_running{engine="1",model_name="tiny"} 2.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="tiny"} 7.0
vllm:num_requests_waiting{engine="1",model_name="tiny"} 1.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="tiny"} 0.25
vllm:kv_cache_usage_perc{engine="1",model_name="tiny"} 0.5
# HELP vllm:prefix_cache_hits_total Prefix cache hits, in terms of number of cached tokens.
# TYPE vllm:prefix_cache_hits_total counter
vllm:prefix_cache_hits_total{engine="0",model_name="tiny"} 1024.0
# HELP vllm:num_preemptions_total Cumulative number of preemption from the engine.
# TYPE vllm:num_preemptions_total counter
vllm:num_preemptions_total{engine="0",model_name="tiny"} 3.0
vllm:num_preemptions_total{engine="1",model_name="tiny"} 4.0
# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="128",cache_dtype="auto",enable_prefix_caching="True",engine="0",num_gpu_blocks="4096",prefix_caching_hash_algo="sha256"} 1.0
"""

SGLANG_TEXT = """\
# HELP sglang:num_running_reqs The number of running requests.
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{model_name="tiny"} 4.0
# HELP sglang:num_queue_reqs The number of requests in the waiting queue.
# TYPE sglang:num_queue_reqs gauge
sglang:num_queue_reqs{model_name="tiny"} 9.0
# HELP sglang:token_usage The token usage.
# TYPE sglang:token_usage gauge
sglang:token_usage{model_name="tiny"} 0.75
"""


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (VLLM_TEXT, (8, 5, 0.5, 128, 4096, 7)),
        (SGLANG_TEXT, (9, 4, 0.75, None, None, None)),
        ("# nothing here\n", (None, None, None, None, None, None)),
    ],
    ids=["vllm-two-engines", "sglang", "empty"],
)
def test_parse(text, expected):
    s = parse_engine_metrics(text)
    assert (s.waiting_requests, s.running_requests, s.kv_usage_ratio, s.block_size,
            s.total_kv_blocks, s.preemptions_total) == expected


def test_the_emulators_preemption_counter_parses_as_the_engines_count():
    # The emulator writes the counter through prometheus-client as vLLM does (a family
    # ``vllm:num_preemptions`` with a ``_total`` sample and a ``_created`` one).
    from simulator.emulator.metrics import PodMetrics
    from simulator.engine.cost_model import load_cost_model
    from simulator.engine.model import EngineConfig, EngineModel

    engine = EngineModel(EngineConfig(block_size=16, num_gpu_blocks=64),
                         load_cost_model("h200-llama-3.1-8b"))
    engine.num_preemptions = 12
    text = PodMetrics(engine, "tiny").render().decode()
    assert "vllm:num_preemptions_total" in text
    assert parse_engine_metrics(text).preemptions_total == 12


async def _serve(handler):
    app = web.Application()
    app.router.add_get("/metrics", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


async def test_scrape_stores_signals_and_they_go_stale():
    calls = {"n": 0}

    async def metrics(request):
        calls["n"] += 1
        if calls["n"] > 1:
            return web.Response(status=500, text="boom")
        return web.Response(text=VLLM_TEXT, content_type="text/plain")

    runner, url = await _serve(metrics)
    clock = {"now": 100.0}
    pool = BackendPool(engine_signals_max_age_s=5.0)
    pool.add(url, models=["tiny"])
    km = KvMetrics()
    async with aiohttp.ClientSession() as session:
        scraper = EngineScraper(pool, km, lambda: session, now_s=lambda: clock["now"])
        await scraper.scrape_all()
        (state,) = pool.snapshot("tiny", clock["now"] + 1)
        assert state.engine_waiting_requests == 8
        assert state.engine_running_requests == 5
        assert state.kv_usage_ratio == 0.5
        assert state.total_kv_blocks == 4096
        assert state.engine_preemptions_total == 7
        assert pool.get(url).signals.block_size == 128
        # The next scrape fails: counted, old values kept, and they read as None once stale.
        clock["now"] = 103.0
        await scraper.scrape_all()
        assert km.registry.get_sample_value("kvrouter_engine_scrape_errors_total",
                                            {"backend": url}) == 1
        (state,) = pool.snapshot("tiny", 104.0)
        assert state.engine_waiting_requests == 8
        (state,) = pool.snapshot("tiny", 106.0)
        assert state.engine_waiting_requests is None and state.kv_usage_ratio is None
        assert state.engine_preemptions_total is None
    await runner.cleanup()


async def test_unreachable_and_garbage_backends_are_counted():
    async def garbage(request):
        return web.Response(text="vllm:num_requests_waiting{ this is not prometheus\n")

    runner, url = await _serve(garbage)
    pool = BackendPool()
    pool.add(url)
    pool.add("http://127.0.0.1:9")  # nothing listens on the discard port
    km = KvMetrics()
    async with aiohttp.ClientSession() as session:
        scraper = EngineScraper(pool, km, lambda: session, timeout_s=5.0)
        await scraper.scrape_all()
    for backend in (url, "http://127.0.0.1:9"):
        assert km.registry.get_sample_value("kvrouter_engine_scrape_errors_total",
                                            {"backend": backend}) == 1
        assert pool.get(backend).scraped_at_s is None
    await runner.cleanup()


def test_scraped_block_size_and_lora_parent_shape_the_analyzer():
    from router.config import parse_config
    from router.setup.kv import build_kv

    kv = build_kv(parse_config({"models": {"base": {"block_size": 16}}}))
    pool = BackendPool()
    a = pool.add("http://127.0.0.1:1")
    a.discovered_models = {"base": {"id": "base"},
                           "adapter": {"id": "adapter", "parent": "base"}}
    kv.pool = pool
    assert kv.shape_of("base").block_size == 16  # configured: nothing scraped yet
    a.scraped(EngineSignals(block_size=128), 0.0)  # vllm:cache_config_info said so
    shape = kv.shape_of("adapter")
    assert (shape.base_model, shape.lora, shape.block_size) == ("base", "adapter", 128)
    assert kv.shape_of("base").block_size == 128
    kv.analyzer.close()
