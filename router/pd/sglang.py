"""SGLang's prefill/decode protocol (bootstrap rooms): the wire shape and where a prefill
backend's bootstrap server is.

Concurrent: the router adds ``bootstrap_host`` and ``bootstrap_port`` (the prefill backend's
bootstrap server, where the decode side registers for the KV) and a random ``bootstrap_room``
(the pairing key, 63 random bits from the injected RNG) to the client's request and sends the
same body to the prefill and to the decode backend at the same time; the client gets the
decode backend's response. A room pairs exactly one prefill with one decode: a decode backend
that failed cannot be replaced with the same room, so the prefill is redone with a new one.

The bootstrap server of a prefill backend is ``bootstrap_hosts[url]`` (default: the host of
its URL) and ``bootstrap_ports[url]`` (default ``bootstrap_port``, SGLang's 8998). Must not
import ``router.proxy``, ``router.pd.serving`` or ``simulator``.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from router.config.disaggregation import DEFAULT_BOOTSTRAP_PORT

__all__ = ["DEFAULT_BOOTSTRAP_PORT", "bootstrap_body", "bootstrap_of", "new_room"]


def new_room(rng: random.Random) -> int:
    # SGLang parses the room as a signed 64-bit integer in places: keep it non-negative.
    return rng.getrandbits(63)


def bootstrap_of(
    url: str, hosts: Mapping[str, str], ports: Mapping[str, int], default_port: int
) -> tuple[str, int]:
    host = hosts.get(url) or urlsplit(url).hostname or "127.0.0.1"
    return host, ports.get(url, default_port)


def bootstrap_body(body: Mapping[str, Any], host: str, port: int, room: int) -> dict[str, Any]:
    out = dict(body)
    out["bootstrap_host"] = host
    out["bootstrap_port"] = port
    out["bootstrap_room"] = room
    return out
