"""Tokenize + hash + match for an 8,000-token chat prompt, cold and with its first 7,000 tokens
seen on an earlier turn (the tiny tokenizer, block size 16, an index of 4 backends).

    .venv/bin/python bench/prompt_path.py [--iterations 60]

Prints p50/p90 per path, next to same-run baselines: the tokenizer library's own encode of
the same text (what any exact router pays at least) and the chat template render alone.
Targets (issue 4): <= 5 ms p50 cold, <= 1 ms p50 warm.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from collections.abc import Callable

from policies.events import BlockStored
from policies.hashing import BlockHasher, Namespace
from policies.index import PrefixIndex
from router.analyzer import Endpoint, RequestFields
from router.kv_metrics import KvMetrics
from router.prompt_analyzer import ModelShape, TokenizingAnalyzer, _tokenize_and_hash
from router.tokenize import ModelTokenizer, load_tokenizer
from simulator.tiny_tokenizer import _WORDS, default_path

MODEL = "tiny"
BS = 16


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(n))


def conversation(rng: random.Random, tok: ModelTokenizer, target_tokens: int) -> list[dict]:
    """A system prompt and turns until the rendered prompt reaches ``target_tokens``."""
    messages = [{"role": "system", "content": words(rng, 1500)}]
    while True:
        messages.append({"role": "user", "content": words(rng, 300)})
        n = len(tok.tokenize_body({"messages": messages}, chat=True).token_ids)
        if n >= target_tokens:
            messages.pop()
            return messages
        messages.append({"role": "assistant", "content": words(rng, 200)})


def extend_to(rng: random.Random, tok: ModelTokenizer, history: list[dict],
              target_tokens: int) -> list[dict]:
    """``history`` plus one user turn sized so the whole prompt is ~``target_tokens``."""
    lo, hi = 1, 4000
    while lo < hi:
        mid = (lo + hi) // 2
        msgs = [*history, {"role": "user", "content": words(random.Random(mid), mid)}]
        n = len(tok.tokenize_body({"messages": msgs}, chat=True).token_ids)
        lo, hi = (mid + 1, hi) if n < target_tokens else (lo, mid)
    return [*history, {"role": "user", "content": words(rng, lo)}]


def timed(fn: Callable[[], object], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1e3)
    return out


def report(name: str, ms: list[float]) -> None:
    ms = sorted(ms)
    p90 = ms[min(len(ms) - 1, int(len(ms) * 0.9))]
    print(f"{name:<58} p50 {statistics.median(ms):7.2f} ms   p90 {p90:7.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=60)
    args = parser.parse_args()
    n = args.iterations
    hf = load_tokenizer(default_path())
    tok = ModelTokenizer(hf)
    sizer = ModelTokenizer(hf)  # sizes prompts with its own cache, leaving ``tok``'s cold
    hasher = BlockHasher(Namespace(MODEL), BS)
    key = repr(Namespace(MODEL))
    rng = random.Random(0)

    # The index holds each cold prompt on one of 4 backends, so match walks the whole chain.
    index = PrefixIndex()
    backends = [f"b{i}" for i in range(4)]
    for b in backends:
        index.set_backend_model(b, MODEL)

    def hold(ids: list[int], backend: str) -> None:
        full = ids[: len(ids) // BS * BS]
        index.apply(backend, BlockStored(tuple(range(1, len(full) // BS + 1)), None,
                                         tuple(full), BS), 0.0)

    # Cold: a different 8,000-token conversation every time (nothing cached, nothing shared).
    colds = []
    for i in range(n):
        msgs = extend_to(rng, sizer, conversation(rng, sizer, 7000), 8000)
        colds.append({"messages": msgs})
        hold(ModelTokenizer(hf, cache_tokens=0).tokenize_body(colds[-1], chat=True).token_ids,
             backends[i % 4])
    sizes = [len(hf.apply_chat_template(b["messages"], tokenize=True, add_generation_prompt=True,
                                        return_dict=False)) for b in colds[:5]]
    print(f"prompt sizes (tokens): {sizes} ...; block size {BS}; {n} iterations")

    it = iter(colds)

    def cold() -> None:
        _, hashes, _, _ = _tokenize_and_hash(tok, next(it), True, hasher, key)
        index.match(hashes, 0.0)

    # Warm: one 7,000-token history seen once, then many different 1,000-token last turns.
    history = conversation(rng, sizer, 7000)
    _tokenize_and_hash(tok, {"messages": history}, True, hasher, key)
    warms = iter([{"messages": extend_to(random.Random(i), sizer, history, 8000)}
                  for i in range(n)])

    def warm() -> None:
        _, hashes, _, _ = _tokenize_and_hash(tok, next(warms), True, hasher, key)
        index.match(hashes, 0.0)

    texts = [hf.apply_chat_template(b["messages"], tokenize=False, add_generation_prompt=True)
             for b in colds]
    tit = iter(texts)
    bit = iter(colds)
    fast = hf.backend_tokenizer

    report("baseline: tokenizers' encode of the rendered text", timed(
        lambda: fast.encode(next(tit), add_special_tokens=False), n))
    report("baseline: chat template render only", timed(
        lambda: hf.apply_chat_template(next(bit)["messages"], tokenize=False,
                                       add_generation_prompt=True), n))
    report("cold: render + tokenize + hash + match (8,000 tokens)", timed(cold, n))
    report("warm: first 7,000 tokens seen on an earlier turn", timed(warm, n))

    # The same warm path through the async analyzer (thread-pool hop included).
    analyzer = TokenizingAnalyzer({MODEL: tok}, KvMetrics(),
                                  shape_of=lambda m: ModelShape(m, None, BS))
    bodies = [{"model": MODEL, "messages": extend_to(random.Random(10_000 + i), sizer, history,
                                                       8000)} for i in range(n)]

    async def through_analyzer() -> list[float]:
        out = []
        for i, body in enumerate(bodies):
            fields = RequestFields(Endpoint.CHAT, "/v1/chat/completions", body, {}, f"r{i}",
                                   MODEL)
            t = time.perf_counter()
            request = await analyzer.analyze(fields)
            index.match(request.block_hashes, 0.0)
            out.append((time.perf_counter() - t) * 1e3)
        return out

    report("warm, through TokenizingAnalyzer.analyze (executor hop)",
           asyncio.run(through_analyzer()))
    analyzer.close()


if __name__ == "__main__":
    main()
