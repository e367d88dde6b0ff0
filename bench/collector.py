"""What the router's long-lived state adds to a full collection of Python's cyclic collector.

    .venv/bin/python bench/collector.py            # prints a table; --json for machine output

A full (generation 2) collection stops the event loop while it walks every tracked object
that is not frozen (the router freezes its start-up heap: ``router.cli.freeze_startup_heap``).
What the router keeps while serving must therefore not be walked entry by entry: a plain
dict of ints, floats or strings is untracked, and so is a tuple of ints once the collector
has seen it, while a list or an ``OrderedDict`` is walked in every full collection. Each row
fills one structure to its default budget with never-repeating prompts (the worst case), then
times one full collection, against one of the same process with nothing in it (the baseline
row). Compare rows within a run: this machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from policies.kv.index import PrefixIndex
from policies.placement import PlacementMemory

ROOT = Path(__file__).resolve().parent.parent
PROMPT = ("The quick brown fox jumps over the lazy dog; " * 60)[:2000]  # bench/overhead.py's
_TOKENIZER: Any = None


def full_collection_ms(repeat: int = 5) -> float:
    gc.collect()
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        gc.collect()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def placement(rng: random.Random) -> object:
    """kv_aware's placement memory at its default budget (10^6 blocks), 83-block prompts."""
    memory = PlacementMemory(1_000_000)
    while len(memory) < 1_000_000 - 100:
        memory.record(f"b{rng.randrange(4)}", [rng.getrandbits(63) for _ in range(83)])
    return memory


def records(rng: random.Random) -> object:
    """Approximate-mode dispatch records at kv_aware's default bound (65,536 blocks per
    backend) on 16 backends."""
    index = PrefixIndex()
    for i in range(16 * 65_536 // 83 + 16 * 60):
        chain = tuple(rng.getrandbits(63) for _ in range(83))
        index.record_dispatch(f"b{i % 16}", chain, i * 0.001, 120.0, capacity_blocks=65_536)
    return index


def tokenizer(rng: random.Random) -> object:
    """The tokenizer's prefix cache (10^6 tokens) and piece cache (250,000 tokens), filled by
    never-repeating 2,000-character prompts (a unique number every ~200 characters). The
    tokenizer itself is loaded before the freeze, as the router loads it at start-up."""
    tok = _TOKENIZER
    for i in range(3000):
        parts = [PROMPT[j : j + 200] + f" {rng.randrange(10**9)}" for j in range(0, 2000, 200)]
        tok.tokenize_body({"prompt": f"{i} " + "".join(parts)}, chat=False)
    return tok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows: dict[str, float] = {}
    builders: dict[str, Callable[[random.Random], object]] = {
        "placement memory, 10^6 blocks": placement,
        "approximate records, 16 x 65,536 blocks": records,
        "tokenizer caches, 10^6 + 250,000 tokens": tokenizer,
    }
    global _TOKENIZER
    from router.prompt.tokenize import ModelTokenizer, load_tokenizer

    _TOKENIZER = ModelTokenizer(load_tokenizer(ROOT / "simulator" / "data" / "tiny-tokenizer"))
    _TOKENIZER.warm()
    gc.collect()
    gc.freeze()  # as the router does after start-up: imports are not what is measured
    rows["baseline: nothing kept"] = full_collection_ms()
    for name, build in builders.items():
        kept = build(random.Random(7))
        rows[name] = full_collection_ms()
        del kept
        gc.collect()
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'kept while serving':44s} {'full collection (ms, median of 5)':>36s}")
    for name, ms in rows.items():
        print(f"{name:44s} {ms:36.1f}")


if __name__ == "__main__":
    main()
