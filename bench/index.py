"""Prefix-index benchmark: KV-event ingestion rate, memory per (block, backend) entry, and the
hash + match cost of an 8,000-token prompt, for ``policies.kv.hashing`` and ``policies.kv.index``.

    .venv/bin/python bench/index.py            # prints a table; --json for machine output

Targets (issue 4): ingestion >= 100,000 blocks/s, <= 300 bytes per (block, backend) entry.
Figures are from this process on a shared 2-core machine: compare only within one run (each
timing also prints a plain-dict baseline measured in the same run).
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import time
import tracemalloc
from collections.abc import Callable

from policies.kv.events import BlockRemoved, BlockStored
from policies.kv.hashing import BlockHasher, Namespace
from policies.kv.index import PrefixIndex
from policies.placement import PlacementMemory

BLOCK = 16
NS = Namespace("bench-model")
HASHER = BlockHasher(NS, BLOCK)


def make_events(
    rng: random.Random, n_seqs: int, blocks_per_seq: int, with_tokens: bool
) -> list[BlockStored]:
    """Sequences as vLLM reports them: a first event from the start, then an extension event
    chained to its parent (engine hashes are random 64-bit numbers, as vLLM's are)."""
    events = []
    half = blocks_per_seq // 2
    for _ in range(n_seqs):
        tokens = [rng.randrange(128_000) for _ in range(blocks_per_seq * BLOCK)]
        engine = [rng.getrandbits(64) for _ in range(blocks_per_seq)]
        if not with_tokens:
            engine = list(HASHER.hash_tokens(tokens))
        for lo, hi in ((0, half), (half, blocks_per_seq)):
            events.append(BlockStored(
                block_hashes=tuple(engine[lo:hi]),
                parent_block_hash=engine[lo - 1] if lo else None,
                token_ids=tuple(tokens[lo * BLOCK : hi * BLOCK]) if with_tokens else (),
                block_size=BLOCK,
            ))
    return events


def ingestion(with_tokens: bool, n_seqs: int, backends: int) -> dict[str, float]:
    rng = random.Random(1)
    events = make_events(rng, n_seqs, 32, with_tokens)
    index = PrefixIndex(max_entries=10**8)
    names = [f"http://10.0.0.{i}:8000" for i in range(backends)]
    for name in names:
        index.set_backend_model(name, NS.model)
    blocks = sum(len(e.block_hashes) for e in events) * backends
    start = time.perf_counter()
    for name in names:
        for event in events:
            index.apply(name, event, 0.0)
    stored_s = time.perf_counter() - start
    removals = [BlockRemoved((h,)) for e in events for h in e.block_hashes]  # vLLM: one per block
    start = time.perf_counter()
    for name in names:
        for event in removals:
            index.apply(name, event, 0.0)
    removed_s = time.perf_counter() - start
    assert index.entries == 0
    baseline: dict[int, int] = {}
    start = time.perf_counter()
    for name in names:
        for event in events:
            for h in event.block_hashes:
                baseline[h] = baseline.get(h, 0) | len(name)
    baseline_s = time.perf_counter() - start
    return {
        "stored_blocks_per_s": blocks / stored_s,
        "removed_blocks_per_s": blocks / removed_s,
        "plain_dict_blocks_per_s": blocks / baseline_s,
    }


def memory(n_blocks: int, holders: int, with_tokens: bool) -> dict[str, float]:
    rng = random.Random(2)
    events = make_events(rng, n_blocks // 32, 32, with_tokens)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    index = PrefixIndex(max_entries=10**8)
    for b in range(holders):
        index.set_backend_model(f"b{b}", NS.model)
        for event in events:
            index.apply(f"b{b}", event, 0.0)
    gc.collect()
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    return {
        "entries": index.entries,
        "bytes_per_entry": used / index.entries,
        "estimated_bytes_per_entry": index.estimated_bytes() / index.entries,
    }


def p50_ms(fn: Callable[[], object], repeat: int) -> float:
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e3


def hash_and_match(repeat: int) -> dict[str, float]:
    rng = random.Random(3)
    tokens = [rng.randrange(128_000) for _ in range(8000)]
    index = PrefixIndex()
    for b in range(16):  # 16 backends, each holding some other prompts
        other = [rng.randrange(128_000) for _ in range(8000)]
        index.apply(f"b{b}", BlockStored(HASHER.hash_tokens(other), None, (), BLOCK), 0.0)
    full = HASHER.hash_tokens(tokens)
    index.apply("b3", BlockStored(full[:437], None, (), BLOCK), 0.0)  # 7,000 tokens cached
    seen = HASHER.hash_tokens(tokens[:7000])
    assert index.match(full)["b3"].matched_blocks == 437

    def cold() -> object:
        return index.match(HASHER.hash_tokens(tokens))

    def warm() -> object:  # the first 7,000 tokens were hashed for an earlier turn
        return index.match(seen + HASHER.extend(seen[-1], tokens[len(seen) * BLOCK :]))

    return {
        "hash_8k_ms": p50_ms(lambda: HASHER.hash_tokens(tokens), repeat),
        "match_500_blocks_ms": p50_ms(lambda: index.match(full), repeat),
        "hash_match_8k_cold_ms": p50_ms(cold, repeat),
        "hash_match_8k_warm_ms": p50_ms(warm, repeat),
        "plain_dict_500_lookups_ms": p50_ms(lambda: [index._nodes.get(h) for h in full], repeat),
    }


def dispatch_records(dispatches: int, ttl_s: float) -> dict[str, float]:
    """Approximate mode's dispatch records under churn: unique 31-block prompts (a
    2,000-character prompt at block size 16) alternating over 2 backends, 1 ms apart, each
    backend bounded at kv_aware's default 65,536 recorded blocks. With ``ttl_s`` 120 the
    capacity bound drops the oldest records; with 0.5 (kv_aware's recent-dispatch records in
    precise mode) expiry does. Either way the oldest leave first, so what a record costs must
    not grow with the records dropped before it: the early and late medians should match.
    Last, one full collection of the cyclic collector with the records in memory."""
    rng = random.Random(5)
    index = PrefixIndex()
    chains = [tuple(rng.getrandbits(63) for _ in range(31)) for _ in range(dispatches)]
    samples = []
    for i, chain in enumerate(chains):
        start = time.perf_counter()
        index.record_dispatch(f"b{i % 2}", chain, i * 0.001, ttl_s, capacity_blocks=65_536)
        samples.append(time.perf_counter() - start)
    gc.collect()
    start = time.perf_counter()
    gc.collect()
    collect_ms = (time.perf_counter() - start) * 1e3
    tenth = dispatches // 10
    baseline: dict[int, float] = {}
    base_samples = []
    for chain in chains[:tenth]:  # same-run baseline: one plain dict move per block
        start = time.perf_counter()
        for h in reversed(chain):
            baseline.pop(h, None)
            baseline[h] = 1.0
        base_samples.append(time.perf_counter() - start)
    return {
        "first_tenth_p50_us": statistics.median(samples[:tenth]) * 1e6,
        "last_half_p50_us": statistics.median(samples[dispatches // 2:]) * 1e6,
        "last_half_mean_us": statistics.mean(samples[dispatches // 2:]) * 1e6,
        "last_half_max_ms": max(samples[dispatches // 2:]) * 1e3,
        "full_collection_ms": collect_ms,  # the collector walking what the index keeps
        "plain_dict_31_moves_p50_us": statistics.median(base_samples) * 1e6,
    }


def placement_memory(budget: int, dispatches: int) -> dict[str, float]:
    """kv_aware's placement memory at its budget: unique 83-block prompts (the 2,000-character
    prompt of bench/overhead.py) over 4 backends. What a record costs once the budget drops
    the oldest blocks, and what the memory adds to a full collection of the cyclic collector
    (which stops the event loop while it runs), against one with the memory empty."""
    rng = random.Random(6)
    memory = PlacementMemory(budget)
    gc.collect()
    start = time.perf_counter()
    gc.collect()
    empty_ms = (time.perf_counter() - start) * 1e3
    while len(memory) < budget - 100:  # fill it
        memory.record(f"b{rng.randrange(4)}", [rng.getrandbits(63) for _ in range(83)])
    chains = [[rng.getrandbits(63) for _ in range(83)] for _ in range(dispatches)]
    samples = []
    for i, chain in enumerate(chains):
        t = time.perf_counter()
        memory.record(f"b{i % 4}", chain)
        samples.append(time.perf_counter() - t)
    del chains
    gc.collect()
    start = time.perf_counter()
    gc.collect()
    full_ms = (time.perf_counter() - start) * 1e3
    return {
        "record_83_blocks_p50_us": statistics.median(samples) * 1e6,
        "record_83_blocks_mean_us": statistics.mean(samples) * 1e6,
        "record_83_blocks_max_ms": max(samples) * 1e3,
        "full_collection_ms": full_ms,
        "full_collection_empty_ms": empty_ms,
        "blocks": float(len(memory)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", type=int, default=3000, help="sequences of 32 blocks")
    parser.add_argument("--memory-blocks", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=300)
    parser.add_argument("--dispatches", type=int, default=40_000,
                        help="dispatch records per churn figure")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = {
        "ingest_token_ids_4_backends": ingestion(True, args.seqs, 4),
        "ingest_engine_hashes_4_backends": ingestion(False, args.seqs, 4),
        "memory_token_ids_1_holder": memory(args.memory_blocks, 1, True),
        "memory_token_ids_4_holders": memory(args.memory_blocks // 4, 4, True),
        "memory_engine_hashes_1_holder": memory(args.memory_blocks, 1, False),
        "hash_match": hash_and_match(args.repeat),
        "dispatch_records_capacity_bound": dispatch_records(args.dispatches, 120.0),
        "dispatch_records_expiring_0_5_s": dispatch_records(args.dispatches, 0.5),
        "placement_memory_1m_blocks": placement_memory(1_000_000, args.dispatches // 4),
    }
    if args.json:
        print(json.dumps(results, indent=2))
        return
    for section, figures in results.items():
        print(section)
        for key, value in figures.items():
            print(f"  {key:32s} {value:14,.3f}")


if __name__ == "__main__":
    main()
