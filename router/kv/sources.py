"""Where a backend's KV events come from, and which router socket takes them.

A ``KvEventSource`` is one engine's (one data-parallel rank's) KV-event publisher as the engine
was configured: its ``endpoint``, ``replay_endpoint`` and ``topic``. ``subscribe_plan`` applies
vLLM's rule (the engine's PUB binds when the endpoint has ``*`` or ``::`` or is ``ipc://`` /
``inproc://``, else it connects) to decide, per source, whether the router connects to the
engine (``*`` replaced by the backend's host) or binds the address itself; sources binding the
same address share one socket and must have distinct, non-empty topics. ``parse_event_sources``
reads an engine's ``GET /kv_event_sources`` answer.

Must not import aiohttp, zmq or ``simulator``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

__all__ = ["KvEventSource", "engine_binds", "parse_event_sources", "subscribe_plan"]


@dataclass(frozen=True, slots=True)
class KvEventSource:
    backend_id: str
    endpoint: str
    """The publisher endpoint as configured in the engine (``--kv-events-config``)."""
    replay_endpoint: str | None = None
    topic: str = ""
    host: str = "127.0.0.1"
    """The backend's host, put in place of ``*`` / ``::`` when the engine binds."""
    bind_endpoint: str | None = None
    """Where the router binds for engines that connect out (default: ``endpoint`` itself)."""
    engine_binds: bool | None = None
    """Whether the engine's PUB binds; ``None`` infers it from ``endpoint`` (vLLM's rule)."""

    def replay_address(self) -> str:
        """The replay socket is always bound by the engine: connect there."""
        assert self.replay_endpoint is not None
        return _with_host(self.replay_endpoint, self.host)

    @staticmethod
    def for_backend(url: str, endpoint: str, replay_endpoint: str | None = None,
                    topic: str = "", bind_endpoint: str | None = None) -> KvEventSource:
        host = urlsplit(url).hostname or "127.0.0.1"
        return KvEventSource(url, endpoint, replay_endpoint, topic, host, bind_endpoint)


def engine_binds(endpoint: str) -> bool:
    return ("*" in endpoint or "::" in endpoint or endpoint.startswith("ipc://")
            or endpoint.startswith("inproc://"))


def subscribe_plan(sources: list[KvEventSource]) -> list[tuple[str, bool, list[KvEventSource]]]:
    """(address, router binds?, sources on that socket); ValueError on ambiguous fan-in."""
    plan: dict[tuple[str, bool], list[KvEventSource]] = {}
    for source in sources:
        binds = engine_binds(source.endpoint) if source.engine_binds is None else source.engine_binds
        if binds:
            key = (_with_host(source.endpoint, source.host), False)
        else:
            key = (source.bind_endpoint or source.endpoint, True)
        plan.setdefault(key, []).append(source)
    for (address, _), group in plan.items():
        topics = [s.topic for s in group]
        if len(group) > 1 and ("" in topics or len(set(topics)) != len(topics)):
            raise ValueError(
                f"kv_events: sources sharing {address} need distinct non-empty topics, got "
                f"{topics}"
            )
    return [(address, bind, group) for (address, bind), group in plan.items()]


def parse_event_sources(backend_url: str, answer: Any) -> list[KvEventSource]:
    """Sources from ``GET /kv_event_sources``: a list of per-rank configs, or a map holding one
    (``sources``/``data``), or a map of rank -> config. Entries without KV events are skipped."""
    if isinstance(answer, Mapping):
        for key in ("sources", "data", "kv_event_sources"):
            if isinstance(answer.get(key), list):
                answer = answer[key]
                break
        else:
            answer = list(answer.values()) if all(
                isinstance(v, Mapping) for v in answer.values()) else [answer]
    if not isinstance(answer, list):
        raise ValueError("/kv_event_sources: expected a list of sources")
    sources = []
    for i, entry in enumerate(answer):
        if not isinstance(entry, Mapping):
            raise ValueError(f"/kv_event_sources[{i}]: expected an object")
        config = entry.get("kv_events_config", entry)
        if not isinstance(config, Mapping):
            raise ValueError(f"/kv_event_sources[{i}].kv_events_config: expected an object")
        if config.get("enable_kv_cache_events") is False or config.get("publisher") == "null":
            continue
        endpoint = config.get("endpoint")
        if not isinstance(endpoint, str) or not endpoint:
            raise ValueError(f"/kv_event_sources[{i}].endpoint: expected a string")
        replay = config.get("replay_endpoint")
        topic = config.get("topic") or ""
        rank = entry.get("data_parallel_rank", entry.get("rank", 0))
        # Per-rank entries carry the config as given; vLLM adds the rank to both ports.
        if isinstance(rank, int) and not isinstance(rank, bool) and rank > 0:
            endpoint = _add_port(endpoint, rank)
            replay = _add_port(replay, rank) if isinstance(replay, str) else replay
        sources.append(KvEventSource.for_backend(
            backend_url, endpoint, replay if isinstance(replay, str) and replay else None,
            str(topic)))
    return sources


_TCP = re.compile(r"^tcp://(?P<host>\[[^\]]*\]|[^:]*):(?P<port>\d+)$")


def _with_host(endpoint: str, host: str) -> str:
    m = _TCP.match(endpoint)
    if m is None:
        return endpoint
    if m["host"] in ("*", "[::]", "::", "0.0.0.0", ""):
        wrapped = f"[{host}]" if ":" in host else host
        return f"tcp://{wrapped}:{m['port']}"
    return endpoint


def _add_port(endpoint: str, delta: int) -> str:
    m = _TCP.match(endpoint)
    if m is None:
        return endpoint
    return f"tcp://{m['host']}:{int(m['port']) + delta}"
