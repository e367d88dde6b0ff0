"""Wiring the KV plumbing into the app: tokenizers per model, the prefix index, the tokenizing
analyzer, token parity and one background task, from the parsed ``kv_events`` section
(``router.config.kv_events.KvEventsConfig``, fields documented there) and ``models``.

    kv_events:
      bind: tcp://10.0.0.2:5557       # the router binds here (its pod IP) for engines that
                                      # connect out; only backends' addresses are let in
      sources:                        # explicit sources (else each backend's /kv_event_sources)
        - {backend: http://10.0.0.7:8000, endpoint: "tcp://*:5557",
           replay_endpoint: "tcp://*:5558", topic: "kv@pod-7"}
      discover: true                  # ask backends without sources for /kv_event_sources
      replay: true                    # replay from 0 when a source is added (late join)
    models:
      llama-8b: {tokenizer: /models/llama-8b, block_size: 16}

``build_kv(config, tokenizer_dirs)`` returns a ``KvPlumbing`` whose pieces go into
``create_app(analyzer=..., index=..., policy=..., background=[...])``. The background task
registers the KV metrics in the app's registry, then runs, until clean-up: event-source
discovery (``/v1/models`` for a backend's base model, ``/kv_event_sources``), the ingestor,
and the engine-metric scraper. With ``sync.warm_start`` it first loads a sibling's index
snapshot (``router.setup.warm``); ``routes()`` (the snapshot endpoint every replica serves) and
``not_ready`` go into ``create_app(routes=..., ready_checks=[...])``. Must not import
``simulator``.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any

import aiohttp

from policies.base import PolicyBase
from policies.kv.events import KvEvent
from policies.kv.index import PrefixIndex
from policies.registry import build_policy
from policies.types import BackendId, BlockHash, Policy
from router.config import Config, ConfigError
from router.config.disaggregation import wrap_policy
from router.config.kv_events import KvEventsConfig
from router.http.messages import Request, Response
from router.kv.auth import EventSocketGate
from router.kv.events import KvEventIngestor
from router.kv.metrics import KvMetrics
from router.kv.parity import ParityPolicy, TokenParity
from router.kv.sources import KvEventSource, parse_event_sources
from router.pool import BackendPool
from router.prompt.token_analyzer import ModelShape, TokenizingAnalyzer
from router.prompt.tokenize import ModelTokenizer, load_tokenizer
from router.scrape import EngineScraper
from router.setup.warm import SNAPSHOT_PATH, WarmStart

__all__ = ["KvPlumbing", "build_kv", "tokenizer_coverage", "wants_kv"]

log = logging.getLogger("kvrouter.kv")


def wants_kv(config: Config, tokenizer_dirs: Mapping[str, str]) -> bool:
    """Build the plumbing only when something uses it (baseline routers stay lean): a policy
    that reads the prefix index (it says so in ``uses_kv_index``), a ``kv_events`` section or
    a tokenizer."""
    policy = build_policy(config.policy.name, config.policy.params, random.Random(0))
    return bool(
        (isinstance(policy, PolicyBase) and policy.uses_kv_index) or tokenizer_dirs
        or config.kv_events is not None or any(m.tokenizer for m in config.models.values())
    )


class KvPlumbing:
    def __init__(self, config: Config, section: KvEventsConfig,
                 tokenizers: dict[str, ModelTokenizer],
                 environ: Mapping[str, str] | None = None) -> None:
        self.config = config
        self.section = section
        self.metrics = KvMetrics()
        self.index = PrefixIndex(section.index_max_entries)
        self.parity = TokenParity(self.metrics, ttl_s=section.parity_ttl_s)
        self.analyzer = TokenizingAnalyzer(
            tokenizers, self.metrics, shape_of=self.shape_of, parity=self.parity,
            threads=section.tokenizer_threads, chars_per_token=section.chars_per_token)
        self.pool: BackendPool | None = None
        self.ingestor: KvEventIngestor | None = None
        self._warned_block_size: set[str] = set()
        # Backends whose sources the ingestor follows; a backend leaves this set when it turns
        # unhealthy (its cache is presumed lost) and re-enters, replayed, once healthy again.
        self._subscribed: set[BackendId] = set()
        self.configured_sources = self._configured_sources()  # a bad entry fails at start-up
        self.warm = WarmStart(config, self.index, self.metrics, environ or {})

    def routes(self) -> dict[str, dict[str, Callable[[Request], Awaitable[Response]]]]:
        """For ``create_app(routes=...)``: the index snapshot siblings warm from."""
        return {SNAPSHOT_PATH: {"GET": self.warm.serve}}

    def not_ready(self) -> str | None:
        """For ``create_app(ready_checks=...)``: warming up (``sync.warm_start``)."""
        return self.warm.not_ready()

    def policy(self, rng: random.Random) -> Policy:
        inner = wrap_policy(build_policy(self.config.policy.name, self.config.policy.params, rng),
                            self.config.disaggregation, rng)
        return ParityPolicy(inner, self.parity)

    # ---- what the analyzer asks -------------------------------------------------------------

    def shape_of(self, model: str) -> ModelShape:
        base, lora = model, None
        sizes: set[int] = set()
        for backend in self.pool or ():
            entry = backend.discovered_models.get(model)
            parent = entry.get("parent") if entry else None
            if isinstance(parent, str) and parent and parent != model:
                base, lora = parent, model
            block_size = backend.signals.block_size
            if block_size and backend.serves(model):
                sizes.add(block_size)
        configured = self.config.models.get(model) or self.config.models.get(base)
        block_size = configured.block_size if configured is not None else 16
        if len(sizes) == 1:
            (scraped,) = sizes
            if configured is not None and scraped != block_size and model not in \
                    self._warned_block_size:
                self._warned_block_size.add(model)
                log.warning("models.%s.block_size is %d but its backends report %d; using %d",
                            model, block_size, scraped, scraped)
            block_size = scraped
        return ModelShape(base, lora, block_size)

    # ---- what the ingestor feeds --------------------------------------------------------------

    def apply(self, backend_id: BackendId, event: KvEvent, now_s: float) -> tuple[BlockHash, ...]:
        if not self.index.has_model(backend_id):  # a restored backend may come with one
            self.index.set_backend_model(backend_id, self._base_model(backend_id))
        return self.index.apply(backend_id, event, now_s)

    def _base_model(self, backend_id: BackendId) -> str:
        backend = self.pool.get(backend_id) if self.pool is not None else None
        if backend is not None:
            for model in backend.models():
                entry = backend.discovered_models.get(model) or {}
                if not entry.get("parent") or entry.get("parent") == model:
                    return model
        if len(self.config.models) == 1:
            return next(iter(self.config.models))
        raise ValueError(f"the model served by {backend_id} is not known yet")

    def _live(self, backend_id: BackendId) -> None:
        backend = self.pool.get(backend_id) if self.pool is not None else None
        if backend is not None:
            backend.kv_events = True

    # ---- the background task ------------------------------------------------------------------

    def background(self, state: Any) -> Coroutine[Any, Any, None]:
        return self._run(state)

    async def _run(self, state: Any) -> None:
        for collector in self.metrics.collectors():
            state.metrics.registry.register(collector)
        self.metrics.watch_index(lambda: self.index.entries, self.index.estimated_bytes)
        self.pool = state.pool
        state.pool.on_removed.append(self._removed)
        section = self.section
        tasks = []
        if section.enabled:
            self.ingestor = KvEventIngestor(
                self, [], self.metrics, replay_timeout_s=section.replay_timeout_s,
                replay_on_start=section.replay, max_gap_replays=section.max_gap_replays,
                replay_backoff_s=section.replay_backoff_s,
                gate=EventSocketGate(self.metrics, section.allow_from) if section.authenticate
                else None,
                on_stored=lambda b, ev, hashes: self.parity.observe(b, ev, hashes),
                on_backend_live=self._live)
            self.warm.ingestor = self.ingestor
            if self.warm.phase == "fetching":  # before any source is added: positions first
                snapshot = await self.warm.fetch(state.session())
                if snapshot is not None:
                    self.warm.load(snapshot, self.ingestor)
            tasks.append(asyncio.create_task(self.ingestor.run(), name="kvrouter-kv-events"))
            tasks.append(asyncio.create_task(self._discover(state), name="kvrouter-kv-sources"))
        else:
            log.info("KV events off (kv_events.enabled: false): the prefix index learns only "
                     "from this router's own dispatches")
        if section.scrape:
            scraper = EngineScraper(state.pool, self.metrics, state.session,
                                    interval_s=section.scrape_interval_s,
                                    timeout_s=section.scrape_timeout_s)
            tasks.append(asyncio.create_task(scraper.run(), name="kvrouter-scrape"))
        tasks.append(asyncio.create_task(self._follow_health(state), name="kvrouter-kv-health"))
        tasks.append(asyncio.create_task(self._check_tokenizers(state),
                                         name="kvrouter-kv-tokenizers"))
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.analyzer.close()

    async def _check_tokenizers(self, state: Any) -> None:
        """Once the backends' models are known, say (once) which configured tokenizers match
        no served model and which served models have none (approximate mode for those)."""
        while True:  # polled: the pool has no "models changed" event to wait on
            served = state.pool.healthy_models()
            if served:
                break
            await asyncio.sleep(1.0)
        for line in tokenizer_coverage(self.analyzer.tokenizers, served):
            log.warning("%s", line)

    def _removed(self, backend_id: BackendId) -> None:
        if self.ingestor is not None:
            self.ingestor.remove_backend(backend_id)
        self.parity.remove_backend(backend_id)

    async def _discover(self, state: Any) -> None:
        """Subscribe to every backend's sources: configured ones, else /kv_event_sources."""
        assert self.ingestor is not None
        await self.ingestor.started.wait()
        done = self._subscribed
        configured = self.configured_sources
        while True:
            for backend in list(state.pool):
                if backend.backend_id in done or not backend.healthy:
                    continue
                try:
                    if not backend.models():
                        await self._fetch_models(state.session(), backend)
                    sources = configured.get(backend.backend_id)
                    if sources is None and self.section.discover:
                        sources = await self._fetch_sources(state.session(), backend.url,
                                                            backend.kv_events_endpoint)
                    for source in sources or ():
                        self.ingestor.add_source(source)
                    if sources:
                        self.parity.watch(backend.backend_id)
                    done.add(backend.backend_id)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # the backend is not up yet: ask again later
                    log.debug("KV event sources of %s: %s", backend.url, exc)
            done &= {b.backend_id for b in state.pool}
            await asyncio.sleep(self.section.discover_interval_s)

    async def _follow_health(self, state: Any) -> None:
        """Forget what an unhealthy backend held; resubscribe (and replay) when it recovers.

        A backend that fails its health checks has most likely lost its KV cache (crash, OOM,
        restart) and, restarted, announces nothing until new blocks are stored: believing its
        old blocks would send prefix traffic to an empty cache. So its index entries are purged
        at once and its event streams dropped. When it is healthy again, discovery subscribes
        anew and replays from 0: after a mere network blip the engine's buffer restores what it
        still holds; after a restart the buffer is the new, empty life.
        """
        was_healthy: dict[BackendId, bool] = {}
        while True:
            for backend in list(state.pool):
                backend_id = backend.backend_id
                if was_healthy.get(backend_id, True) and not backend.healthy:
                    if backend_id in self._subscribed or backend.kv_events:
                        log.warning("backend %s is unhealthy (%s): forgetting its cached blocks",
                                    backend_id, backend.health_problem or "failing requests")
                        self._subscribed.discard(backend_id)
                        if self.ingestor is not None:
                            self.ingestor.remove_backend(backend_id)
                        self.index.remove_backend(backend_id)
                        self.parity.remove_backend(backend_id)
                        backend.kv_events = False
                was_healthy[backend_id] = backend.healthy
            await asyncio.sleep(0.25)

    def _configured_sources(self) -> dict[BackendId, list[KvEventSource]]:
        out: dict[BackendId, list[KvEventSource]] = {}
        for entry in self.section.sources:
            source = KvEventSource.for_backend(entry.backend, entry.endpoint,
                                               entry.replay_endpoint, entry.topic,
                                               self.section.bind)
            out.setdefault(source.backend_id, []).append(source)
        for backend_config in self.config.backends:
            url = backend_config.url.rstrip("/")
            if backend_config.kv_events_endpoint and url not in out and not self.section.discover:
                out[url] = [KvEventSource.for_backend(url, backend_config.kv_events_endpoint,
                                                      None, "", self.section.bind)]
        return out

    async def _fetch_models(self, session: aiohttp.ClientSession, backend: Any) -> None:
        async with session.get(f"{backend.url}/v1/models",
                               timeout=aiohttp.ClientTimeout(total=5)) as response:
            response.raise_for_status()
            data = (await response.json()).get("data") or []
        backend.discovered_models = {m["id"]: m for m in data if isinstance(m, dict) and "id" in m}

    async def _fetch_sources(self, session: aiohttp.ClientSession, url: str,
                             endpoint: str | None) -> list[KvEventSource]:
        async with session.get(f"{url}/kv_event_sources",
                               timeout=aiohttp.ClientTimeout(total=5)) as response:
            if response.status == 404:
                return self._endpoint_only(url, endpoint)
            response.raise_for_status()
            sources = parse_event_sources(url, await response.json())
        if self.section.bind:
            sources = [_with_bind(s, self.section.bind) for s in sources]
        return sources or self._endpoint_only(url, endpoint)

    def _endpoint_only(self, url: str, endpoint: str | None) -> list[KvEventSource]:
        if endpoint is None:
            return []
        return [KvEventSource.for_backend(url, endpoint, None, "", self.section.bind)]


