"""What it costs the router to know a fleet-shared KV store's residency (issue 18), per request.

    .venv/bin/python bench/tier_index.py        # a table; --json for machine output

Two ways a router can learn which blocks a shared store (LMCache on Redis/Valkey, a Mooncake
store) holds:
- **events** (what kvrouter does): the engine that writes a block announces it with
  ``locality`` REMOTE; the index applies it once (``policies.kv.shared``) and the per-request
  match walks it in the same pass as the backends' own blocks. Per request: the REMOTE events
  its prefill caused (one BlockStored of its new blocks) plus a match over its chain.
- **store queries**: ask the store per request which of the prompt's blocks it holds (one
  ``ZMSCORE`` round trip to a real redis-server on a Unix socket, the cheapest transport).

Each is measured for a 125-block prompt (2,000 tokens of 16-token blocks) with half of it in
the store, beside the same match without any shared block (the baseline, same run). Figures
are medians of repeated timings on this shared 2-core machine: compare within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from collections.abc import Callable

from policies.kv.events import REMOTE, BlockStored
from policies.kv.index import PrefixIndex

BLOCKS = 125
BACKENDS = 16


def _median_us(fn: Callable[[], object], repeat: int = 2000) -> float:
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1e6


def _fleet(rng: random.Random, shared: bool) -> tuple[PrefixIndex, list[tuple[int, ...]]]:
    index = PrefixIndex()
    prompts = []
    for _ in range(200):
        chain = tuple(rng.getrandbits(63) for _ in range(BLOCKS))
        prompts.append(chain)
        owner = f"b{rng.randrange(BACKENDS)}"
        index.apply(owner, BlockStored(chain[: BLOCKS // 4], None, (), 16), 0.0)
        if shared:
            index.apply(owner, BlockStored(chain[: BLOCKS // 2], None, (), 0, medium="STORAGE",
                                           locality=REMOTE), 0.0)
    return index, prompts


async def _store_query_us(repeat: int) -> float | None:
    from simulator.emulator.store import RedisBlockStore, RedisServer

    try:
        server = RedisServer()
    except ValueError:
        return None
    url = await server.start()
    store = RedisBlockStore(url, capacity_blocks=1_000_000, name="bench")
    await store.start()
    try:
        keys = list(range(1, BLOCKS + 1))
        await store.write(keys[: BLOCKS // 2])
        samples = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            await store.lookup(keys)
            samples.append(time.perf_counter() - t0)
        return statistics.median(samples) * 1e6
    finally:
        await store.close()
        await server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rng = random.Random(0)
    plain, prompts = _fleet(rng, shared=False)
    tiered, _ = _fleet(random.Random(0), shared=True)
    chain = prompts[17]
    event = BlockStored(tuple(rng.getrandbits(63) for _ in range(BLOCKS // 2)), None, (), 0,
                        medium="STORAGE", locality=REMOTE)
    figures = {
        "match_no_shared_us": _median_us(lambda: plain.match(chain, 0.0)),
        "match_with_shared_us": _median_us(lambda: tiered.match(chain, 0.0)),
        "shared_prefix_us": _median_us(lambda: tiered.shared_prefix(chain)),
        "apply_remote_event_us": _median_us(lambda: tiered.apply("b3", event, 0.0)),
        "store_query_us": asyncio.run(_store_query_us(2000)),
    }
    if args.json:
        print(json.dumps(figures))
        return
    print(f"prompt of {BLOCKS} blocks, {BACKENDS} backends, half of the prompt in the store")
    for name, value in figures.items():
        print(f"  {name:24} " + ("n/a (no redis-server)" if value is None else f"{value:8.1f}"))


if __name__ == "__main__":
    main()
