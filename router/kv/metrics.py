"""Prometheus metrics of the router's KV plumbing: event ingestion, freshness, tokenizing,
parity and engine scraping, registered in the app's own ``CollectorRegistry``.

Must not import aiohttp, zmq or other ``router`` modules except ``router.hot_metrics``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from router.hot_metrics import HotCounter, HotHistogram

__all__ = ["KvMetrics"]

# Event lag spans sub-millisecond (same host) to seconds (a stalled subscriber).
_LAG_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                  5.0, 10.0)


class KvMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.registry = r
        # Updated for every KV-event batch, on the event loop's thread (router.kv.events):
        # lock-free (router.hot_metrics). With prometheus-client's, a batch's label lookups,
        # locked increments and histogram observation were ~3.5% of kv_aware's CPU in a
        # streamed quality cell (py-spy, bench/README.md).
        self.events = HotCounter(
            "kvrouter_kv_events", "KV events applied to the prefix index, by backend and type.",
            ["backend", "type"], r,
        )
        self.malformed = Counter(
            "kvrouter_kv_events_malformed",
            "KV-event messages (or events inside them) that could not be decoded; skipped.",
            ["backend"], registry=r,
        )
        self.lag = HotHistogram(
            "kvrouter_kv_event_lag_seconds",
            "Engine timestamp of a KV-event batch received live to the moment it is applied "
            "to the index (replayed batches are in kvrouter_kv_event_replayed_batches).",
            ["backend"], r, _LAG_BUCKETS_S,
        )
        self.replayed = Counter(
            "kvrouter_kv_event_replayed_batches",
            "KV-event batches applied from a replay socket (late join, gaps, reconnects).",
            ["backend"], registry=r,
        )
        self.resyncs = Counter(
            "kvrouter_kv_event_resyncs",
            "Streams restarted from a held message after replays could not reach it (e.g. a "
            "sequence number far ahead); the backend's index entries were cleared.",
            ["backend"], registry=r,
        )
        self.gaps = Counter(
            "kvrouter_kv_event_gaps", "Sequence gaps seen in a backend's KV-event stream.",
            ["backend"], registry=r,
        )
        self.unrecovered = Counter(
            "kvrouter_kv_event_gaps_unrecovered",
            "Gaps the replay socket could not fill (its buffer had moved on); the backend's "
            "index entries were cleared.", ["backend"], registry=r,
        )
        self.replays = Counter(
            "kvrouter_kv_event_replays", "Replay requests sent, by backend and outcome.",
            ["backend", "outcome"], registry=r,
        )
        self.restarts = Counter(
            "kvrouter_kv_event_engine_restarts",
            "Sequence resets (engine restarts); the backend's index entries were cleared.",
            ["backend"], registry=r,
        )
        self.refused = Counter(
            "kvrouter_kv_event_connections_refused",
            "Connections to an event socket the router binds from an address that is not a "
            "backend's (nothing they send is read).", registry=r,
        )
        self.unknown_topic = Counter(
            "kvrouter_kv_events_unknown_topic", "Messages whose topic matches no configured "
            "source.", registry=r,
        )
        self.warm_starts = Counter(
            "kvrouter_kv_warm_starts",
            "Start-ups with warm start on: warm (a sibling's index snapshot was loaded) or "
            "cold (no sibling answered in time).", ["outcome"], registry=r,
        )
        self.warm_restored = Gauge(
            "kvrouter_kv_warm_start_restored_entries",
            "(block, backend) pairs loaded from a sibling's index snapshot at start-up.",
            registry=r,
        )
        self.warm_uncovered = Counter(
            "kvrouter_kv_warm_start_uncovered_streams",
            "Streams whose engine replay buffer no longer reached the snapshot's position: the "
            "snapshot's blocks were kept (the engine's later events correct them), but what "
            "the engine evicted in between stays in the index until evicted there.",
            ["backend"], registry=r,
        )
        self.snapshots_served = Counter(
            "kvrouter_kv_snapshots_served", "Index snapshots served to siblings.", registry=r,
        )
        self.index_entries = Gauge(
            "kvrouter_index_entries", "(block, backend) pairs in the prefix index.", registry=r,
        )
        self.index_bytes = Gauge(
            "kvrouter_index_bytes", "Estimated memory of the prefix index.", registry=r,
        )
        self.tokenize_fallback = Counter(
            "kvrouter_tokenize_fallback",
            "Requests routed on a character estimate (no tokenizer for the model, or a prompt "
            "the tokenizer rejected), by model.", ["model"], registry=r,
        )
        # Updated for every tokenized request, on the event loop's thread (the analyzer):
        # lock-free (router.hot_metrics), ~2 us a request less than prometheus-client's.
        seconds = HotHistogram(
            "kvrouter_tokenize_seconds", "Time to tokenize and hash one prompt (thread pool).",
            [], r, (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25),
        )
        self.tokenize_seconds = seconds.labels()
        self.tokenize_reused = HotCounter(
            "kvrouter_tokenize_reused_tokens",
            "Prompt tokens served from the tokenizer's prefix cache instead of encoded.",
            ["model"], r,
        )
        # Per stored-block batch, from the event ingestion on the loop's thread: lock-free too.
        self.parity_checked = HotCounter(
            "kvrouter_token_parity_checked_blocks",
            "Engine-stored blocks compared with the router's own blocks for the same request.",
            ["model"], r,
        )
        self.parity_mismatch = HotCounter(
            "kvrouter_token_parity_mismatch",
            "Engine-stored blocks that differ from what the router computed for the request "
            "(a wrong chat template or tokenizer).", ["model"], r,
        )
        self.scrape_errors = Counter(
            "kvrouter_engine_scrape_errors", "Failed /metrics scrapes of backends.",
            ["backend"], registry=r,
        )
        self.scrape_age = Gauge(
            "kvrouter_engine_scrape_age_seconds", "Seconds since the backend's last good scrape.",
            ["backend"], registry=r,
        )
        self._hot: tuple[HotHistogram | HotCounter, ...] = (
            seconds, self.tokenize_reused, self.events, self.lag,
            self.parity_checked, self.parity_mismatch)

    def collectors(self) -> list[Any]:
        """Every metric, to register in another registry (the app's)."""
        return [*(v for v in vars(self).values() if isinstance(v, Counter | Gauge | Histogram)),
                *self._hot]

    def watch_index(self, entries: Callable[[], float], nbytes: Callable[[], float]) -> None:
        """Read the index size at scrape time instead of after every event."""
        self.index_entries.set_function(entries)
        self.index_bytes.set_function(nbytes)
