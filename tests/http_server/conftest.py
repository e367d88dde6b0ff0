"""The HTTP server's cases run on both event loops: the router serves on uvloop by default,
and uvloop's transports differ from asyncio's in flow control, half-close and buffer
accounting. (A hook here, not in ``tests/conftest.py``, so only this directory's tests are
doubled.)"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

import pytest
import uvloop


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
