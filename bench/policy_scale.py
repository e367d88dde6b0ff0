"""kv_aware's own cost per request as the fleet grows: choose + on_dispatched + on_finished in
one process, no HTTP, for 2 to 64 candidate backends.

    .venv/bin/python bench/policy_scale.py            # --backends 2,8,32,64 --requests 2000
    .venv/bin/python bench/policy_scale.py --backends 2 --prefixes 1 --blocks 31  # one hot prompt
    make native; .venv/bin/python bench/policy_scale.py; KVROUTER_NATIVE=0 .venv/bin/python \
        bench/policy_scale.py                         # compiled against the Python sources

Each request carries an 83-block prompt (1,334 tokens at block size 16; ``--blocks``) of one
of 200 shared prefixes (``--prefixes``; 1: the same prompt every time); the backends report
engine numbers (KV usage, waiting and running requests), as scraped vLLM pods do; 16
requests are in flight at a time. The median of 5 runs per size is printed with the
per-backend slope against the smallest size, so a change can be compared within one run of
this script (the machine is shared: compare ratios, not absolute times).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from kvrouter import native

# Compiled (`make native`) unless KVROUTER_NATIVE=0: run both for an A/B.
NATIVE = native.enable_from_env()[0]

from policies.kv_aware import create  # noqa: E402  (after the native build is enabled)
from policies.types import BackendState, ClusterView, RouteRequest  # noqa: E402


def per_request_us(backends: int, requests: int, prefixes: list[tuple[int, ...]]) -> float:
    policy = create({}, random.Random(0))
    states = tuple(
        BackendState(f"http://pod-{i}", kv_usage_ratio=0.5, total_kv_blocks=10_000,
                     engine_waiting_requests=1, engine_running_requests=4)
        for i in range(backends))
    blocks = len(prefixes[0])
    batch = [RouteRequest(request_id=f"r{i}", model="m", prompt_tokens=blocks * 16 + 6,
                          block_hashes=prefixes[i % len(prefixes)], max_tokens=16,
                          tokens_exact=True) for i in range(requests)]
    decisions = []
    start = time.perf_counter()
    for i, request in enumerate(batch):
        now_s = i * 0.001
        decision = policy.choose(request, ClusterView(now_s, states))
        policy.on_dispatched(request, decision, now_s)
        decisions.append(decision)
        if i >= 16:
            policy.on_finished(batch[i - 16], decisions[i - 16], now_s, True)
    return (time.perf_counter() - start) / requests * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="2,8,32,64")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--prefixes", type=int, default=200)
    parser.add_argument("--blocks", type=int, default=83)
    args = parser.parse_args()
    if args.prefixes < 1 or args.blocks < 1:
        parser.error("--prefixes and --blocks must be >= 1")
    rng = random.Random(1)
    prefixes = [tuple(rng.getrandbits(63) for _ in range(args.blocks))
                for _ in range(args.prefixes)]
    sizes = [int(n) for n in args.backends.split(",")]
    medians = {n: statistics.median(per_request_us(n, args.requests, prefixes)
                                    for _ in range(args.runs)) for n in sizes}
    base = sizes[0]
    print(f"kv_aware {'compiled (make native)' if NATIVE else 'from its Python sources'}")
    print(f"| backends | us per request (median of {args.runs}) | us per extra backend |")
    print("|---:|---:|---:|")
    for n in sizes:
        slope = f"{(medians[n] - medians[base]) / (n - base):.1f}" if n != base else "-"
        print(f"| {n} | {medians[n]:.1f} | {slope} |")


if __name__ == "__main__":
    main()
