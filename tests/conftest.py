"""Shared test fixtures: fake OpenAI backends and routers (``tests/fake_backend.py``)."""

from __future__ import annotations

import os

from kvrouter import native

# The compiled request path (kvrouter.native) only when asked for: `KVROUTER_NATIVE=1 pytest`
# runs the suite on a current `make native` build (and fails here without one); otherwise the
# Python sources, in this process and in every kvrouter the tests start, whatever is built.
if os.environ.get("KVROUTER_NATIVE") == "1":
    _modules, _why = native.enable()
    if not _modules:
        raise RuntimeError(f"KVROUTER_NATIVE=1 but {_why}")
else:
    os.environ["KVROUTER_NATIVE"] = "0"

# (imported after the native build is enabled or not)
import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import aiohttp
import pytest
import uvloop
from aiohttp import web
from fake_backend import FakeBackend, RouterHandle

from router.app import Runner, create_app, serve
from router.config import Config, parse_config

# The router serves on uvloop by default, and uvloop's transports differ from asyncio's in flow
# control, half-close and buffer accounting: the cases of the HTTP layer and the proxy run on
# both loops; everything else on asyncio's.
_ON_BOTH_LOOPS = frozenset({"test_http_server.py", "test_proxy_basic.py", "test_client_input.py",
                            "test_proxy_errors.py", "test_fuzz_http.py"})


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    if item.path.name in _ON_BOTH_LOOPS:
        return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
    return {"asyncio": asyncio.new_event_loop}


@pytest.fixture
async def start_backend() -> AsyncIterator[Callable[..., Awaitable[FakeBackend]]]:
    backends: list[FakeBackend] = []

    async def start(**knobs: Any) -> FakeBackend:
        backend = FakeBackend(**knobs)
        runner = web.AppRunner(backend.app(), handler_cancellation=True, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        backend.runner = runner
        backend.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        backends.append(backend)
        return backend

    yield start
    for backend in backends:
        await backend.stop()


@pytest.fixture
async def start_router() -> AsyncIterator[Callable[..., Awaitable[RouterHandle]]]:
    """``await start_router({"backends": [...], ...}, **create_app_kwargs)``.

    A raw config without a ``policy`` section gets round_robin, not the product's default
    (kv_aware): these tests predict which backend each request reaches. Nor does it pre-open
    connections (``upstream.preconnect`` 0) unless it says so: these tests count connections
    and stop backends right after a health round, and aiohttp's server on uvloop waits its
    60 s shutdown timeout for a connection accepted while it stops (tests/test_preconnect.py
    covers the feature)."""
    runners: list[Runner] = []

    async def start(raw: dict[str, Any] | Config, **kwargs: Any) -> RouterHandle:
        if isinstance(raw, dict) and "policy" not in raw:
            raw = {**raw, "policy": {"name": "round_robin"}}
        if isinstance(raw, dict) and "preconnect" not in raw.get("upstream", {}):
            raw = {**raw, "upstream": {**raw.get("upstream", {}), "preconnect": 0}}
        config = raw if isinstance(raw, Config) else parse_config(raw)
        app = create_app(config, **kwargs)
        runner, port = await serve(app, "127.0.0.1", 0)
        runners.append(runner)
        return RouterHandle(f"http://127.0.0.1:{port}", app.state, app)

    yield start
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        yield session