def tokenizer_coverage(tokenizers: Mapping[str, object],
                       served: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Warnings for tokenizers no backend serves and served base models without a tokenizer
    (with no tokenizer at all, ``build_kv`` has said so already at start)."""
    names = ", ".join(sorted(served))
    bases = {str(e.get("parent") or m) for m, e in served.items()}
    lines = [f"tokenizer for model {name!r} (--model-tokenizer / models.{name}.tokenizer) "
             f"matches no served model; the backends serve: {names}"
             for name in sorted(tokenizers) if name not in served and name not in bases]
    if tokenizers:
        lines += [f"model {model!r} has no tokenizer: its prompts are estimated from characters "
                  "and kv_aware routes it in approximate mode (add --model-tokenizer "
                  f"{model}=DIR or models.{model}.tokenizer)"
                  for model in sorted(bases) if model not in tokenizers]
    return lines


def _with_bind(source: KvEventSource, bind: str) -> KvEventSource:
    return KvEventSource(source.backend_id, source.endpoint, source.replay_endpoint, source.topic,
                         source.host, bind, source.engine_binds)


def build_kv(config: Config, tokenizer_dirs: Mapping[str, str] | None = None,
             environ: Mapping[str, str] | None = None) -> KvPlumbing:
    """Load tokenizers now, so a bad path is a start-up config error."""
    section = config.kv_events or KvEventsConfig()
    dirs = {name: m.tokenizer for name, m in config.models.items() if m.tokenizer}
    dirs.update(tokenizer_dirs or {})
    tokenizers = {}
    for name, source in dirs.items():
        try:
            tokenizers[name] = ModelTokenizer(load_tokenizer(source),
                                              cache_tokens=section.tokenizer_cache_tokens)
            tokenizers[name].warm()
        except ValueError as exc:
            where = (f"--model-tokenizer {name}" if tokenizer_dirs and name in tokenizer_dirs
                     else f"models.{name}.tokenizer")
            raise ConfigError(where, str(exc)) from None
    if not tokenizers:
        log.warning("no tokenizer configured (models.<name>.tokenizer or --model-tokenizer): "
                    "approximate mode: prompts are estimated from characters, engine KV events "
                    "cannot be matched, and kv_aware remembers where it sent each prefix")
    return KvPlumbing(config, section, tokenizers, environ)
