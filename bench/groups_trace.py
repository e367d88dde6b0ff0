"""Issue 12's live workload at block level, as a kvrouter JSONL trace for ``kvrouter simulate``.

Groups of an 87-block (1,392-token) shared prefix, each request followed by blocks of its own,
``--per-group`` requests per group, shuffled with ``--seed``, Poisson arrivals at ``--rate``,
32 output tokens, 16-token blocks: the shape of ``bench/quality.py``'s chat workload without
the tokenizer, so the simulator can replay its regimes in seconds (docs/simulation.md, "Cache
pressure and late events").

    .venv/bin/python bench/groups_trace.py --seed 1 --rate 110 --groups 144 > /tmp/sat.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
import sys

PREFIX_BLOCKS = 87
BLOCK_SIZE = 16


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=1, help="shuffle and arrivals (default %(default)s)")
    parser.add_argument("--rate", type=float, default=110.0, help="requests/s (default %(default)s)")
    parser.add_argument("--groups", type=int, default=144, help="shared prefixes (default %(default)s)")
    parser.add_argument("--per-group", type=int, default=5, help="requests per group (default %(default)s)")
    parser.add_argument("--own-blocks", type=int, default=4,
                        help="blocks of each request's own after the prefix (default %(default)s)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="times the whole set is sent (default %(default)s)")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    requests = [g for g in range(args.groups) for _ in range(args.per_group)] * args.repeat
    rng.shuffle(requests)
    arrival_s = 0.0
    own_key = 10**6  # above every prefix key
    for group in requests:
        arrival_s += rng.expovariate(args.rate)
        prefix = [group * 1000 + j for j in range(PREFIX_BLOCKS)]
        own = list(range(own_key, own_key + args.own_blocks))
        own_key += args.own_blocks
        json.dump({"arrival_s": round(arrival_s, 4), "output_tokens": 32, "hash_ids": prefix + own,
                   "input_tokens": (PREFIX_BLOCKS + args.own_blocks) * BLOCK_SIZE,
                   "block_size": BLOCK_SIZE}, sys.stdout)
        sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
