"""Warm-start snapshot cost: size and time to take, encode, decode and restore a prefix-index
snapshot (``policies.kv.snapshot``, ``router.kv.snapshot``) of N blocks spread over backends.

    PYTHONPATH=$PWD .venv/bin/python bench/snapshot.py --blocks 100000,1000000 --backends 4

The cut (dict copies, ``policies.kv.snapshot.cut``) runs on the serving replica's event loop
in one go (that keeps it consistent): it is how long a snapshot request stalls that replica's
routing. Building the image and encoding it run in a worker thread; decoding and restoring
run on the new replica before it is ready. Each block is held by one backend, as with kv_aware's placement; engine
hashes are random 64-bit numbers, as vLLM's are. Median of ``--rounds``.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from policies.kv import snapshot as image
from policies.kv.events import BlockStored
from policies.kv.index import PrefixIndex
from router.kv.snapshot import Snapshot, StreamPosition, decode, encode

BLOCKS_PER_EVENT = 32


def build(n_blocks: int, n_backends: int, rng: random.Random) -> PrefixIndex:
    index = PrefixIndex(max_entries=max(2_000_000, n_blocks))
    for start in range(0, n_blocks, BLOCKS_PER_EVENT):
        backend = f"http://10.0.0.{start // BLOCKS_PER_EVENT % n_backends}:8000"
        n = min(BLOCKS_PER_EVENT, n_blocks - start)
        # Engine hashes as router hashes (no token ids): the simulator's engines' form, which
        # skips rehashing here; the image is the same either way.
        hashes = tuple(rng.getrandbits(64) for _ in range(n))
        index.apply(backend, BlockStored(hashes, None, (), 16), 0.0)
    return index


def measure(n_blocks: int, n_backends: int, rounds: int) -> dict[str, float]:
    index = build(n_blocks, n_backends, random.Random(n_blocks))
    positions = tuple(StreamPosition(b, f"kv@{i}", 0, 1000, 1.0)
                      for i, b in enumerate(index.backend_ids()))
    times: dict[str, list[float]] = {"cut": [], "build+encode": [], "decode": [],
                                     "restore": []}
    size = 0
    for _ in range(rounds):
        t0 = time.perf_counter()
        taken = image.cut(index)
        t1 = time.perf_counter()
        data = encode(Snapshot("bench", time.time(), image.image_of(taken), positions))
        t2 = time.perf_counter()
        back = decode(data)
        t3 = time.perf_counter()
        image.restore(PrefixIndex(max_entries=index.max_entries), back.image)
        t4 = time.perf_counter()
        size = len(data)
        for name, seconds in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            times[name].append(seconds)
    out = {name: statistics.median(v) for name, v in times.items()}
    out["bytes"] = size
    out["entries"] = index.entries
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", default="100000,1000000")
    parser.add_argument("--backends", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print("| blocks | backends | bytes | bytes/entry | cut, on the loop (s) | build + encode, "
          "thread (s) | decode (s) | restore (s) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in (int(x) for x in args.blocks.split(",")):
        r = measure(n, args.backends, args.rounds)
        print(f"| {n:,} | {args.backends} | {r['bytes']:,.0f} | {r['bytes'] / r['entries']:.1f} "
              f"| {r['cut']:.3f} | {r['build+encode']:.3f} | {r['decode']:.3f} "
              f"| {r['restore']:.3f} |")


if __name__ == "__main__":
    main()
