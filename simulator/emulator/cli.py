"""``kvrouter emulate``: start N emulated vLLM (or SGLang) pods on 127.0.0.1 until interrupted.

Top-level imports stay light (argparse only): the emulator is imported in ``run``. Must not import
``router``.

Example: ``kvrouter emulate --count 4 --port 8100 --time-scale 10`` serves pods on ports
8100-8103, KV events on ephemeral bound ports (see each pod's ``/kv_event_sources``), and prints
one line per pod. ``--enable-scale-out`` adds vLLM's render endpoints (vllm-router's
cache_aware needs them); ``--slow-pod 0=4`` makes pod 0's engine 4x slower than the others.
"""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["HELP", "add_arguments", "run"]

HELP = "Run N emulated vLLM/SGLang pods (engine model + HTTP API + ZMQ KV events) on 127.0.0.1."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--count", type=int, default=2, help="number of pods (default %(default)s)")
    parser.add_argument(
        "--port", type=int, default=8100, help="first HTTP port; pod i uses port+i (0: ephemeral; default %(default)s)"
    )
    parser.add_argument(
        "--time-scale",
        type=float,
        default=1.0,
        help="virtual engine seconds per wall second (10 runs the engines 10x faster; "
        "default %(default)s)",
    )
    parser.add_argument(
        "--engine",
        choices=["vllm", "sglang"],
        default="vllm",
        help="which server to emulate: its metric names, endpoints and KV event topics "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--role",
        choices=["mixed", "prefill", "decode"],
        default="mixed",
        help="prefill/decode disaggregation role of every pod: prefill pods answer with KV "
        "transfer parameters (vLLM) or fill bootstrap rooms (SGLang, bootstrap server on the "
        "pod's own HTTP port); decode pods pull that KV (docs/disaggregation.md) (default %(default)s)",
    )
    parser.add_argument(
        "--kv-network-gbps",
        type=float,
        default=200.0,
        help="network bandwidth a decode pod pulls KV with, Gbit/s (default %(default)s)",
    )
    parser.add_argument("--model", default="tiny-llama", help="served model name, as /v1/models lists it (default %(default)s)")
    parser.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default %(default)s)")
    parser.add_argument(
        "--num-gpu-blocks",
        type=int,
        default=4096,
        help="KV blocks per pod (0: what the profile's KV memory holds; default %(default)s)",
    )
    parser.add_argument(
        "--max-model-len",
        type=int,
        default=8192,
        help="longest prompt + output in tokens; longer requests get vLLM's 400 "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=8192,
        help="tokens one engine step may process (chunked prefill budget; default %(default)s)",
    )
    parser.add_argument(
        "--max-num-seqs",
        type=int,
        default=256,
        help="requests running at once per pod; more wait in the queue (default %(default)s)",
    )
    parser.add_argument(
        "--profile",
        default="h200-llama-3.1-8b",
        help="cost profile name in simulator/data or a JSON path (default %(default)s)",
    )
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer directory (default: the shipped tiny tokenizer; byte fallback if unloadable)",
    )
    parser.add_argument(
        "--kv-events-endpoint",
        default="tcp://*:0",
        help="ZMQ PUB endpoint; binds for * / :: / ipc:// / inproc:// (port+i per pod, 0 "
        "ephemeral), otherwise every pod connects to it; 'none' disables events "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--enable-scale-out",
        action="store_true",
        help="serve vLLM's render endpoints POST /v1/completions/render and "
        "/v1/chat/completions/render (vLLM >= 0.30 serves them only with this flag; "
        "vllm-router's cache_aware needs them)",
    )
    parser.add_argument(
        "--slow-pod",
        action="append",
        default=[],
        metavar="INDEX=FACTOR",
        help="make pod INDEX's engine FACTOR times slower than the others (every scheduler "
        "step lasts FACTOR times longer), e.g. --slow-pod 0=4 for one pod 4x slower "
        "(repeatable)",
    )
    parser.add_argument(
        "--cpu-offload-tokens",
        type=int,
        default=0,
        help="per pod: vLLM native CPU offloading of this many tokens; its blocks are "
        "announced with medium CPU (default 0 = off)",
    )
    parser.add_argument(
        "--shared-store-tokens",
        type=int,
        default=0,
        help="one KV store of this many tokens shared by every pod, in a Redis/Valkey server "
        "(LMCache-style); its blocks are announced with locality REMOTE (default 0 = off)",
    )
    parser.add_argument(
        "--shared-store-url",
        default=None,
        help="the store's server, redis://host:port or unix:///path (default: start a "
        "private redis-server)",
    )
    parser.add_argument(
        "--kv-replay-endpoint", default="tcp://*:0",
        help="replay ROUTER endpoint (port+i per pod; default %(default)s)"
    )
    parser.add_argument(
        "--kv-buffer-steps", type=_at_least_one, default=10_000,
        help="event batches each pod's replay socket keeps, as vLLM's kv-events-config "
        "buffer_steps; small values age prefixes out of replay (warm start; default "
        "%(default)s)"
    )


