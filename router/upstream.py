"""The HTTP client side: one shared aiohttp ``ClientSession`` to every backend.

One session per app, created in the app's start-up and closed in its clean-up, with a
keep-alive connector so the hot path never opens a connection it could reuse. Bodies travel
as bytes both ways: no automatic decompression and no re-serialization, so what the client
sent is what the backend gets. Must not import other ``router`` modules except
``router.config``.
"""

from __future__ import annotations

from collections.abc import Iterable

import aiohttp
from multidict import CIMultiDict

from router.config import UpstreamConfig

__all__ = [
    "HOP_BY_HOP",
    "client_session",
    "request_headers",
    "response_headers",
]

# Headers that describe one connection, not the message (RFC 9110 7.6.1), plus those aiohttp
# recomputes for the body it sends (content-length) or that would otherwise be duplicated.
HOP_BY_HOP = frozenset(
    {
        "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
        "trailer", "trailers", "transfer-encoding", "upgrade", "host", "content-length",
    }
)
_DROP_FROM_RESPONSE = HOP_BY_HOP | {"server", "date"}


def client_session(config: UpstreamConfig) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(
        limit=config.max_connections,
        limit_per_host=0,
        keepalive_timeout=60.0,
        ttl_dns_cache=300,
        enable_cleanup_closed=False,
    )
    return aiohttp.ClientSession(
        connector=connector,
        auto_decompress=False,
        # Timeouts are set per request (first byte, then idle reads); none for the session.
        timeout=aiohttp.ClientTimeout(total=None),
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
        cookie_jar=aiohttp.DummyCookieJar(),
    )


def request_headers(items: Iterable[tuple[str, str]], request_id: str) -> CIMultiDict[str]:
    """The client's headers minus hop-by-hop ones, with ``x-request-id`` set."""
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in items:
        if name.lower() not in HOP_BY_HOP:
            out.add(name, value)
    out["x-request-id"] = request_id
    return out


def response_headers(items: Iterable[tuple[str, str]]) -> CIMultiDict[str]:
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in items:
        if name.lower() not in _DROP_FROM_RESPONSE:
            out.add(name, value)
    return out
