"""Engine-metric scraping: vLLM and SGLang expositions, staleness, errors never fatal."""

from __future__ import annotations

import math

import aiohttp
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

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


# -- the line scan against prometheus-client's parser ---------------------------------------

_READ_NAMES = ["vllm:num_requests_waiting", "vllm:num_requests_running",
               "vllm:kv_cache_usage_perc", "vllm:num_preemptions_total",
               "vllm:cache_config_info", "sglang:num_queue_reqs", "sglang:num_running_reqs",
               "sglang:token_usage"]
# Families the router does not read, some sharing a read family's prefix.
_OTHER_NAMES = ["vllm:num_requests_waiting_by_reason", "vllm:kv_cache_usage_perc_max",
                "vllm:time_to_first_token_seconds_bucket", "vllm:prefix_cache_hits_total",
                "process_cpu_seconds_total", "python_gc_objects_collected_total"]
_label_values = st.text(alphabet=st.sampled_from('ab09_-. "\\}{,=\n'), max_size=8)


@st.composite
def _expositions(draw):
    lines = []
    for name in draw(st.lists(st.sampled_from(_READ_NAMES + _OTHER_NAMES), max_size=12)):
        labels = draw(st.dictionaries(st.sampled_from(["engine", "model_name", "le", "x_y"]),
                                      _label_values, max_size=3))
        if name == "vllm:cache_config_info":
            labels["block_size"] = str(draw(st.sampled_from([0, 16, 128])))
            labels["num_gpu_blocks"] = str(draw(st.integers(0, 10**6)))
        value = draw(st.one_of(st.integers(0, 10**6).map(float),
                               st.floats(0, 1, allow_nan=False),
                               st.sampled_from(["+Inf", "1e3", "-0.0"])))
        pairs = ",".join('{}="{}"'.format(k, v.replace("\\", "\\\\").replace("\n", "\\n")
                                          .replace('"', '\\"'))
                         for k, v in labels.items())
        stamp = draw(st.sampled_from(["", " 1700000000000"]))
        lines.append(f"{name}{{{pairs}}} {value}{stamp}" if pairs else f"{name} {value}{stamp}")
        if draw(st.booleans()):
            lines.append(f"# HELP {name} something {{with}} braces")
    return "\n".join(lines) + "\n"


def _reference(text):
    """What the router read before the line scan: prometheus-client's parser."""
    from prometheus_client.parser import text_string_to_metric_families

    samples = [(s.name, s.labels, s.value)
               for family in text_string_to_metric_families(text) for s in family.samples
               if math.isfinite(s.value)]  # the scan skips NaN and Inf samples
    def total(names):
        values = [v for n, _, v in samples if n in names]
        return round(sum(values)) if values else None
    usage = [v for n, _, v in samples if n in ("vllm:kv_cache_usage_perc", "sglang:token_usage")]
    info = [labels for n, labels, _ in samples if n == "vllm:cache_config_info"]
    def last_positive(key):
        out = None
        for labels in info:
            raw = labels.get(key)
            if raw and raw.isdigit() and int(raw) > 0:
                out = int(raw)
        return out
    return (total(("vllm:num_requests_waiting", "sglang:num_queue_reqs")),
            total(("vllm:num_requests_running", "sglang:num_running_reqs")),
            min(1.0, max(0.0, max(usage))) if usage else None,
            last_positive("block_size"), last_positive("num_gpu_blocks"),
            None if (p := total(("vllm:num_preemptions_total",))) is None else max(0, p))


@settings(max_examples=300, deadline=None)
@given(_expositions())
def test_the_line_scan_reads_what_prometheus_clients_parser_reads(text):
    s = parse_engine_metrics(text)
    assert (s.waiting_requests, s.running_requests, s.kv_usage_ratio, s.block_size,
            s.total_kv_blocks, s.preemptions_total) == _reference(text)


def test_a_bad_line_of_a_family_the_router_does_not_read_is_not_read():
    text = VLLM_TEXT + "vllm:some_future_family{ not prometheus\nrandom words here\n"
    assert parse_engine_metrics(text).waiting_requests == 8
    with pytest.raises(ValueError, match="unparsable sample value"):
        parse_engine_metrics(VLLM_TEXT + "vllm:num_requests_waiting 1.0.0\n")