def _at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


async def _serve(args: argparse.Namespace) -> None:
    import asyncio
    import gc
    import signal

    from simulator.emulator.fleet import EmulatedCluster

    endpoint = None if str(args.kv_events_endpoint).lower() == "none" else args.kv_events_endpoint
    cluster = EmulatedCluster(
        count=args.count,
        port=args.port,
        engine=args.engine,
        model=args.model,
        block_size=args.block_size,
        num_gpu_blocks=args.num_gpu_blocks,
        max_model_len=args.max_model_len,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_num_seqs=args.max_num_seqs,
        time_scale=args.time_scale,
        profile=args.profile,
        tokenizer=args.tokenizer,
        kv_events_endpoint=endpoint,
        kv_replay_endpoint=args.kv_replay_endpoint,
        buffer_steps=args.kv_buffer_steps,
        role=args.role,
        kv_network_bytes_per_s=args.kv_network_gbps * 1e9 / 8,
        slow_pods=args.slow_pods,
        scale_out=args.enable_scale_out,
        cpu_offload_tokens=args.cpu_offload_tokens,
        shared_store_tokens=args.shared_store_tokens,
        shared_store_url=args.shared_store_url,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with cluster:
        # vLLM's API server freezes its start-up heap before it serves
        # (vllm.utils.gc_utils.freeze_gc_heap, 0.32): without that every full collection here
        # would scan the tokenizer's and transformers' objects, a pause real pods do not take.
        gc.collect()
        gc.freeze()
        for i, url in enumerate(cluster.urls):
            pod = cluster.pods[i]
            kv = ""
            if pod.publisher is not None:
                kv = (
                    f" kv_events={pod.publisher.endpoint} replay={pod.publisher.replay_endpoint}"
                    f" topic={pod.publisher.topic}"
                )
            slow = f" slowdown={cluster.slow_pods[i]:g}x" if i in cluster.slow_pods else ""
            tiers = (f" cpu_offload_tokens={args.cpu_offload_tokens}"
                     if args.cpu_offload_tokens else "")
            if cluster.stores:
                tiers += f" shared_store={cluster.shared_store_url}"
            print(f"pod {i}: {url} engine={args.engine} role={args.role} model={args.model}{kv}"
                  f"{slow}{tiers}", flush=True)
        print(f"{len(cluster.urls)} emulated pods ready; Ctrl-C stops them", flush=True)
        await stop.wait()


def run(args: argparse.Namespace) -> int:
    import sys

    if args.count < 1:
        print("kvrouter emulate: --count must be >= 1", file=sys.stderr)
        return 2
    if args.time_scale <= 0:
        print("kvrouter emulate: --time-scale must be > 0", file=sys.stderr)
        return 2
    try:
        from simulator.inputs import parse_slowdowns

        args.slow_pods = parse_slowdowns(args.slow_pod, args.count, "--slow-pod")
    except ValueError as exc:
        print(f"kvrouter emulate: {exc}", file=sys.stderr)
        return 2
    try:
        _run_loop(_serve(args))
    except (ValueError, OSError, RuntimeError) as exc:
        print(f"kvrouter emulate: {exc}", file=sys.stderr)
        return 1
    return 0


def _run_loop(main: Any) -> None:
    """vLLM's API server runs on uvloop (``uvloop.run`` in its ``api_server``), and four pods
    share one core here where real pods have their own: with asyncio's own loop the pods' event
    loop, not their modelled GPUs, set part of a burst's TTFT. asyncio when uvloop is absent."""
    import asyncio

    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)
