"""An emulated pod's ``/metrics``: vLLM's (or SGLang's) exact metric names and labels, read from
the engine model at scrape time, in a per-pod prometheus ``CollectorRegistry``.

Used only by the emulator. Must not import ``router`` or aiohttp.

vLLM flavour (labels ``engine="0"``, ``model_name``): gauges ``vllm:num_requests_running``,
``vllm:num_requests_waiting``, ``vllm:kv_cache_usage_perc`` (0..1, cached-but-free blocks count
as free); counters ``vllm:prefix_cache_queries_total``, ``vllm:prefix_cache_hits_total`` (tokens),
``vllm:num_preemptions_total``, ``vllm:prompt_tokens_total``, ``vllm:generation_tokens_total``;
``vllm:cache_config_info`` (value 1; labels ``block_size``, ``num_gpu_blocks``,
``enable_prefix_caching``, ``prefix_caching_hash_algo``); histograms
``vllm:time_to_first_token_seconds``, ``vllm:e2e_request_latency_seconds`` (wall seconds, what a
client sees, whatever the time scale). With KV tiers (CPU offload, a shared store) also
vLLM's connector counters ``vllm:external_prefix_cache_queries_total`` (prompt tokens past the
GPU hit) and ``vllm:external_prefix_cache_hits_total`` (tokens loaded instead), and the
emulator's own split ``emulator:tier_hit_tokens_total{tier="cpu"|"shared"}``.
SGLang flavour (label ``model_name``): ``sglang:num_running_reqs``, ``sglang:num_queue_reqs``,
``sglang:token_usage``, ``sglang:cache_hit_rate``, ``sglang:prompt_tokens_total``,
``sglang:generation_tokens_total``, ``sglang:time_to_first_token_seconds``.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from simulator.engine.model import EngineModel

__all__ = ["PodMetrics"]

_TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
_E2E_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
    240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip


class _EngineCollector(Collector):
    def __init__(self, engine: EngineModel, model_name: str, sglang: bool) -> None:
        self._engine = engine
        self._model = model_name
        self._sglang = sglang

    def collect(self) -> Iterator[Metric]:
        e = self._engine
        if self._sglang:
            labels = ["model_name"]
            values = [self._model]
            for name, doc, value in (
                ("sglang:num_running_reqs", "The number of running requests.", e.num_running),
                (
                    "sglang:num_queue_reqs",
                    "The number of requests in the waiting queue.",
                    e.num_waiting,
                ),
                ("sglang:token_usage", "The token usage.", e.kv_usage_ratio),
                (
                    "sglang:cache_hit_rate",
                    "The prefix cache hit rate.",
                    e.prefix_cache_hits_tokens / e.prefix_cache_queries_tokens
                    if e.prefix_cache_queries_tokens
                    else 0.0,
                ),
            ):
                g = GaugeMetricFamily(name, doc, labels=labels)
                g.add_metric(values, float(value))
                yield g
            for name, doc, value in (
                (
                    "sglang:prompt_tokens",
                    "Number of prefill tokens processed.",
                    e.prompt_tokens_total,
                ),
                (
                    "sglang:generation_tokens",
                    "Number of generation tokens processed.",
                    e.generation_tokens_total,
                ),
            ):
                c = CounterMetricFamily(name, doc, labels=labels)
                c.add_metric(values, float(value))
                yield c
            return
        labels = ["engine", "model_name"]
        values = ["0", self._model]
        for name, doc, value in (
            (
                "vllm:num_requests_running",
                "Number of requests in model execution batches.",
                e.num_running,
            ),
            (
                "vllm:num_requests_waiting",
                "Number of requests waiting to be processed.",
                e.num_waiting,
            ),
            (
                "vllm:kv_cache_usage_perc",
                "KV-cache usage. 1 means 100 percent usage.",
                e.kv_usage_ratio,
            ),
        ):
            g = GaugeMetricFamily(name, doc, labels=labels)
            g.add_metric(values, float(value))
            yield g
        for name, doc, value in (
            (
                "vllm:prefix_cache_queries",
                "Prefix cache queries, in terms of number of queried tokens.",
                e.prefix_cache_queries_tokens,
            ),
            (
                "vllm:prefix_cache_hits",
                "Prefix cache hits, in terms of number of cached tokens.",
                e.prefix_cache_hits_tokens,
            ),
            (
                "vllm:num_preemptions",
                "Cumulative number of preemption from the engine.",
                e.num_preemptions,
            ),
            ("vllm:prompt_tokens", "Number of prefill tokens processed.", e.prompt_tokens_total),
            (
                "vllm:generation_tokens",
                "Number of generation tokens processed.",
                e.generation_tokens_total,
            ),
        ):
            c = CounterMetricFamily(name, doc, labels=labels)
            c.add_metric(values, float(value))
            yield c
        if e.cpu is not None or e.shared is not None:
            yield from self._tiers(labels, values)
        info = GaugeMetricFamily(
            "vllm:cache_config_info",
            "Information of the LLMEngine CacheConfig",
            labels=[
                "block_size",
                "enable_prefix_caching",
                "engine",
                "num_gpu_blocks",
                "prefix_caching_hash_algo",
            ],
        )
        info.add_metric([str(e.block_size), "True", "0", str(e.num_gpu_blocks), "sha256"], 1.0)
        yield info


    def _tiers(self, labels: list[str], values: list[str]) -> Iterator[Metric]:
        e = self._engine
        for name, doc, value in (
            ("vllm:external_prefix_cache_queries",
             "External prefix cache queries from KV connector cross-instance cache sharing, "
             "in terms of number of queried tokens.",
             e.prefix_cache_queries_tokens - e.prefix_cache_hits_tokens),
            ("vllm:external_prefix_cache_hits",
             "External prefix cache hits from KV connector cross-instance cache sharing, in "
             "terms of number of cached tokens.",
             e.cpu_hit_tokens + e.shared_hit_tokens),
        ):
            c = CounterMetricFamily(name, doc, labels=labels)
            c.add_metric(values, float(value))
            yield c
        split = CounterMetricFamily("emulator:tier_hit_tokens",
                                    "Prompt tokens loaded from a KV tier below HBM.",
                                    labels=[*labels, "tier"])
        split.add_metric([*values, "cpu"], float(e.cpu_hit_tokens))
        split.add_metric([*values, "shared"], float(e.shared_hit_tokens))
        yield split


class PodMetrics:
    """The registry of one pod plus the histograms its driver observes."""

    def __init__(self, engine: EngineModel, model_name: str, sglang: bool = False) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_EngineCollector(engine, model_name, sglang))
        prefix = "sglang:" if sglang else "vllm:"
        label_names = ["model_name"] if sglang else ["engine", "model_name"]
        label_values = [model_name] if sglang else ["0", model_name]
        self.ttft = Histogram(
            f"{prefix}time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            label_names,
            buckets=_TTFT_BUCKETS,
            registry=self.registry,
        ).labels(*label_values)
        self.e2e = Histogram(
            f"{prefix}e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            label_names,
            buckets=_E2E_BUCKETS,
            registry=self.registry,
        ).labels(*label_values)

    def render(self) -> bytes:
        return generate_latest(self.registry)
