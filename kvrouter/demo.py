"""``kvrouter demo``: the same workload through an emulated cluster under several policies.

For each policy: start 4 emulated vLLM pods (``kvrouter emulate``, fresh caches) and the router
(``kvrouter serve``) as real processes, replay a realistic synthetic workload (tenants with long
system prompts, multi-turn chats, agent loops) open-loop through the router with streaming, read
each pod's own ``/metrics``, and stop both processes. Prints one table (requests, the pods'
prefix-cache hit rate, TTFT p50/p99, per-pod load) and writes an HTML report.

Tiers (issue 18): ``--cpu-offload-tokens N`` gives every pod vLLM's native CPU offloading and
``--shared-store-tokens N`` one KV store shared by the pods in a private ``redis-server``; the
table then adds the share of prompt tokens the pods loaded from each tier (their
``emulator:tier_hit_tokens`` counters). ``make demo`` runs one such scenario after the plain one.

Why processes and not one event loop: the emulator, the router and the client then use both
cores, as they would in production, and the router is started exactly as operators start it.
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from kvrouter.ports import free_ports

__all__ = ["HELP", "add_arguments", "run"]

HELP = "Compare routing policies on emulated vLLM pods with a realistic workload (no GPU)."

DEFAULT_POLICIES = "round_robin,session_affinity,kv_aware"
MODEL = "tiny-llama"
MAX_MODEL_LEN = 65536  # agent loops grow their context past 30k tokens


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--policies", default=DEFAULT_POLICIES,
                        help="comma-separated policies to compare (default %(default)s)")
    parser.add_argument("--pods", type=int, default=4, help="emulated pods (default %(default)s)")
    parser.add_argument("--requests", type=int, default=240,
                        help="requests per policy (default %(default)s)")
    parser.add_argument("--rate", type=float, default=16.0,
                        help="arrivals per second of the workload (default %(default)s)")
    parser.add_argument("--speedup", type=float, default=3.0,
                        help="run the workload and the pods this many times faster than real "
                             "time; latencies are reported in the pods' virtual seconds "
                             "(default %(default)s)")
    parser.add_argument("--kv-blocks", type=int, default=4000,
                        help="KV blocks of 16 tokens per pod; small so that caches evict "
                             "(default %(default)s)")
    parser.add_argument("--cpu-offload-tokens", type=int, default=0,
                        help="per pod: vLLM native CPU offloading of this many tokens "
                             "(default 0 = off)")
    parser.add_argument("--shared-store-tokens", type=int, default=0,
                        help="one KV store of this many tokens shared by the pods, in a private "
                             "redis-server (default 0 = off)")
    parser.add_argument("--seed", type=int, default=7, help="workload seed (default %(default)s)")
    parser.add_argument("--out", default="out/demo",
                        help="directory for results.json and report.html (default %(default)s)")


def _workload(args: argparse.Namespace) -> list[Any]:
    from simulator.workloads import WorkloadParams, synthetic

    # Prompts of 1-4k tokens and short answers keep the demo fast on 2 cores while the prefill
    # cost (H200 8B profile) still makes misses visible in TTFT.
    params = WorkloadParams(
        requests=args.requests, rate=args.rate, block_size=16, tenants=24, zipf=0.8,
        prompt_min_tokens=1000, prompt_max_tokens=4000, user_min_tokens=30,
        user_max_tokens=200, output_min_tokens=8, output_max_tokens=32, think_s=3.0,
        return_ratio=0.3, idle_s=6.0, documents=12, document_min_tokens=2000,
        document_max_tokens=4000,
    )
    return list(synthetic("mixed", params, args.seed))


def _wait_http(url: str, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        with contextlib.suppress(urllib.error.URLError, OSError):
            with urllib.request.urlopen(url, timeout=1.0) as resp:
                if resp.status == 200:
                    return
        time.sleep(0.1)
    raise RuntimeError(f"{url} not ready after {timeout_s:.0f} s")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _pod_metrics(urls: list[str]) -> list[dict[str, float]]:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    wanted = {"vllm:prefix_cache_queries": "queries", "vllm:prefix_cache_hits": "hits",
              "vllm:prompt_tokens": "prompt_tokens", "vllm:e2e_request_latency_seconds": "e2e",
              "emulator:tier_hit_tokens": "tier"}
    out = []
    for url in urls:
        with urllib.request.urlopen(f"{url}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        values: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            key = wanted.get(family.name)
            for sample in family.samples:
                if key == "e2e" and sample.name.endswith("_count"):
                    values["requests"] = values.get("requests", 0.0) + sample.value
                elif key == "tier" and sample.name.endswith("_total"):
                    name = f"{sample.labels.get('tier', '')}_hits"
                    values[name] = values.get(name, 0.0) + sample.value
                elif key and key != "e2e" and sample.name.endswith("_total"):
                    values[key] = values.get(key, 0.0) + sample.value
        out.append(values)
    return out


def _run_policy(policy: str, args: argparse.Namespace, workload: list[Any],
                workdir: Path) -> dict[str, Any]:
    import asyncio

    import yaml

    from simulator.replay import ReplayConfig, TokenBlocks, replay
    from simulator.tiny_tokenizer import default_path

    exe = [sys.executable, "-m", "kvrouter.cli"]
    pod_port = free_ports(args.pods)
    pod_urls = [f"http://127.0.0.1:{pod_port + i}" for i in range(args.pods)]
    logs = (workdir / f"{policy}-emulator.log").open("wb")
    pods = subprocess.Popen(
        [*exe, "emulate", "--count", str(args.pods), "--port", str(pod_port), "--model", MODEL,
         "--block-size", "16", "--num-gpu-blocks", str(args.kv_blocks),
         "--max-model-len", str(MAX_MODEL_LEN), "--time-scale", str(args.speedup),
         "--cpu-offload-tokens", str(args.cpu_offload_tokens),
         "--shared-store-tokens", str(args.shared_store_tokens)],
        stdout=logs, stderr=subprocess.STDOUT)
    router = None
    try:
        for url in pod_urls:
            _wait_http(f"{url}/health", pods, 60)
        router_port = free_ports(1)
        config = workdir / f"{policy}.yaml"
        config.write_text(yaml.safe_dump({
            "server": {"host": "127.0.0.1", "port": router_port, "log_level": "warning"},
            "health": {"interval_s": 1.0},
            "policy": {"name": policy, "seed": args.seed},
            "models": {MODEL: {"tokenizer": str(default_path()), "block_size": 16}},
            "backends": [{"url": u} for u in pod_urls],
        }))
        router_log = (workdir / f"{policy}-router.log").open("wb")
        router = subprocess.Popen([*exe, "serve", "--config", str(config)],
                                  stdout=router_log, stderr=subprocess.STDOUT)
        _wait_http(f"http://127.0.0.1:{router_port}/ready", router, 60)
        time.sleep(1.5)  # one scrape and event-source discovery round before traffic

        drawn = [-1]

        def progress(done: int, sent: int) -> None:
            width = 30
            filled = int(width * done / len(workload))
            if filled == drawn[0] and done != len(workload):
                return
            drawn[0] = filled
            sys.stderr.write(f"\r  {policy:<18} [{'#' * filled}{'.' * (width - filled)}] "
                             f"{done}/{len(workload)}")
            sys.stderr.flush()

        summary = asyncio.run(replay(
            workload,
            ReplayConfig(target=f"http://127.0.0.1:{router_port}", model=MODEL, slo_ttft_s=1.0,
                         speedup=args.speedup, latency_scale=args.speedup,
                         # The oracle pools the pods' memory: the same total size, in blocks
                         # of the same 16 tokens (it was unbounded).
                         cache_blocks=args.kv_blocks * args.pods),
            TokenBlocks(vocab_size=2048, first_id=5, seed=args.seed),
            label=policy, progress=progress))
        sys.stderr.write("\n")
        pods_seen = _pod_metrics(pod_urls)
    finally:
        if router is not None:
            _stop(router)
        _stop(pods)
    queries = sum(p.get("queries", 0.0) for p in pods_seen)
    hits = sum(p.get("hits", 0.0) for p in pods_seen)
    summary["policy"] = policy
    summary["backends"] = args.pods
    summary["pod_hit_rate"] = hits / queries if queries else 0.0
    for tier, on in (("cpu", args.cpu_offload_tokens), ("shared", args.shared_store_tokens)):
        if on:  # loaded instead of recomputed, as a share of the prompt tokens the pods saw
            loaded = sum(p.get(f"{tier}_hits", 0.0) for p in pods_seen)
            summary[f"{tier}_hit_rate"] = loaded / queries if queries else 0.0
    summary["pod_requests"] = [int(p.get("requests", 0)) for p in pods_seen]
    summary["pod_prompt_tokens"] = [int(p.get("prompt_tokens", 0)) for p in pods_seen]
    return summary


def _table(results: list[dict[str, Any]]) -> str:
    head = (f"{'policy':<18} {'requests':>8} {'failed':>6} {'pod hit rate':>12} "
            f"{'oracle':>7} {'TTFT p50':>9} {'TTFT p99':>9}  requests per pod")
    tiers = [t for t in ("cpu", "shared") if any(f"{t}_hit_rate" in r for r in results)]
    head += "".join(f"  {t + ' loaded':>13}" for t in tiers)
    lines = [head, "-" * len(head)]
    for r in results:
        oracle = r.get("oracle_hit_rate")
        lines.append(
            f"{r['policy']:<18} {r['requests']:>8} {r['failed']:>6} {r['pod_hit_rate']:>12.1%} "
            f"{(oracle or 0.0):>7.1%} {r['ttft_p50_s'] * 1000:>7.0f}ms "
            f"{r['ttft_p99_s'] * 1000:>7.0f}ms  {'/'.join(map(str, r['pod_requests']))}"
            + "".join(f"  {r.get(f'{t}_hit_rate', 0.0):>13.1%}" for t in tiers))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from simulator.report import write_report

    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    if not policies or args.pods < 1 or args.requests < 1 or args.rate <= 0:
        print("kvrouter demo: need at least one policy, one pod, one request and a rate > 0",
              file=sys.stderr)
        return 2
    if args.cpu_offload_tokens < 0 or args.shared_store_tokens < 0:
        print("kvrouter demo: --cpu-offload-tokens and --shared-store-tokens must be >= 0",
              file=sys.stderr)
        return 2
    if args.shared_store_tokens:
        import shutil

        if shutil.which("redis-server") is None and shutil.which("valkey-server") is None:
            # `make demo` must run on a machine without it: say so and go on without the store.
            print("kvrouter demo: no redis-server or valkey-server on PATH (apt-get install "
                  "redis-server): running without the shared store", file=sys.stderr)
            args.shared_store_tokens = 0
    workload = _workload(args)
    span_s = workload[-1].arrival_s if workload else 0.0
    print(f"kvrouter demo: {len(workload)} requests over {span_s:.0f} s (tenants' system prompts, "
          f"multi-turn chats, agents, document QA) through {args.pods} emulated vLLM pods, "
          f"per policy: {', '.join(policies)}", flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="kvrouter-demo-") as tmp:
        for policy in policies:
            try:
                results.append(_run_policy(policy, args, workload, Path(tmp)))
            except (RuntimeError, OSError) as exc:
                print(f"\nkvrouter demo: {policy}: {exc}", file=sys.stderr)
                for log in sorted(Path(tmp).glob(f"{policy}-*.log")):
                    sys.stderr.write(f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}")
                return 1
    print()
    print(_table(results))
    print("\nhit rate = prefix-cache hits / queries summed from the pods' own "
          "vllm:prefix_cache_* counters; oracle = one pooled cache of the same total size")
    if args.cpu_offload_tokens or args.shared_store_tokens:
        print("loaded = prompt tokens the pods loaded from their CPU tier / the shared store "
              "instead of recomputing, per prompt token (emulator:tier_hit_tokens)")
    report = write_report(Path(args.out), results, "kvrouter demo: policies on emulated vLLM pods",
                          meta={"pods": args.pods, "requests": args.requests, "rate": args.rate,
                                "kv_blocks_per_pod": args.kv_blocks, "seed": args.seed,
                                "cpu_offload_tokens": args.cpu_offload_tokens,
                                "shared_store_tokens": args.shared_store_tokens})
    print(f"report: {report.resolve()}")
    return 0
