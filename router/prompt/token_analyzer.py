"""The tokenizing ``RequestAnalyzer``: exact prompt tokens and block hashes for every request.

For a completions or chat request of a model with a tokenizer (``router.prompt.tokenize``), the prompt
is tokenized exactly as the engine will, cut into full blocks of the model's block size and
hashed with ``policies.kv.hashing`` in the request's namespace:

- model: the backends' base model (for a LoRA adapter, the ``parent`` its backends report in
  ``/v1/models``; the adapter name goes into the namespace, as vLLM's events carry
  ``lora_name``);
- ``cache_salt`` from the body (vLLM keeps salted blocks apart); such requests are marked
  ``salted``, since engine events carry no salt and only the policy's record of its own salted
  dispatches can predict their hits;
- block size: what the backends serving the model report (``vllm:cache_config_info``, scraped
  into the pool), else ``models.<name>.block_size`` from the config (default 16).

The work (render, encode, hash) of a prompt under ``inline_chars`` characters (default 8,192,
~0.1-0.5 ms) runs on the event loop; larger ones go to a small thread pool. Encoding is mostly
Python now (``router.prompt.word_encoder``) and holds the GIL, so the pool buys little parallelism
for a small prompt and costs a hand-off each way plus the loop waiting for the GIL; a large
prompt in the pool still lets the loop run between the interpreter's switch intervals and
the Rust encoder's GIL-free stretches. Hashes of
blocks a conversation's earlier turns already had are reused (``PromptRun``), so a long chat
pays only for its new turn. No tokenizer for the model, or a prompt the tokenizer rejects
(the engine will answer it with its own error), falls back to ``chars_per_token`` characters
per token with approximate block hashes over character chunks (``chars_per_token x block_size``
characters each, chained with xxh3 in the same namespace), counted in
``kvrouter_tokenize_fallback_total{model}``: such hashes never match engine events, but they
give the policy's approximate mode stable prefix keys.

Must not import aiohttp or ``simulator``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import xxhash

from policies.kv.hashing import BlockHasher, Namespace, TokenIdError
from policies.types import BlockHash, RouteRequest, value_type
from router.errors import InvalidRequest
from router.hot_metrics import CounterChild
from router.kv.metrics import KvMetrics
from router.kv.parity import TokenParity
from router.prompt.analyzer import Endpoint, RequestFields
from router.prompt.chat_render import PromptError, PromptRejected
from router.prompt.tokenize import ModelTokenizer

__all__ = ["ModelShape", "TokenizingAnalyzer"]

log = logging.getLogger("kvrouter.analyzer")


@value_type  # built per request: a frozen dataclass's init is ~7x slower
class ModelShape:
    """How the backends serving a model cache it."""

    base_model: str
    lora: str | None
    block_size: int


class TokenizingAnalyzer:
    def __init__(
        self,
        tokenizers: Mapping[str, ModelTokenizer],
        metrics: KvMetrics,
        *,
        shape_of: Callable[[str], ModelShape],
        parity: TokenParity | None = None,
        threads: int = 2,
        chars_per_token: float = 4.0,
        inline_chars: int = 8192,
    ) -> None:
        self.tokenizers = dict(tokenizers)
        self.metrics = metrics
        self.shape_of = shape_of
        self.parity = parity
        self.chars_per_token = chars_per_token
        self.inline_chars = inline_chars
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="kvrouter-tok")
        self._reused: dict[str, CounterChild] = {}
        self._hashers: dict[tuple[str, str | None, str | None, int],
                            tuple[BlockHasher, str]] = {}

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def analyze(self, fields: RequestFields) -> RouteRequest:
        shape = self.shape_of(fields.model)
        salt = fields.body.get("cache_salt")
        hasher, key = self._hasher(shape.base_model, shape.lora,
                                   salt if isinstance(salt, str) else None, shape.block_size)
        namespace = hasher.namespace
        tokenizer = self.tokenizers.get(fields.model) or self.tokenizers.get(shape.base_model)
        max_tokens = fields.max_tokens if fields.max_tokens is not None else 16
        if tokenizer is not None and fields.endpoint != Endpoint.OTHER:
            chat = fields.endpoint == Endpoint.CHAT
            try:
                if len(fields.prompt_text) <= self.inline_chars:
                    ids, hashes, reused, elapsed_s = _tokenize_and_hash(
                        tokenizer, fields.body, chat, hasher, key)
                else:
                    ids, hashes, reused, elapsed_s = await asyncio.get_running_loop(
                    ).run_in_executor(self._pool, _tokenize_and_hash, tokenizer, fields.body,
                                      chat, hasher, key)
            except PromptRejected as exc:
                raise InvalidRequest(str(exc), param=_prompt_param(fields)) from None
            except TokenIdError as exc:
                raise InvalidRequest(f"'prompt' {exc}", param="prompt") from None
            except PromptError as exc:
                log.debug("prompt of %s not tokenized (%s); estimating", fields.request_id, exc)
            else:
                self.metrics.tokenize_seconds.observe(elapsed_s)
                if reused:
                    counter = self._reused.get(fields.model)
                    if counter is None:  # bounded like the pool's models: known ones only
                        counter = self._reused[fields.model] = (
                            self.metrics.tokenize_reused.labels(fields.model))
                    counter.inc(reused)
                if self.parity is not None and namespace.cache_salt is None:
                    self.parity.note(fields.request_id, fields.model, hashes)
                return RouteRequest(
                    request_id=fields.request_id, model=fields.model, prompt_tokens=ids,
                    prompt_text=fields.prompt_text, session_key=fields.session_key,
                    block_hashes=hashes, block_size=shape.block_size, max_tokens=max_tokens,
                    stream=fields.stream, tokens_exact=True,
                    salted=namespace.cache_salt is not None,
                )
        return self._estimate(fields, hasher, max_tokens)

    def _estimate(self, fields: RequestFields, hasher: BlockHasher, max_tokens: int) -> RouteRequest:
        if fields.prompt_token_ids is not None:  # token ids need no tokenizer: still exact
            ids = fields.prompt_token_ids
            try:
                hashes = hasher.hash_tokens(ids)
            except TokenIdError as exc:
                raise InvalidRequest(f"'prompt' {exc}", param="prompt") from None
            return RouteRequest(
                request_id=fields.request_id, model=fields.model, prompt_tokens=len(ids),
                session_key=fields.session_key, block_hashes=hashes,
                block_size=hasher.block_size, max_tokens=max_tokens, stream=fields.stream,
                tokens_exact=True, salted=hasher.namespace.cache_salt is not None,
            )
        if fields.endpoint != Endpoint.OTHER:
            self.metrics.tokenize_fallback.labels(fields.model).inc()
        text = fields.prompt_text
        return RouteRequest(
            request_id=fields.request_id, model=fields.model,
            prompt_tokens=math.ceil(len(text) / self.chars_per_token), prompt_text=text,
            session_key=fields.session_key,
            block_hashes=char_block_hashes(text, hasher, self.chars_per_token),
            block_size=hasher.block_size, max_tokens=max_tokens, stream=fields.stream,
            tokens_exact=False, salted=hasher.namespace.cache_salt is not None,
        )

    def _hasher(self, model: str, lora: str | None, salt: str | None,
                block_size: int) -> tuple[BlockHasher, str]:
        """The namespace's hasher and its key in a prompt run's hash cache. Keyed by plain
        strings: hashing and comparing a ``Namespace`` runs its dataclass methods in Python."""
        key = (model, lora, salt, block_size)
        entry = self._hashers.get(key)
        if entry is None:
            if len(self._hashers) > 10_000:  # salts are per tenant; keep the table bounded
                self._hashers.clear()
            namespace = Namespace(model, lora, salt)
            entry = self._hashers[key] = (BlockHasher(namespace, block_size), repr(namespace))
        return entry


def _prompt_param(fields: RequestFields) -> str:
    return "messages" if fields.endpoint == Endpoint.CHAT else "prompt"


def _tokenize_and_hash(tokenizer: ModelTokenizer, body: Mapping[str, Any], chat: bool,
                       hasher: BlockHasher, key: str) -> tuple[int, tuple[BlockHash, ...], int, float]:
    """Tokens, block hashes (reusing a cached prefix's), timing; on the loop or in the pool."""
    start = time.perf_counter()
    result = tokenizer.tokenize_body(body, chat=chat)
    ids = result.token_ids
    bs = hasher.block_size
    n_full = len(ids) // bs
    known = result.run.cached_hashes(key, bs)
    if len(known) >= n_full:
        hashes = known if len(known) == n_full else known[:n_full]
    else:
        more = hasher.extend(known[-1] if known else None, ids[len(known) * bs : n_full * bs])
        hashes = (*known, *more)
        result.run.store_hashes(key, bs, hashes)
    return len(ids), hashes, result.reused_tokens, time.perf_counter() - start


def char_block_hashes(text: str, hasher: BlockHasher, chars_per_token: float) -> tuple[int, ...]:
    """Approximate blocks: ``chars_per_token * block_size`` characters each, chained."""
    chunk = max(1, round(chars_per_token * hasher.block_size))
    h = hasher.root ^ 0x5A5A_5A5A_5A5A_5A5A  # never equal to a token chain's root
    out = []
    for start in range(0, len(text) - chunk + 1, chunk):
        h = xxhash.xxh3_64_intdigest(text[start : start + chunk].encode("utf-8", "surrogatepass"), h)
        out.append(h)
    return tuple(out)
