"""One emulated pod's engine side: the engine model driven in scaled wall-clock time, the
tokenizer, per-request token streams, metrics and the KV-event publisher.

Async (asyncio); used by ``simulator.emulator.http`` and ``simulator.emulator.fleet``. Must not import
``router`` or aiohttp.

Time: the engine model runs in virtual seconds; one virtual second lasts ``1 / time_scale`` wall
seconds. The driver steps the engine, sleeps the step's scaled duration, then delivers the
step's tokens to the waiting handlers and publishes the step's KV events (vLLM publishes after
the step too).

Tokenization: ``load_codec(path)`` loads a tokenizer directory with ``transformers`` (the tiny
tokenizer by default). When that fails, ``ByteCodec`` is used: a deterministic fallback mapping
each UTF-8 byte to id ``byte + 3`` (ids 0-2 reserved), chat as ``tool: JSON`` lines then
``role: content`` lines, so the
emulator still runs without a tokenizer.

Output: deterministic filler tokens (a fixed cycle of common words), ``max_tokens`` of them (EOS
is ignored, like ``ignore_eos``), one per decode step. Full blocks of output are cached (and
announced in BlockStored events with their token ids) as decoding fills them, like vLLM.

Tiers (issue 18): ``PodConfig.cpu_offload_blocks`` turns on vLLM's native CPU offloading in the
engine model (its "CPU" placeholder events go out like the others; ``cached_tokens`` counts the
loaded tokens). A ``RedisBlockStore`` makes the pod one of the fleet sharing that store
(``simulator.emulator.store``): before a step the pod looks up the blocks of the requests
submitted since (one round trip), after it writes the step's computed blocks through (one
round trip) and publishes what the store reports new or evicted as "REMOTE" events. Pods of a
store share one block-hash seed (the store's keys must agree across engines, as LMCache's do).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import re
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from policies.kv.events import REMOTE, BlockRemoved, BlockStored, KvEvent
from simulator.emulator.chat import ChatInputs, shape_chat
from simulator.emulator.kv import KvEventPublisher, vllm_block_hashes
from simulator.emulator.metrics import PodMetrics
from simulator.emulator.store import RedisBlockStore, StoreMirror
from simulator.engine.cost_model import CostModel
from simulator.engine.model import EngineConfig, EngineModel, EngineRequest, StepResult
from simulator.engine.tiers import REMOTE_MEDIUM

__all__ = ["ByteCodec", "Codec", "EmulatedPod", "HfCodec", "PodConfig", "TokenStream", "load_codec"]

log = logging.getLogger(__name__)

_FILLER_TEXT = " the cache block router request backend engine prefix decode prefill query answer"


class Codec(Protocol):
    name: str
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...
    def chat(self, inputs: ChatInputs) -> list[int]: ...


class HfCodec:
    """A ``transformers`` tokenizer: completions encode the prompt; chat renders the template
    (with tools, documents and template kwargs, messages shaped as vLLM shapes them: see
    ``simulator.emulator.chat``) and encodes it without adding special tokens again.

    Recent encodings are remembered by text (the last ``MEMO_ENTRIES``, at most
    ``MEMO_TOKENS`` ids in all). Every pod of an emulated
    cluster shares one codec in one process, while real pods tokenize on their own CPUs: a
    router that renders each request on every pod (vllm-router's cache_aware) would otherwise
    cost the emulator N tokenizations of the same prompt in series, a slowdown real pods do not
    have. The answers are the same either way.

    A rendered chat is encoded piece by piece between its special tokens, each piece through
    the same memory: the tokenizer cuts its text at added tokens before it normalizes or
    pre-tokenizes anything, so the pieces' ids are the whole's (``tests/test_emulator_codec.py``
    checks it). A group's shared system message is then encoded once, not once per request:
    four pods share one core here where real pods tokenize on their own, and a burst of 64
    requests of one new 1,400-token prefix cost this process ~70 ms of encoding in series,
    most of the burst's TTFT (bench/README.md, "The emulator's encoding"). Only when every
    added token matches its exact text (no ``lstrip``, ``rstrip``, ``single_word`` or
    ``normalized``); otherwise the whole text is encoded, as before."""

    MEMO_ENTRIES = 4096
    MEMO_TOKENS = 1_000_000  # ~36 MB of ids held as tuples of ints

    def __init__(self, tokenizer: Any, name: str) -> None:
        self._tok = tokenizer
        self.name = name
        self.vocab_size = len(tokenizer)
        # The Rust tokenizer under a fast tokenizer gives the same ids without transformers'
        # per-call Python overhead (a quarter of the emulator's CPU per short request), and
        # its batch encode without offsets another ~30% less for a chat prompt (1.6 -> 1.1 ms
        # for the quality bench's 1,500-token chats). Not when the tokenizer file itself sets
        # truncation or padding, which transformers turns off per call and the backend would
        # apply.
        backend = getattr(tokenizer, "backend_tokenizer", None)
        plain = (backend is not None and backend.truncation is None and backend.padding is None
                 and hasattr(backend, "encode_batch_fast"))
        self._backend = backend if plain else None
        self._memo: OrderedDict[tuple[str, bool], tuple[int, ...]] = OrderedDict()
        self._memo_tokens = 0
        self._specials = _special_cutter(tokenizer)

    def _remembered(self, text: str, special: bool) -> tuple[int, ...]:
        key = (text, special)
        ids = self._memo.get(key)
        if ids is not None:
            self._memo.move_to_end(key)
            return ids
        ids = self._memo[key] = tuple(self._encode(text, special))
        self._memo_tokens += len(ids)
        while len(self._memo) > 1 and (len(self._memo) > self.MEMO_ENTRIES
                                       or self._memo_tokens > self.MEMO_TOKENS):
            self._memo_tokens -= len(self._memo.popitem(last=False)[1])
        return ids

    def _encode(self, text: str, special: bool) -> list[int]:
        if self._backend is not None:
            return list(self._backend.encode_batch_fast([text], add_special_tokens=special)[0].ids)
        return list(self._tok.encode(text, add_special_tokens=special))

    def encode(self, text: str) -> list[int]:
        return list(self._remembered(text, special=True))

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._tok.decode(list(ids)))

    def chat(self, inputs: ChatInputs) -> list[int]:
        return self.encode_rendered(self.render_chat(inputs))

    def render_chat(self, inputs: ChatInputs) -> str:
        template = self._tok.get_chat_template(None, inputs.tools)
        text = self._tok.apply_chat_template(
            inputs.conversation(template),
            tools=inputs.tools,
            documents=inputs.documents,
            add_generation_prompt=inputs.add_generation_prompt,
            continue_final_message=inputs.continue_final_message,
            tokenize=False,
            **inputs.kwargs,
        )
        return str(text)

    def encode_rendered(self, text: str) -> list[int]:
        if self._specials is None:
            return list(self._remembered(text, special=False))
        pattern, ids_of = self._specials
        out: list[int] = []
        at = 0
        for match in pattern.finditer(text):
            if match.start() > at:
                out.extend(self._remembered(text[at:match.start()], special=False))
            out.append(ids_of[match.group()])
            at = match.end()
        if at < len(text):
            out.extend(self._remembered(text[at:], special=False))
        return out


class ByteCodec:
    """The fallback: one token per UTF-8 byte, id = byte + 3."""

    name = "bytes"
    vocab_size = 259

    def encode(self, text: str) -> list[int]:
        return [b + 3 for b in text.encode()]

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i - 3 for i in ids if 3 <= i < 259).decode(errors="replace")

    def chat(self, inputs: ChatInputs) -> list[int]:
        lines = [f"tool: {json.dumps(t, sort_keys=True)}\n" for t in inputs.tools or []]
        lines += [
            f"{m.get('role', '')}: {_content_text(m.get('content'))}\n" for m in inputs.messages
        ]
        if inputs.add_generation_prompt:
            lines.append("assistant: ")
        return self.encode("".join(lines))


def _special_cutter(tokenizer: Any) -> tuple[re.Pattern[str], dict[str, int]] | None:
    """A pattern of the tokenizer's added tokens (longest first, as the tokenizer matches them)
    and their ids, or None where cutting at them could differ from the tokenizer's own cut."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "get_added_tokens_decoder", None)
    if decoder is None:
        return None
    added = decoder()
    if not added or any(t.lstrip or t.rstrip or t.single_word or t.normalized
                        for t in added.values()):
        return None
    ids_of = {t.content: i for i, t in added.items()}
    alternatives = sorted(ids_of, key=len, reverse=True)
    return re.compile("|".join(re.escape(a) for a in alternatives)), ids_of


def _content_text(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            str(p.get("text", ""))
            for p in content
            if isinstance(p, dict) and p.get("type") == "text"
        )
    return ""


def load_codec(path: str | Path | None) -> Codec:
    """The tokenizer at ``path`` (default: the shipped tiny tokenizer), else ``ByteCodec``."""
    if path is None:
        from simulator.tiny_tokenizer import default_path

        path = default_path()
    try:
        from transformers import AutoTokenizer

        return HfCodec(AutoTokenizer.from_pretrained(str(path)), str(path))
    except Exception as exc:  # any load failure means: use the documented fallback
        log.warning("tokenizer %s not loadable (%s); using the byte fallback", path, exc)
        return ByteCodec()


@dataclass(frozen=True, slots=True)
class PodConfig:
    model: str = "tiny-llama"
    engine_kind: str = "vllm"
    block_size: int = 16
    num_gpu_blocks: int = 4096
    max_model_len: int = 8192
    max_num_batched_tokens: int = 8192
    max_num_seqs: int = 256
    time_scale: float = 1.0
    # vLLM >= 0.30 serves its render endpoints only with `--enable-scale-out`.
    scale_out: bool = False
    cpu_offload_blocks: int = 0  # vLLM native CPU offloading (kv_offloading_size); 0 = off


class TokenStream:
    """One request's tokens as the engine produces them. Streaming handlers ``await
    next_token()`` (the filler token's text, ``None`` after the last one); others ``await
    done()`` and read ``text()``, which costs no wake-up per token."""

    __slots__ = (
        "_done",
        "_filler",
        "_queue",
        "cached_tokens",
        "finished",
        "max_tokens",
        "produced",
        "prompt_tokens",
        "request_id",
    )

    def __init__(
        self,
        request_id: str,
        prompt_tokens: int,
        max_tokens: int,
        filler: Sequence[str],
        streaming: bool,
    ) -> None:
        self.request_id = request_id
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.cached_tokens = 0
        self.finished = False
        self.produced = 0
        self._filler = filler
        self._queue: asyncio.Queue[str | None] | None = asyncio.Queue() if streaming else None
        self._done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def next_token(self) -> str | None:
        assert self._queue is not None, "not a streaming request"
        return await self._queue.get()

    async def done(self) -> None:
        await self._done

    def text(self) -> str:
        filler = self._filler
        return "".join(filler[i % len(filler)] for i in range(self.produced))

    def tokens(self) -> list[str]:
        filler = self._filler
        return [filler[i % len(filler)] for i in range(self.produced)]

    def _emit(self) -> None:
        if self._queue is not None:
            self._queue.put_nowait(self._filler[self.produced % len(self._filler)])
        self.produced += 1

    def _finish(self) -> None:
        self.finished = True
        if self._queue is not None:
            self._queue.put_nowait(None)
        if not self._done.done():
            self._done.set_result(None)


class EmulatedPod:
    def __init__(
        self,
        config: PodConfig,
        cost: CostModel,
        codec: Codec,
        index: int = 0,
        publisher: KvEventPublisher | None = None,
        store: RedisBlockStore | None = None,
    ) -> None:
        if config.time_scale <= 0:
            raise ValueError(f"time_scale must be > 0, got {config.time_scale}")
        self.config = config
        self.codec = codec
        self.index = index
        self.publisher = publisher
        self.store = store
        self.mirror = (StoreMirror(store.capacity_blocks, config.block_size)
                       if store is not None else None)
        self._lookups: list[int] = []
        self.store_errors = 0
        self.engine = EngineModel(
            EngineConfig(
                block_size=config.block_size,
                num_gpu_blocks=config.num_gpu_blocks,
                max_num_batched_tokens=config.max_num_batched_tokens,
                max_num_seqs=config.max_num_seqs,
                max_model_len=config.max_model_len,
                cpu_offload_blocks=config.cpu_offload_blocks,
            ),
            cost,
            engine_id=f"pod-{index}",
            shared=self.mirror,
        )
        self.metrics = PodMetrics(self.engine, config.model, sglang=config.engine_kind == "sglang")
        self._hash_seed = (b"emulated-fleet" if store is not None
                           else f"emulated-engine-{index}".encode())
        self._streams: dict[str, TokenStream] = {}
        self._arrivals_wall: dict[str, float] = {}
        self._ids = itertools.count()
        self._work = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._virtual_s = 0.0
        self._free_s = 0.0  # virtual end of the engine's last step
        self._wall0 = 0.0
        self._filler_ids = codec.encode(_FILLER_TEXT) or [3]
        self._filler = [codec.decode([i]) for i in self._filler_ids]
        self.driver_errors = 0

    async def start(self) -> None:
        # vLLM 0.32 warms its chat renderer before it serves (OnlineRenderer.warmup): the
        # first chat request must not pay the template's compile (~40 ms here), or whichever
        # router sends the first burst looks slower for it.
        try:
            self.codec.chat(shape_chat({"messages": [{"role": "user", "content": "warm up"}]}))
        except ValueError:  # no chat template: chat requests get their error later
            pass
        loop = asyncio.get_running_loop()
        self._wall0 = loop.time()
        if self.publisher is not None:
            await self.publisher.start()
        self._task = asyncio.create_task(self._drive(), name=f"emulated-pod-{self.index}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task])
        if self.publisher is not None:
            await self.publisher.close()

    def _virtual_now(self) -> float:
        wall = asyncio.get_running_loop().time() - self._wall0
        self._virtual_s = max(self._virtual_s, wall * self.config.time_scale)
        return self._virtual_s

    @property
    def filler_tokens(self) -> list[str]:
        """The texts of the output's filler tokens, in the order they cycle."""
        return self._filler

    # -- requests ------------------------------------------------------------------------------

    def block_keys(self, token_ids: Sequence[int]) -> tuple[int, ...]:
        """The engine's keys of the full blocks of ``token_ids`` (what ``submit`` uses)."""
        return tuple(vllm_block_hashes(token_ids, self.config.block_size, self._hash_seed))

    def submit(
        self,
        token_ids: Sequence[int],
        max_tokens: int,
        streaming: bool = False,
        report_hits: bool = False,
    ) -> TokenStream:
        """Queue a request; ValueError (client's fault) when the engine could never run it."""
        rid = f"{self.index}-{next(self._ids)}"
        # The output is known in advance (filler), so its blocks get keys too and are cached as
        # decoding fills them: a next turn repeating the answer hits them, as on vLLM.
        filler = self._filler_ids
        output = [filler[i % len(filler)] for i in range(max_tokens)]
        sequence = (*token_ids, *output)
        keys = vllm_block_hashes(sequence, self.config.block_size, self._hash_seed)
        request = EngineRequest(rid, len(token_ids), max_tokens, keys, sequence, report_hits)
        if self.mirror is not None:
            self._lookups.extend(keys[: len(token_ids) // self.config.block_size])
        self.engine.add_request(request, self._virtual_now())
        stream = TokenStream(rid, len(token_ids), max_tokens, self._filler, streaming)
        self._streams[rid] = stream
        self._arrivals_wall[rid] = asyncio.get_running_loop().time()
        self._work.set()
        return stream

    def cancel(self, stream: TokenStream) -> None:
        """The client went away: free the engine's blocks (vLLM aborts the request)."""
        if self._streams.pop(stream.request_id, None) is not None:
            self._arrivals_wall.pop(stream.request_id, None)
            self.engine.abort(stream.request_id)

    def reset_prefix_cache(self) -> bool:
        ok, events = self.engine.reset_prefix_cache()
        if self.publisher is not None:
            self.publisher.publish(events)
        return ok

    # -- the driver ----------------------------------------------------------------------------

    async def _drive(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._work.wait()
            self._work.clear()
            while self.engine.has_work:
                if self.mirror is not None and self._lookups:
                    await self._look_up()
                now = self._virtual_now()
                # A vLLM engine core has a process of its own: it starts a step the moment the
                # last one ends, or the moment a request reaches an idle engine. Here every pod
                # shares one event loop, and this task runs only after whatever else is ready
                # (other pods' requests being read and tokenized: ~1 ms each), so the step
                # starts when the engine would have started it, with only what had arrived by
                # then. Before, two cold requests of a burst 1-2 ms apart shared one step
                # (both first tokens at its end) where a real engine runs the first alone.
                start_s = min(now, self.engine.next_step_s(self._free_s))
                try:
                    result = self.engine.step(start_s)
                except Exception:  # the pod keeps serving; count, back off, try again
                    self.driver_errors += 1
                    log.exception("emulated pod %d: engine step failed", self.index)
                    await asyncio.sleep(1.0)
                    continue
                if result is None:
                    break
                self._free_s = result.end_s
                self._virtual_s = max(self._virtual_s, result.end_s)
                await asyncio.sleep(max(result.end_s - now, 0.0) / self.config.time_scale)
                try:
                    self._deliver(result, loop.time())
                except Exception:  # bad state must not stop the pod; count and go on
                    self.driver_errors += 1
                    log.exception("emulated pod %d: delivering a step failed", self.index)
                if self.mirror is not None and self.mirror.pending:
                    await self._write_through()

    async def _look_up(self) -> None:
        """Which blocks of the requests submitted since the last step the store holds."""
        assert self.store is not None and self.mirror is not None
        keys = list(dict.fromkeys(self._lookups))
        self._lookups.clear()
        try:
            present = await self.store.lookup(keys)
        except Exception:  # the store is down or answered badly: serve from HBM/CPU alone
            self.store_errors += 1
            log.exception("emulated pod %d: store lookup failed", self.index)
            self.mirror.forget(keys)
            return
        self.mirror.learn(keys, present)

    async def _write_through(self) -> None:
        """Write the step's computed blocks to the store; announce what it stored or evicted."""
        assert self.store is not None and self.mirror is not None
        keys = self.mirror.pending
        self.mirror.pending = []
        try:
            new, evicted = await self.store.write(keys)
        except Exception:  # keep serving; the blocks just are not shared
            self.store_errors += 1
            log.exception("emulated pod %d: store write failed", self.index)
            self.mirror.forget(keys)
            return
        self.mirror.forget(evicted)
        events: list[KvEvent] = []
        if new:
            events.append(BlockStored(tuple(new), None, (), 0, medium=REMOTE_MEDIUM,
                                      locality=REMOTE))
        events.extend(BlockRemoved((key,), medium=REMOTE_MEDIUM, locality=REMOTE)
                      for key in evicted)
        if events and self.publisher is not None:
            self.publisher.publish(events)

    def _deliver(self, result: StepResult, wall_now: float) -> None:
        streams = self._streams
        for out in result.outputs:
            stream = streams.get(out.request_id)
            if stream is None:
                continue  # cancelled while the step ran
            if out.first_token:
                stream.cached_tokens = out.cached_tokens
                arrival = self._arrivals_wall.get(out.request_id, wall_now)
                self.metrics.ttft.observe(wall_now - arrival)
            stream._emit()
            if out.finished:
                stream._finish()
                del streams[out.request_id]
                arrival = self._arrivals_wall.pop(out.request_id, wall_now)
                self.metrics.e2e.observe(wall_now - arrival)
        for rid in result.decoded:
            stream = streams.get(rid)
            if stream is not None:
                stream._emit()
        if self.publisher is not None and result.events:
            # vLLM's engine core hands events to a publisher thread and its tokens to the API
            # server: neither waits for the other. Published here, the step's events would be
            # packed and sent before the handlers woken above write their tokens, and a
            # subscribed router would read a cold prefill's ~90 stored blocks before its first
            # token (bench/README.md, "The emulator's encoding"). Queued behind those handlers
            # instead, in the same loop turn.
            asyncio.get_running_loop().call_soon(self.publisher.publish, result.events)
