"""Config validation (one line naming the key path), env overrides, CLI precedence, and
`kvrouter serve` end to end as a real process."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

import pytest
from ports import free_port

from router.cli import add_arguments, build_config
from router.config import ConfigError, apply_env, load_config, parse_config

ROOT = Path(__file__).resolve().parent.parent

INVALID = [
    ({"policy": {"name": "round_robin", "params": {"weight": 1}}},
     "policy.params.weight: unknown key"),
    ({"policy": {"name": "nope"}}, "policy.name: unknown policy 'nope'"),
    ({"backends": ["http://a:1", {"url": 5}]}, "backends[1].url: expected a string"),
    ({"backends": ["http://a:1", {"url": "ftp://x"}]}, "backends[1].url: expected an http://"),
    ({"backends": [{"role": "mixed"}]}, "backends[0].url: required"),
    ({"backends": [{"url": "http://a:1", "role": "boss"}]}, "backends[0].role: expected one of"),
    ({"backends": [{"url": "http://a:1", "engine": "tgi"}]}, "backends[0].engine: expected one of"),
    ({"backends": ["http://a:1", "http://a:1/"]}, "backends[1].url: duplicate"),
    ({"backends": {"url": "http://a:1"}}, "backends: expected a list"),
    ({"server": {"port": "80"}}, "server.port: expected an integer"),
    ({"server": {"port": 70000}}, "server.port: expected 0..65535"),
    ({"server": {"log_level": "loud"}}, "server.log_level: expected one of"),
    ({"server": {"max_body_bytes": 0}}, "server.max_body_bytes: must be > 0"),
    ({"server": {"body_timeout_s": 0}}, "server.body_timeout_s: must be > 0"),
    ({"server": {"body_timeout_s": "slow"}}, "server.body_timeout_s: expected a number"),
    ({"server": {"max_body_bytes": 2000, "max_buffered_body_bytes": 1000}},
     "server.max_buffered_body_bytes: must be >= server.max_body_bytes (2000)"),
    ({"health": {"interval_s": "fast"}}, "health.interval_s: expected a number"),
    ({"health": {"timeout_s": -1}}, "health.timeout_s: must be > 0"),
    ({"retries": {"max_attempts": 0}}, "retries.max_attempts: must be > 0"),
    ({"retries": {"jitter_ratio": 2}}, "retries.jitter_ratio: must be <= 1"),
    ({"upstream": {"first_byte_timeout_s": 0}}, "upstream.first_byte_timeout_s: must be > 0"),
    ({"models": {"tiny": {"block_size": 0}}}, "models.tiny.block_size: must be > 0"),
    ({"models": {"tiny": {"tokeniser": "x"}}}, "models.tiny.tokeniser: unknown key"),
    ({"serverr": {}}, "serverr: unknown section"),
    ({"kv_events": [1]}, "kv_events: expected a mapping"),
    ([1, 2], "<root>: expected a mapping"),
]


@pytest.mark.parametrize(("raw", "message"), INVALID, ids=[m.split(":")[0] + "-" + str(i)
                                                           for i, (_, m) in enumerate(INVALID)])
def test_invalid_config_names_the_key_path(raw, message):
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    text = str(info.value)
    assert text.startswith(message)
    assert "\n" not in text


def test_example_config_is_valid_and_documented():
    config = load_config(ROOT / "config.example.yaml")
    assert [b.url for b in config.backends] == ["http://127.0.0.1:8001", "http://127.0.0.1:8002"]
    assert config.server.max_body_bytes == 32 * 1024 * 1024
    # Every key line of the example carries a comment saying what it is.
    for line in (ROOT / "config.example.yaml").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            assert "#" in line, line


def test_defaults():
    config = parse_config({"backends": ["http://a:1/"]})
    assert config.backends[0].url == "http://a:1"
    assert config.policy.name == "kv_aware"  # the product's policy is the default
    assert config.kv_events is None  # absent section: no KV plumbing asked for


@pytest.mark.parametrize(
    ("environ", "port", "level", "error"),
    [
        ({}, 8080, "info", None),
        ({"KVROUTER_PORT": "9000"}, 9000, "info", None),
        ({"KVROUTER_LOG_LEVEL": "DEBUG"}, 8080, "debug", None),
        ({"KVROUTER_PORT": "ninety"}, 0, "", "KVROUTER_PORT: expected a port number"),
        ({"KVROUTER_LOG_LEVEL": "chatty"}, 0, "", "KVROUTER_LOG_LEVEL: expected one of"),
    ],
    ids=["none", "port", "level", "bad-port", "bad-level"],
)
def test_env_overrides(environ, port, level, error):
    if error:
        with pytest.raises(ConfigError, match=error):
            apply_env(parse_config({}), environ)
        return
    config = apply_env(parse_config({}), environ)
    assert (config.server.port, config.server.log_level) == (port, level)


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_flags_override_file_and_env(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("server: {port: 7000}\nbackends: [http://f:1]\n"
                    "policy: {name: round_robin}\n")
    config = build_config(_args("--config", str(path)), {"KVROUTER_PORT": "7100"})
    assert config.server.port == 7100 and [b.url for b in config.backends] == ["http://f:1"]
    config = build_config(
        _args("--config", str(path), "--port", "7200", "--backend", "http://x:1",
              "--prefill", "http://p:1", "--decode", "http://d:1", "--policy", "round_robin",
              "--log-level", "warning"),
        {"KVROUTER_PORT": "7100"},
    )
    assert config.server.port == 7200 and config.server.log_level == "warning"
    assert [(b.url, b.role) for b in config.backends] == [
        ("http://x:1", "mixed"), ("http://p:1", "prefill"), ("http://d:1", "decode")]


def test_flags_alone_need_no_file():
    config = build_config(_args("--backend", "http://x:1", "--port", "0"), {})
    assert config.server.host == "127.0.0.1" and config.server.port == 0


async def test_serve_process_proxies_and_rejects_bad_config(start_backend, http, tmp_path):
    backend = await start_backend(name="a")
    port = free_port()
    path = tmp_path / "c.yaml"
    path.write_text(f"backends: [{backend.url}]\n")
    env = os.environ | {"KVROUTER_LOG_LEVEL": "warning"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kvrouter.cli", "serve", "--config", str(path), "--port", str(port),
        env=env, stderr=asyncio.subprocess.PIPE,
    )
    try:
        for _ in range(300):
            try:
                async with http.get(f"http://127.0.0.1:{port}/health"):
                    break
            except OSError:
                await asyncio.sleep(0.1)
        async with http.post(f"http://127.0.0.1:{port}/v1/completions",
                             json={"model": "tiny", "prompt": "hi"}) as response:
            assert response.status == 200
            assert response.headers["x-kvrouter-backend"] == backend.url
    finally:
        process.terminate()
        assert await asyncio.wait_for(process.wait(), 30) == 0

    path.write_text("policy: {name: round_robin, params: {weight: x}}\n")
    bad = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kvrouter.cli", "serve", "--config", str(path),
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(bad.communicate(), 60)
    assert bad.returncode == 2
    lines = stderr.decode().strip().splitlines()
    assert lines == ["kvrouter serve: config error: policy.params.weight: unknown key (known: )"]
