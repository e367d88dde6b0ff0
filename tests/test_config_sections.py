"""The sections of the rooms (``kv_events``, ``discovery``, ``disaggregation``) and the closed
sets of strings (roles, engines, modes, log levels): parsed once, when the config loads, into
frozen dataclasses with Enums; a bad value anywhere is one line naming its key path; the
chart's schema accepts every key the router reads; the KV plumbing follows the policy's
declared capability, not its name."""

from __future__ import annotations

import dataclasses
import enum
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from policies.disaggregation import DisaggregationParams
from policies.round_robin import RoundRobin
from policies.types import EngineKind, Role
from router.config import ConfigError, EventLoop, LogLevel, load_config, parse_config
from router.config.disaggregation import DisaggConfig, DisaggregationConfig
from router.config.discovery import (
    AddressFamily,
    DiscoveryConfig,
    DiscoveryMode,
    DnsParams,
    KubernetesParams,
)
from router.config.kv_events import KvEventsConfig, KvEventSourceConfig
from router.config_schema import config_schema
from router.setup.kv import wants_kv

SOURCE = {"backend": "http://a:1", "endpoint": "tcp://*:5557"}

INVALID = [
    ({"kv_events": {"replay_timeout": 3}}, "kv_events.replay_timeout: unknown key"),
    ({"kv_events": {"scrape": "yes"}}, "kv_events.scrape: expected true or false"),
    ({"kv_events": {"max_gap_replays": -1}}, "kv_events.max_gap_replays: must be >= 0"),
    ({"kv_events": {"allow_from": "10.0.0.1"}}, "kv_events.allow_from: expected a list"),
    ({"kv_events": {"sources": [{"backend": 5}]}},
     "kv_events.sources[0].backend: expected a string"),
    ({"kv_events": {"sources": [SOURCE, {"backend": "http://b:1"}]}},
     "kv_events.sources[1].endpoint: required"),
    ({"kv_events": {"sources": [{**SOURCE, "topik": "kv"}]}},
     "kv_events.sources[0].topik: unknown key"),
    ({"kv_events": {"sources": ["tcp://x:1"]}}, "kv_events.sources[0]: expected a mapping"),
    ({"kv_events": [1]}, "kv_events: expected a mapping"),
    ({"kv_events": {"enabled": "no"}}, "kv_events.enabled: expected true or false"),
    ({"kv_events": {"enabled": False}, "server": {"admin_token": "t"},
      "sync": {"peers": ["tcp://10.0.0.2:5601"], "warm_start": {"enabled": True}}},
     "sync.warm_start.enabled: warm start restores the index that KV events keep current"),
    ({"discovery": "kubernetes"}, "discovery: expected a mapping"),
    ({"discovery": {"mode": "consul"}},
     "discovery.mode: expected one of static, dns, kubernetes"),
    ({"discovery": {"mode": "kubernetes", "kubernetes": {"label_selector": 5}}},
     "discovery.kubernetes.label_selector: expected a string"),
    ({"discovery": {"mode": "kubernetes", "kubernetes": {"engine": "tgi"}}},
     "discovery.kubernetes.engine: expected one of vllm, sglang"),
    ({"discovery": {"mode": "kubernetes", "kubernetes": {"port": 0}}},
     "discovery.kubernetes: port must be in 1..65535"),
    ({"discovery": {"mode": "dns", "dns": {"name": "x", "address_family": "ipx"}}},
     "discovery.dns.address_family: expected one of ipv4, ipv6, any"),
    ({"discovery": {"mode": "dns", "dns": {"name": "x", "role": "boss"}}},
     "discovery.dns.role: expected one of mixed, prefill, decode"),
    ({"discovery": {"mode": "dns", "dns": {"port": 80}}}, "discovery.dns: name is required"),
    ({"discovery": {"mode": "dns", "seed": "x"}}, "discovery.seed: expected an integer"),
    ({"disaggregation": [1]}, "disaggregation: expected a mapping"),
    ({"disaggregation": {"min_uncached_tokens": "many"}},
     "disaggregation.min_uncached_tokens: expected an integer"),
    ({"disaggregation": {"prefill_timeout_s": "slow"}},
     "disaggregation.prefill_timeout_s: expected a number"),
    ({"disaggregation": {"prefill_timeout_s": 0}},
     "disaggregation: prefill_timeout_s must be > 0"),
    ({"disaggregation": {"bandwidth": 1}}, "disaggregation.bandwidth: unknown key"),
    ({"disaggregation": {"bootstrap_ports": {"http://p:1": "x"}}},
     "disaggregation.bootstrap_ports.http://p:1: expected an integer"),
    ({"server": {"event_loop": "trio"}},
     "server.event_loop: expected one of auto, asyncio, uvloop"),
    ({"server": {"log_level": 10}}, "server.log_level: expected one of debug, info"),
    ({"backends": [{"url": "http://a:1", "role": 1}]},
     "backends[0].role: expected one of mixed, prefill, decode"),
]


