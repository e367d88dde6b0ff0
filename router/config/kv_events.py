"""The ``kv_events`` config section, as values: KV-event ingestion, scraping and tokenizing.

    kv_events:
      bind: tcp://10.0.0.2:5557       # the router binds here (its pod IP) for engines that
                                      # connect out; only backends' addresses are let in
      sources:                        # explicit sources (else each backend's /kv_event_sources)
        - {backend: http://10.0.0.7:8000, endpoint: "tcp://*:5557",
           replay_endpoint: "tcp://*:5558", topic: "kv@pod-7"}
      discover: true                  # ask backends without sources for /kv_event_sources
      replay: true                    # replay from 0 when a source is added (late join)
      enabled: true                   # false: subscribe to no engine; the index learns from
                                      # the router's own dispatches (tokenizing and scraping
                                      # stay on)

``parse_kv_events`` runs once, when ``router.config.root`` loads the file: ``None`` when the section
is absent (its presence alone turns the KV plumbing on), else a ``KvEventsConfig`` whose
``sources`` are typed entries. ``router.setup.kv`` takes the parsed value. Errors are one line
naming the key path (``kv_events.sources[0].endpoint: required``).

Imports only ``policies`` (the config room's rule).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

from policies.params import ParamError, parse_params

__all__ = ["KvEventSourceConfig", "KvEventsConfig", "parse_kv_events"]


@dataclass(frozen=True, slots=True)
class KvEventSourceConfig:
    """One configured event stream of a backend (a data-parallel rank has its own)."""

    backend: str
    endpoint: str
    replay_endpoint: str | None = None
    topic: str = ""


@dataclass(frozen=True, slots=True)
class KvEventsConfig:
    enabled: bool = True
    bind: str | None = None
    authenticate: bool = True
    allow_from: tuple[str, ...] = ()
    sources: tuple[KvEventSourceConfig, ...] = ()
    discover: bool = True
    discover_interval_s: float = 5.0
    replay: bool = True
    replay_timeout_s: float = 5.0
    max_gap_replays: int = 3
    replay_backoff_s: float = 0.5
    index_max_entries: int = 2_000_000
    scrape: bool = True
    scrape_interval_s: float = 2.0
    scrape_timeout_s: float = 2.0
    tokenizer_threads: int = 2
    tokenizer_cache_tokens: int = 1_000_000
    parity_ttl_s: float = 30.0
    chars_per_token: float = 4.0


def parse_kv_events(raw: object) -> KvEventsConfig | None:
    """The ``kv_events`` section, ``None`` when absent; raises ParamError."""
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise ParamError("kv_events", "expected a mapping")
    section = parse_params(KvEventsConfig, raw, "kv_events")
    for name in ("max_gap_replays", "replay_backoff_s"):
        if getattr(section, name) < 0:
            raise ParamError(f"kv_events.{name}", "must be >= 0")
    # A backend is named by its URL without the trailing slash everywhere (pool, index).
    sources = tuple(dataclasses.replace(s, backend=s.backend.rstrip("/")) for s in section.sources)
    return dataclasses.replace(section, sources=sources)
