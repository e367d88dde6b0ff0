"""The router's per-scrape parse of an engine's ``/metrics``: prometheus-client's text parser
(what ``router/scrape.py`` used) against the line scan it uses now, in one process.

Two expositions: an emulated pod's (``simulator.emulator.metrics.PodMetrics``, 86 lines) and
a vLLM-sized one, the same plus 12 histogram families of 25 buckets, about what a real vLLM
pod's ``/metrics`` carries (TTFT, inter-token latency, e2e, queue/prefill/decode time, prompt
and generation tokens, ...; synthetic, since no real pod runs in this script).

    .venv/bin/python bench/scrape_parse.py [--rounds 7]

Prints each parser's median ms per exposition and the ratio. The parse runs on the router's
event loop once per backend per ``health.interval_s``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

from prometheus_client.parser import text_string_to_metric_families

from router.scrape import parse_engine_metrics


def emulated_pod() -> str:
    from simulator.emulator.metrics import PodMetrics
    from simulator.engine.cost_model import load_cost_model
    from simulator.engine.model import EngineConfig, EngineModel

    engine = EngineModel(EngineConfig(block_size=16, num_gpu_blocks=4096),
                         load_cost_model("h200-llama-3.1-8b"))
    return PodMetrics(engine, "tiny").render().decode()


def vllm_sized(base: str) -> str:
    lines = [base.rstrip("\n")]
    labels = 'engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"'
    for family in range(12):
        name = f"vllm:histogram_{family}_seconds"
        lines += [f"# HELP {name} A latency histogram.", f"# TYPE {name} histogram"]
        for bucket in range(24):
            lines.append(f'{name}_bucket{{{labels},le="{0.001 * 2 ** bucket:g}"}} {bucket}.0')
        lines.append(f'{name}_bucket{{{labels},le="+Inf"}} 24.0')
        lines += [f"{name}_count{{{labels}}} 24.0", f"{name}_sum{{{labels}}} 12.5"]
    return "\n".join(lines) + "\n"


def reference(text: str) -> int:
    return sum(len(f.samples) for f in text_string_to_metric_families(text))


def median_ms(fn: Callable[[str], object], text: str, rounds: int) -> float:
    per_round = []
    for _ in range(rounds):
        n = 0
        start = time.perf_counter()
        while time.perf_counter() - start < 0.2:
            fn(text)
            n += 1
        per_round.append((time.perf_counter() - start) / n * 1e3)
    return statistics.median(per_round)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    pod = emulated_pod()
    for label, text in (("emulated pod", pod), ("vLLM-sized", vllm_sized(pod))):
        old = median_ms(reference, text, args.rounds)
        new = median_ms(parse_engine_metrics, text, args.rounds)
        print(f"{label:13s} {len(text.splitlines()):5d} lines   prometheus-client {old:7.3f} ms"
              f"   line scan {new:7.4f} ms   {old / new:6.1f}x")


if __name__ == "__main__":
    main()
