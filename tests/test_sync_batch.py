"""Replica sync's batch frames (``router.sync.wire.encode_batch``, ``sync.batch_frames``): a
flush window's messages in one ZeroMQ frame, field names once per batch, each block-hash chain
once per batch; round trips, neighbouring versions' fields, malformed batches, and a replica
on real sockets sending one frame per window."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import pytest
from fake_backend import FakeBackend, RouterHandle
from test_router_sync import published_sends

from policies.replica_sync import Dispatch, Message, State
from policies.types import BackendScore, Decision, DecodeEstimate, Prediction, RouteRequest
from router.config import ConfigError, parse_config
from router.sync import wire
from router.sync.wire import WireError, decode_frame, encode, encode_batch
from router.workers import worker_config

DECISION = Decision("http://b", "kv_aware", 32, prefill_backend_id="http://p", scores=(
    BackendScore("http://p", 0.5, 32, prediction=Prediction(0.1, 0.05, 8.0, 40, True, 4096)),
    BackendScore("http://b", 0.2, 0, decode=DecodeEstimate(0.01, 0.15, 0.0, 3)),))


def request(n: int, chain: tuple[int, ...]) -> RouteRequest:
    return RouteRequest(request_id=f"r{n}", model="m", prompt_tokens=40, prompt_text="hi",
                        block_hashes=chain, tokens_exact=True, stream=n % 2 == 0)


def messages() -> list[Message]:
    chain = (2**64 - 1, 7, 9)
    return [Dispatch("a", 1, 10.0, 1, request(1, chain), DECISION),
            # an equal chain in another tuple (a hot prompt tokenized again)
            Dispatch("a", 2, 10.1, 2, request(2, tuple(list(chain))), DECISION),
            Dispatch("a", 3, 10.2, 3, request(3, ()), Decision("http://b", "peer")),
            State("a", 4, 10.5, 3, (("http://b", 2, 80),),
                  {"http://p": [0.1, 0.0, 8.0, 40.0, 0.05, 8.0, 72.0]}),
            State("a", 5, 11.0, 3)]  # nothing in flight, no policy state


def test_a_batch_decodes_to_the_messages_one_frame_each_gives() -> None:
    sent = messages()
    # Sender's monotonic 100 s = its unix 1000 s; the receiver's monotonic 50 s = unix 1001 s.
    clocks = {"monotonic_now_s": 100.0, "unix_now_s": 1000.0}
    here = {"monotonic_now_s": 50.0, "unix_now_s": 1001.0}
    one_each = [m for x in sent for m in decode_frame(encode(x, **clocks), **here)]
    got = decode_frame(encode_batch(sent, **clocks), **here)
    # A batch carries each dispatch as the whole answer a peer replays it as (ReplicaSync
    # sets that for a single frame on receipt); the rest is the same.
    assert [m.request.stream for m in one_each if isinstance(m, Dispatch)] == [False, True, False]
    assert got == [dataclasses.replace(m, request=dataclasses.replace(m.request, stream=False))
                   if isinstance(m, Dispatch) else m for m in one_each]
    assert got[0].sent_at_s == pytest.approx(10.0 - 100.0 + 49.0)  # type: ignore[union-attr]
    # The chain travels once and both dispatches share the one tuple decoded from it.
    body = msgpack.unpackb(encode_batch(sent, **clocks))
    assert body[4] == [[2**64 - 1, 7, 9], []]
    first, second = got[0], got[1]
    assert isinstance(first, Dispatch) and isinstance(second, Dispatch)
    assert first.request.block_hashes is second.request.block_hashes


def test_prompt_text_stays_home_when_asked() -> None:
    got = decode_frame(encode_batch(messages()[:1], monotonic_now_s=0, unix_now_s=0,
                                    prompt_text=False), monotonic_now_s=0, unix_now_s=0)
    assert isinstance(got[0], Dispatch) and got[0].request.prompt_text == ""


def test_fields_of_a_neighbouring_version_are_matched_by_name() -> None:
    body = msgpack.unpackb(encode_batch(messages()[:1], monotonic_now_s=0, unix_now_s=0))
    header, entry = body[3], body[5][0]
    # An older sender without `salted`, and a newer one with a field this replica lacks,
    # listed first (so no position matches this replica's).
    at = header["request"].index("salted")
    del header["request"][at], entry[4][at]
    header["decision"].insert(0, "future_field")
    entry[5].insert(0, 1)
    (got,) = decode_frame(msgpack.packb(body), monotonic_now_s=0, unix_now_s=0)
    assert isinstance(got, Dispatch)
    assert got.request == request(1, (2**64 - 1, 7, 9))
    assert got.decision == DECISION



def test_headers_are_remembered_by_their_bytes_and_the_memory_is_bounded() -> None:
    # The builders made from a header are kept by its bytes: every batch of one sender has the
    # same header. Headers come from the network, so at most _BUILT_MAX are kept; one past
    # that bound still decodes, built for its own frame.
    base = msgpack.unpackb(encode_batch(messages()[:1], monotonic_now_s=0, unix_now_s=0))
    wire._BUILT.clear()
    for n in range(wire._BUILT_MAX + 8):
        body = [*base[:3], {**base[3], "decision": [f"extra{n}", *base[3]["decision"]]},
                base[4], [[*base[5][0][:5], [n, *base[5][0][5]]]]]
        (got,) = decode_frame(msgpack.packb(body), monotonic_now_s=0, unix_now_s=0)
        assert isinstance(got, Dispatch) and got.decision == DECISION
    assert len(wire._BUILT) == wire._BUILT_MAX
    # A cached header still gets every check a new one gets.
    with pytest.raises(WireError):
        decode_frame(msgpack.packb([*base[:5], [["d", 1, 0.0, 1, [1, 2], []]]]),
                     monotonic_now_s=0, unix_now_s=0)
    whole = encode_batch(messages(), monotonic_now_s=0, unix_now_s=0)
    with pytest.raises(WireError, match="extra data"):
        decode_frame(whole + b"\x01", monotonic_now_s=0, unix_now_s=0)
    with pytest.raises(WireError, match=r"^not msgpack"):
        decode_frame(whole[:-3], monotonic_now_s=0, unix_now_s=0)  # truncated
    # The frame's own errors keep their words (WireError is a ValueError, as msgpack's are).
    with pytest.raises(WireError, match=r"^batch version 1"):
        decode_frame(_batch(v1=1), monotonic_now_s=0, unix_now_s=0)

def _batch(**change: Any) -> bytes:
    body = msgpack.unpackb(encode_batch(messages(), monotonic_now_s=0, unix_now_s=0))
    for key, value in change.items():
        body[int(key[1:])] = value
    return msgpack.packb(body)  # type: ignore[no-any-return]


@pytest.mark.parametrize("data", [
    _batch(v1=1),  # an earlier batch version (finishes and heartbeats, not states)
    _batch(v1=3),  # a later one
    _batch(v2=7),  # origin
    _batch(v4=[[1, 2], "x"]),  # a chain that is no list
    _batch(v4=[]),  # dispatches naming chains the batch lacks
    _batch(v5=[["d", 1, 0.0, 1, [1, 2], []]]),  # too few values
    _batch(v5=[["x", 1, 0.0, 1, 0]]),  # unknown kind
    _batch(v5=[["f", 1, 0.0, 1, True]]),  # a version-1 finish
    _batch(v5=[["s", 1, 0.0, 1, [[1, 2, 3]], None]]),  # state: backend is no string
    _batch(v5=[["s", 1, 0.0, 1, [], {"http://b": 3}]]),  # state: shared numbers are no list
    _batch(v5=[["s", 1, 0.0, 1, []]]),  # state: too few values
    _batch(v3={}),  # no field names
], ids=["version-1", "version-3", "origin", "chain", "chain-index", "values", "kind", "finish",
        "state-load", "state-shared", "state-short", "header"])
def test_malformed_batches_raise_wire_error(data: bytes) -> None:
    with pytest.raises(WireError):
        decode_frame(data, monotonic_now_s=0, unix_now_s=0)


def test_batch_frames_config_and_workers() -> None:
    assert parse_config({"sync": {"batch_frames": True}}).sync.batch_frames is True
    assert parse_config({}).sync.batch_frames is False  # pods: older replicas read no batches
    with pytest.raises(ConfigError, match=r"^sync\.batch_frames"):
        parse_config({"sync": {"batch_frames": "yes"}})
    # `serve --workers`: siblings run one version, so they always send batches.
    config = worker_config(parse_config({}), 0, 2, Path("/tmp/run"), 8000)
    assert config.sync.batch_frames is True


async def test_a_replica_with_batch_frames_sends_one_frame_per_window(
    start_backend: Callable[..., Awaitable[FakeBackend]],
    start_router: Callable[..., Awaitable[RouterHandle]],
    http: aiohttp.ClientSession,
) -> None:
    sends = await published_sends(start_backend, start_router, http, flush_interval_s=0.3,
                                  batch_frames=True)
    # One send of one frame: the four dispatches, and the state after their finishes.
    assert sends == [[["Dispatch"] * 4 + ["State"]]], sends



def test_a_peers_state_wakes_the_held_request_and_a_dispatch_alone_does_not() -> None:
    """A held request waits for capacity to free up (router/hold.py); a peer's finishes free
    it too and are heard only in its next state, so a frame ending with a state wakes the
    hold's head. Bad frames and states are counted, and the service goes on."""
    from prometheus_client import CollectorRegistry

    from policies.kv_aware import KvAware, KvAwareParams
    from router.sync.service import SyncMetrics, SyncService

    service = SyncService(parse_config({"sync": {"enabled": True}}).sync, {})
    service.wrap(KvAware(KvAwareParams(), random.Random(0)))
    registry = CollectorRegistry()
    metrics = SyncMetrics(registry)
    woken: list[int] = []
    service.on_peer_state = lambda: woken.append(1)
    clocks = {"monotonic_now_s": 0.0, "unix_now_s": 0.0}
    dispatch, state = messages()[0], messages()[3]
    service._apply([encode_batch([dispatch], **clocks)], metrics)
    assert woken == []
    service._apply([encode_batch([dispatch, state], **clocks)], metrics)
    assert woken == [1]
    bad = dataclasses.replace(state, seq=9, shared={"http://p": [1.0]})  # not kv_aware's layout
    service._apply([b"\xc1", encode_batch([bad], **clocks)], metrics)
    # the undecodable frame, and the state kv_aware refused
    assert registry.get_sample_value("kvrouter_sync_decode_errors_total") == 2
    assert service.sync is not None and service.sync.peers["a"].received == 4
