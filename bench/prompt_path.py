"""Tokenize + hash + match for chat prompts of 8,000 and 32,000 tokens, cold and with all but the
last ~1,000 tokens seen on an earlier turn, and for a 2,000-character completions prompt (the
tiny tokenizer, block size 16, an index of 4 backends).

    .venv/bin/python bench/prompt_path.py [--iterations 60] [--sizes 8000,32000]

Prints p50/p90 per path, next to same-run baselines: the tokenizer library's own encode of
the same text (``encode_batch_fast``, no offsets), the chat template render alone, and the
router's path with the Python word path off (every piece through the Rust tokenizer).
Targets (issue 15): 8k chat <= 5 ms p50 cold, <= 1 ms p50 when its history was seen.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from collections.abc import Callable, Iterator, Sequence

from policies.kv.events import BlockStored
from policies.kv.hashing import BlockHasher, Namespace
from policies.kv.index import PrefixIndex
from router.kv.metrics import KvMetrics
from router.prompt.analyzer import Endpoint, RequestFields, _text_of_messages
from router.prompt.token_analyzer import ModelShape, TokenizingAnalyzer, _tokenize_and_hash
from router.prompt.tokenize import ModelTokenizer, load_tokenizer
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
    parser.add_argument("--sizes", default="8000,32000", help="chat prompt sizes in tokens")
    args = parser.parse_args()
    hf = load_tokenizer(default_path())
    sizer = ModelTokenizer(hf)  # sizes prompts with its own cache, leaving the measured ones cold
    print(f"block size {BS}; {args.iterations} iterations (a third of them at 32k tokens)")
    completions(hf, args.iterations)
    for size in (int(x) for x in args.sizes.split(",")):
        chat(hf, sizer, size, max(10, args.iterations // 3) if size > 10_000 else args.iterations)


def completions(hf: object, n: int) -> None:
    """The 2,000-character prompt of bench/overhead.py: a fresh one every time (a number every
    ~200 characters, as ``overhead.py --prompts unique``), and the same one again."""
    tok, rust = ModelTokenizer(hf), ModelTokenizer(hf, word_encoder=False)
    hasher, key = BlockHasher(Namespace(MODEL), BS), repr(Namespace(MODEL))
    base = ("The quick brown fox jumps over the lazy dog. " * 64)[:2000]
    parts = base.split(" ")

    def fresh(i: int) -> dict:
        return {"prompt": " ".join(f"{w} {i}" if j % 40 == 39 else w
                                   for j, w in enumerate([str(i), *parts]))}

    print("\ncompletions, 2,000 characters (1,334 tokens)")
    bodies = iter([fresh(i) for i in range(4 * n)])
    fast = hf.backend_tokenizer  # type: ignore[attr-defined]
    report("baseline: tokenizers' encode_batch_fast", timed(
        lambda: fast.encode_batch_fast([next(bodies)["prompt"]]), n))
    report("fresh prompt, Rust encoder only (word path off)", timed(
        lambda: _tokenize_and_hash(rust, next(bodies), False, hasher, key), n))
    report("fresh prompt: tokenize + hash", timed(
        lambda: _tokenize_and_hash(tok, next(bodies), False, hasher, key), n))
    same = {"prompt": base}
    _tokenize_and_hash(tok, same, False, hasher, key)
    report("the same prompt again", timed(
        lambda: _tokenize_and_hash(tok, same, False, hasher, key), n))


def chat(hf: object, sizer: ModelTokenizer, size: int, n: int) -> None:
    tok, rust = ModelTokenizer(hf), ModelTokenizer(hf, word_encoder=False)
    hasher = BlockHasher(Namespace(MODEL), BS)
    key = repr(Namespace(MODEL))
    rng = random.Random(size)

    # The index holds each cold prompt on one of 4 backends, so match walks the whole chain.
    index = PrefixIndex()
    backends = [f"b{i}" for i in range(4)]
    for b in backends:
        index.set_backend_model(b, MODEL)

    def hold(ids: Sequence[int], backend: str) -> None:
        full = ids[: len(ids) // BS * BS]
        index.apply(backend, BlockStored(tuple(range(1, len(full) // BS + 1)), None,
                                         tuple(full), BS), 0.0)

    # Cold: a different conversation every time (nothing cached, nothing shared).
    colds = []
    for i in range(2 * n):
        msgs = extend_to(rng, sizer, conversation(rng, sizer, size - 1000), size)
        colds.append({"messages": msgs})
        hold(sizer.tokenize_body(colds[-1], chat=True).token_ids, backends[i % 4])
    sizes = [len(sizer.tokenize_body(b, chat=True).token_ids) for b in colds[:3]]
    print(f"\nchat, {size:,} tokens (first prompts: {sizes})")
    texts = iter([hf.apply_chat_template(b["messages"], tokenize=False,  # type: ignore[attr-defined]
                                         add_generation_prompt=True) for b in colds])
    bit = iter(colds)
    fast = hf.backend_tokenizer  # type: ignore[attr-defined]
    report("baseline: tokenizers' encode_batch_fast of the text", timed(
        lambda: fast.encode_batch_fast([next(texts)], add_special_tokens=False), n))
    report("baseline: chat template render only", timed(
        lambda: hf.apply_chat_template(next(bit)["messages"], tokenize=False,  # type: ignore[attr-defined]
                                       add_generation_prompt=True), n))

    def cold_with(t: ModelTokenizer, bodies: Iterator[dict]) -> Callable[[], None]:
        def run() -> None:
            _, hashes, _, _ = _tokenize_and_hash(t, next(bodies), True, hasher, key)
            index.match(hashes, 0.0)
        return run

    report("cold, Rust encoder only (word path off)", timed(cold_with(rust, iter(colds)), n))
    report("cold: render + tokenize + hash + match", timed(cold_with(tok, iter(colds[n:])), n))

    # Warm: one history seen once, then many different ~1,000-token last turns.
    history = conversation(rng, sizer, size - 1000)
    _tokenize_and_hash(tok, {"messages": history}, True, hasher, key)
    warms = iter([{"messages": extend_to(random.Random(i), sizer, history, size)}
                  for i in range(n)])
    report(f"warm: first ~{size - 1000:,} tokens seen on an earlier turn",
           timed(cold_with(tok, warms), n))

    # The same warm path through the async analyzer (on the loop, or the pool past 8,192 chars).
    analyzer = TokenizingAnalyzer({MODEL: tok}, KvMetrics(),
                                  shape_of=lambda m: ModelShape(m, None, BS))
    bodies = [{"model": MODEL, "messages": extend_to(random.Random(10_000 + i), sizer, history,
                                                       size)} for i in range(n)]

    async def through_analyzer() -> list[float]:
        out = []
        for i, body in enumerate(bodies):
            fields = RequestFields(Endpoint.CHAT, "/v1/chat/completions", body, {}, f"r{i}",
                                   MODEL, prompt_text=_text_of_messages(body["messages"]))
            t = time.perf_counter()
            request = await analyzer.analyze(fields)
            index.match(request.block_hashes, 0.0)
            out.append((time.perf_counter() - t) * 1e3)
        return out

    report("warm, through TokenizingAnalyzer.analyze (thread pool)",
           asyncio.run(through_analyzer()))
    analyzer.close()


if __name__ == "__main__":
    main()
