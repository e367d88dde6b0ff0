"""vLLM's prefill/decode protocol (NixlConnector and compatible connectors): the wire shapes
and the prefill leg, as async I/O over the proxy's upstream session.

Sequential: the prefill backend gets a copy of the request with ``max_tokens: 1`` (and
``max_completion_tokens: 1`` when the client used it), ``stream: false``, no
``stream_options`` (vLLM rejects them without streaming) and ``kv_transfer_params`` asking for
a remote decode. Its JSON response carries ``kv_transfer_params`` naming the blocks it holds
for the decode side (``remote_engine_id``, ``remote_block_ids``, ``remote_host``,
``remote_port``, ``do_remote_prefill: true``...). The decode backend then gets the client's
request with exactly that one field added. The prefill backend keeps the blocks until they are
pulled or its abort timeout passes, so a decode backend that failed before answering may be
replaced by another one with the same parameters.

``post_prefill`` (shared with ``router.pd.sglang``) sends one prefill request and reads the
whole answer, raising ``PrefillFailed`` with the reason and the error the client would get.
Transfer parameters are never logged or put in error messages. Must not import
``router.proxy``, ``router.pd.serving`` or ``simulator``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Any

import aiohttp
from multidict import CIMultiDict

from router.errors import RouterError, UpstreamConnectError, UpstreamTimeout

__all__ = [
    "REMOTE_DECODE_REQUEST",
    "PrefillFailed",
    "PrefillResult",
    "decode_body",
    "post_prefill",
    "prefill_body",
    "transfer_params_of",
]

REMOTE_DECODE_REQUEST: Mapping[str, object] = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}


class PrefillFailed(Exception):
    """The prefill leg failed. ``client_error`` means the backend rejected the request itself
    (4xx): retrying elsewhere cannot help, so ``status``/``body`` go back to the client."""

    def __init__(self, reason: str, error: RouterError, *, status: int | None = None,
                 body: bytes = b"", content_type: str = "application/json") -> None:
        super().__init__(reason)
        self.reason = reason
        self.error = error
        self.status = status
        self.body = body
        self.content_type = content_type

    @property
    def client_error(self) -> bool:
        return self.status is not None and 400 <= self.status < 500


PrefillResult = tuple[int, bytes]
"""(status, body) of a successful prefill response."""


def prefill_body(body: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(body)
    out["max_tokens"] = 1
    if "max_completion_tokens" in out:
        out["max_completion_tokens"] = 1
    out["stream"] = False
    out.pop("stream_options", None)
    out["kv_transfer_params"] = dict(REMOTE_DECODE_REQUEST)
    return out


def decode_body(body: Mapping[str, Any], transfer_params: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(body)
    out["kv_transfer_params"] = dict(transfer_params)
    return out


def transfer_params_of(response_body: bytes) -> dict[str, Any] | None:
    """The ``kv_transfer_params`` object of a prefill response, or None when absent/invalid."""
    try:
        parsed = json.loads(response_body)
    except (ValueError, UnicodeDecodeError):
        return None
    params = parsed.get("kv_transfer_params") if isinstance(parsed, dict) else None
    return params if isinstance(params, dict) and params else None


def _json_headers(headers: Mapping[str, str]) -> CIMultiDict[str]:
    out = CIMultiDict(headers)
    out["Content-Type"] = "application/json"
    return out


async def post_prefill(
    session: aiohttp.ClientSession,
    backend_id: str,
    url: str,
    body: Mapping[str, Any],
    headers: Mapping[str, str],
    timeout_s: float,
    connect_timeout_s: float,
) -> PrefillResult:
    """POST ``body`` to ``url`` and read the whole answer within ``timeout_s`` (a streamed
    answer is drained). Raises PrefillFailed; never returns a status >= 400."""
    data = json.dumps(body, separators=(",", ":")).encode()
    try:
        async with asyncio.timeout(timeout_s):
            async with session.post(
                url, data=data, headers=_json_headers(headers),
                timeout=aiohttp.ClientTimeout(total=None, connect=connect_timeout_s),
                allow_redirects=False,
            ) as response:
                payload = await response.read()
                status = response.status
                content_type = response.content_type
    except TimeoutError:
        raise PrefillFailed("timeout", UpstreamTimeout(
            f"prefill backend {backend_id} did not answer in time")) from None
    except aiohttp.ClientError as exc:
        raise PrefillFailed("connect", UpstreamConnectError(
            f"could not reach prefill backend {backend_id}: {exc.__class__.__name__}")) from None
    if status >= 400:
        raise PrefillFailed(f"status_{status}", UpstreamConnectError(
            f"prefill backend {backend_id} answered {status}"), status=status, body=payload,
            content_type=content_type)
    return status, payload
