"""kv_aware's record refresh: a chain recorded on a backend moments ago is not recorded again
(``record_refresh_s``), and what that leaves different stays within the interval."""

from __future__ import annotations

import random

import pytest

from policies.kv.hashing import BlockHasher, Namespace
from policies.kv.refresh import RecordRefresh
from policies.kv_aware import KvAware, create
from policies.params import ParamError
from policies.types import BackendState, ClusterView, RouteRequest

BS = 16
HASHER = BlockHasher(Namespace("m"), BS)


def prompt(group: int, tokens: int, request_id: str = "r") -> RouteRequest:
    body = [group * 100_003 + i for i in range(tokens)]
    return RouteRequest(request_id=request_id, model="m", prompt_tokens=tokens,
                        block_hashes=HASHER.hash_tokens(body), block_size=BS, tokens_exact=True)


def approx_view(now_s: float, **state: object) -> ClusterView:
    """One backend without KV events: kv_aware matches its own dispatch records."""
    return ClusterView(now_s, (BackendState("b0", kv_events=False, **state),))  # type: ignore[arg-type]


def dispatch(kv: KvAware, request: RouteRequest, now_s: float, **state: object) -> None:
    kv.on_dispatched(request, kv.choose(request, approx_view(now_s, **state)), now_s)


def hit_tokens(kv: KvAware, request: RouteRequest, now_s: float) -> int:
    return kv.choose(request, approx_view(now_s)).predicted_hit_tokens


def test_a_chain_sent_again_within_the_interval_keeps_its_first_records_expiry() -> None:
    # Records live approx_ttl_s (30 s) from their last full record: the second dispatch 0.5 s
    # later is not recorded, so the chain expires at 30 s, not 30.5 s.
    kv = create({"approx_ttl_s": 30.0}, random.Random(0))
    request = prompt(1, 1024)
    dispatch(kv, request, 0.0)
    dispatch(kv, request, 0.5)
    assert hit_tokens(kv, request, 29.9) > 0
    assert hit_tokens(kv, request, 30.2) == 0
    # With the refresh off, every dispatch records: the second one extends it to 30.5 s.
    every = create({"approx_ttl_s": 30.0, "record_refresh_s": 0.0}, random.Random(0))
    dispatch(every, request, 0.0)
    dispatch(every, request, 0.5)
    assert hit_tokens(every, request, 30.2) > 0


def test_past_the_interval_the_chain_is_recorded_again_and_its_expiry_extended() -> None:
    kv = create({"approx_ttl_s": 30.0, "record_refresh_s": 1.0}, random.Random(0))
    request = prompt(2, 1024)
    dispatch(kv, request, 0.0)
    dispatch(kv, request, 0.5)  # within the interval: skipped
    dispatch(kv, request, 1.5)  # past it: recorded, expiring at 31.5 s
    assert hit_tokens(kv, request, 31.2) > 0
    assert hit_tokens(kv, request, 31.6) == 0


def test_a_chain_dropped_within_the_interval_is_recorded_again() -> None:
    # The backend holds 100 blocks: a 96-block chain pushes out a 64-block one, which is then
    # sent again 0.2 s after its first record. It must be recorded (presence stays exact),
    # not skipped as fresh.
    kv = create({}, random.Random(0))
    small, big = prompt(3, 64 * BS), prompt(4, 96 * BS, request_id="big")
    dispatch(kv, small, 0.0, total_kv_blocks=100)
    dispatch(kv, big, 0.1, total_kv_blocks=100)
    assert hit_tokens(kv, small, 0.15) == 0
    dispatch(kv, small, 0.2, total_kv_blocks=100)
    assert hit_tokens(kv, small, 0.3) == 64 * BS - BS  # all but the last block's tokens


def test_homes_follow_the_last_full_record_and_catch_up_after_the_interval() -> None:
    # Sent to b0, then b1, then b0 again 0.6 s after b0's record: that last one is skipped,
    # so the prefix stays homed on b1 (both were sent it within the interval). Past the
    # interval b0 records it again and is its home. The home shows once the records have
    # expired: the request goes where the prefix was last homed.
    def home_after(*dispatches: tuple[str, float]) -> str:
        kv = create({"approx_ttl_s": 30.0}, random.Random(0))
        for backend_id, now_s in dispatches:
            one = ClusterView(now_s, (BackendState(backend_id, kv_events=False),))
            kv.on_dispatched(request, kv.choose(request, one), now_s)
        both = ClusterView(100.0, tuple(BackendState(b, kv_events=False) for b in ("b0", "b1")))
        decision = kv.choose(request, both)
        assert decision.predicted_hit_tokens == 0  # expired: only the home remembers it
        return decision.backend_id

    request = prompt(5, 1024)
    assert home_after(("b0", 0.0), ("b1", 0.3), ("b0", 0.6)) == "b1"
    assert home_after(("b0", 0.0), ("b1", 0.3), ("b0", 0.6), ("b0", 1.2)) == "b0"
    assert home_after(("b1", 0.0), ("b0", 0.3)) == "b0"


def test_the_refresh_is_a_validated_param() -> None:
    with pytest.raises(ParamError, match="record_refresh_s must be >= 0"):
        create({"record_refresh_s": -1.0}, random.Random(0))
    with pytest.raises(ParamError, match="record_refresh_s"):
        create({"record_refresh_s": float("inf")}, random.Random(0))


def test_bookkeeping_keeps_only_fresh_records_and_at_most_max_entries() -> None:
    refresh = RecordRefresh(1.0, max_entries=8)
    for i in range(20):
        refresh.note("b0", i, i * 0.01)
    assert len(refresh) == 8  # the cap drops the oldest
    assert refresh.fresh("b0", 19, 0.5) and not refresh.fresh("b0", 0, 0.5)
    assert not refresh.fresh("b1", 19, 0.5)  # another backend's record is not this one's
    refresh.note("b0", 100, 5.0)  # the rest are stale by now and go
    assert len(refresh) == 1
    assert not refresh.fresh("b0", 100, 6.0)  # exactly refresh_s later: stale
    off = RecordRefresh(0.0)
    off.note("b0", 1, 0.0)
    assert len(off) == 0 and not off.fresh("b0", 1, 0.0)