@pytest.mark.parametrize(("raw", "message"), INVALID,
                         ids=[f"{m.split(':')[0]}-{i}" for i, (_, m) in enumerate(INVALID)])
def test_a_bad_value_in_any_section_is_one_line_naming_its_key(raw: Any, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    text = str(info.value)
    assert text.startswith(message), text
    assert "\n" not in text


def test_sections_are_parsed_at_load_into_typed_values(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "server: {log_level: WARNING, event_loop: asyncio}\n"
        "backends: [{url: 'http://d:1', role: decode, engine: sglang}]\n"
        "kv_events:\n"
        "  sources: [{backend: 'http://a:1/', endpoint: 'tcp://*:5557', topic: kv}]\n"
        "discovery: {mode: dns, dns: {name: svc, role: prefill, address_family: any}, seed: 7}\n"
        "disaggregation: {min_uncached_tokens: 256, prefill_timeout_s: 5, fallback_to_local: false}\n")
    config = load_config(path)
    assert config.server.log_level is LogLevel.WARNING
    assert config.server.event_loop is EventLoop.ASYNCIO
    (backend,) = config.backends
    assert backend.role is Role.DECODE and backend.engine is EngineKind.SGLANG
    assert config.kv_events is not None
    assert config.kv_events.sources == (KvEventSourceConfig("http://a:1", "tcp://*:5557",
                                                            topic="kv"),)
    discovery = config.discovery
    assert discovery.mode is DiscoveryMode.DNS and discovery.seed == 7
    assert discovery.dns is not None and discovery.kubernetes is None
    assert discovery.dns.role is Role.PREFILL
    assert discovery.dns.address_family is AddressFamily.ANY
    assert config.disaggregation == DisaggregationConfig(
        DisaggConfig(prefill_timeout_s=5.0, fallback_to_local=False),
        DisaggregationParams(min_uncached_tokens=256))


def test_absent_sections_get_their_defaults_and_only_the_chosen_mode_is_read() -> None:
    config = parse_config({})
    assert config.kv_events is None
    assert config.discovery == DiscoveryConfig(DiscoveryMode.STATIC)
    assert config.disaggregation == DisaggregationConfig()
    # As before the sections were typed: the subsection of the mode not chosen is not read.
    config = parse_config({"discovery": {"mode": "kubernetes", "dns": {"port": "x"}}})
    assert config.discovery.kubernetes == KubernetesParams() and config.discovery.dns is None


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def test_the_chart_schema_accepts_every_key_the_router_reads() -> None:
    """A config spelling out every field of every section (the dataclasses' own names, at
    their defaults) passes the chart's schema and the router's parser alike."""
    config = parse_config({"backends": ["http://a:1"], "models": {"m": {}}})
    raw = _plain(config)
    raw["kv_events"] = _plain(KvEventsConfig(sources=(KvEventSourceConfig(**SOURCE),)))
    raw["discovery"] = _plain(DiscoveryConfig(DiscoveryMode.DNS, DnsParams(name="svc"),
                                              KubernetesParams(), seed=1))
    raw["disaggregation"] = {**_plain(DisaggConfig()), **_plain(DisaggregationParams())}
    raw["server"]["admin_token"] = "secret"
    jsonschema.validate(raw, config_schema())
    assert parse_config(raw).discovery.dns == DnsParams(name="svc")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**raw, "policy": {**raw["policy"], "max_hold": 1}}, config_schema())


def test_the_kv_plumbing_follows_the_policys_capability_not_its_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert wants_kv(parse_config({"policy": {"name": "kv_aware"}}), {})
    round_robin = parse_config({"policy": {"name": "round_robin"}})
    assert not wants_kv(round_robin, {})
    assert wants_kv(parse_config({"policy": {"name": "round_robin"}, "kv_events": {}}), {})
    assert wants_kv(round_robin, {"m": "/models/m"})
    monkeypatch.setattr(RoundRobin, "uses_kv_index", True)
    assert wants_kv(round_robin, {})


@pytest.mark.parametrize(("yaml_text", "key"), [
    ("kv_events: {sources: [{backend: 'http://a:1'}]}\n", "kv_events.sources[0].endpoint"),
    ("discovery: {mode: kubernetes, kubernetes: {label_selector: [a]}}\n",
     "discovery.kubernetes.label_selector"),
    ("disaggregation: {max_decode_attempts: two}\n", "disaggregation.max_decode_attempts"),
], ids=["kv_events", "discovery", "disaggregation"])
def test_serve_refuses_a_bad_section_in_one_line(
    yaml_text: str, key: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    from kvrouter.cli import main

    path = tmp_path / "c.yaml"
    path.write_text("policy: {name: round_robin}\n" + yaml_text)
    assert main(["serve", "--config", str(path), "--backend", "http://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"kvrouter serve: config error: {key}: "), err
