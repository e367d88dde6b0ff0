"""kv_aware: table-driven decisions on hand-built cluster views fed through a real PrefixIndex."""

from __future__ import annotations

import dataclasses
import itertools
import random
from collections import Counter
from collections.abc import Sequence

import pytest

from policies.kv.events import BlockStored
from policies.kv.hashing import BlockHasher, Namespace
from policies.kv.index import PrefixIndex
from policies.kv_aware import KvAware, KvAwareParams, create
from policies.params import ParamError
from policies.prefill_cost import PrefillCost
from policies.registry import build_policy
from policies.types import BackendState, ClusterView, Decision, Role, RouteRequest

BS = 16
HASHER = BlockHasher(Namespace("m"), BS)
IDS = ("b0", "b1", "b2", "b3")


def prompt(group: int, tokens: int, suffix: int = 0, unique_tokens: int = 64) -> RouteRequest:
    """``tokens`` tokens: a prefix of group ``group`` then ``unique_tokens`` unique to
    ``suffix``."""
    body = [group * 100_003 + i for i in range(tokens - unique_tokens)] + [
        suffix * 7919 + i for i in range(unique_tokens)]
    return RouteRequest(
        request_id=f"r{group}-{suffix}", model="m", prompt_tokens=tokens,
        block_hashes=HASHER.hash_tokens(body), block_size=BS, tokens_exact=True,
    )


def hold(index: PrefixIndex, backend: str, hashes: Sequence[int], medium: str = "GPU") -> None:
    index.apply(backend, BlockStored(tuple(hashes), None, (), BS, medium=medium), 0.0)


def view(index: PrefixIndex | None, *states: BackendState, now_s: float = 0.0) -> ClusterView:
    return ClusterView(now_s=now_s, backends=states, index=index)


def idle(backend_id: str, **kw: object) -> BackendState:
    kw.setdefault("kv_events", True)
    return BackendState(backend_id=backend_id, **kw)  # type: ignore[arg-type]


def policy(seed: int = 0, **params: object) -> KvAware:
    return create(params, random.Random(seed))


@pytest.mark.parametrize(
    ("held_by", "medium", "states", "expected"),
    [
        ({"b2": 480}, "GPU", {}, "b2"),
        ({"b2": 480, "b1": 64}, "GPU", {}, "b2"),
        ({"b1": 480}, "CPU", {}, "b1"),
        ({"b3": 480}, "GPU", {"b0": {"in_flight_prompt_tokens": 3000, "in_flight_requests": 3}},
         "b3"),
        ({"b0": 480}, "GPU", {"b1": {"engine_waiting_requests": None}}, "b0"),
    ],
    ids=["gpu-holder", "longest-holder", "cpu-offload-holder", "holder-while-other-busy",
         "stale-engine-numbers"],
)
def test_routes_to_the_holder_of_a_long_prefix(
    held_by: dict[str, int], medium: str, states: dict[str, dict[str, object]], expected: str
) -> None:
    index = PrefixIndex()
    request = prompt(1, 8000)
    for backend, blocks in held_by.items():
        hold(index, backend, request.block_hashes[:blocks], medium)
    v = view(index, *(idle(b, **states.get(b, {})) for b in IDS))
    for seed in range(20):
        decision = policy(seed).choose(request, v)
        assert decision.backend_id == expected
        assert decision.predicted_hit_tokens == held_by[expected] * BS


def test_new_prefixes_spread_across_idle_backends() -> None:
    index = PrefixIndex()
    kv = policy(seed=7)
    counts: Counter[str] = Counter()
    for group in range(200):  # sequential: every backend idle at each decision
        request = prompt(group, 2048)
        decision = kv.choose(request, view(index, *(idle(b) for b in IDS)))
        kv.on_dispatched(request, decision, 0.0)
        hold(index, decision.backend_id, request.block_hashes)
        counts[decision.backend_id] += 1
    assert set(counts) == set(IDS)
    assert max(counts.values()) <= 80 and min(counts.values()) >= 25, counts


def holder_share(waiting: int, trials: int = 200) -> float:
    index = PrefixIndex()
    request = prompt(1, 8192)
    hold(index, "b0", request.block_hashes[:256])  # 4,096 cached tokens on b0
    v = view(index, idle("b0", engine_waiting_requests=waiting), idle("b1"))
    # Small waiting requests (128 tokens, ~4 ms each) so the queue grows in fine steps.
    kv = policy(seed=waiting, default_prompt_tokens=128)
    return sum(kv.choose(request, v).backend_id == "b0" for _ in range(trials)) / trials


def test_affinity_yields_to_load_gradually() -> None:
    queues = list(range(10, 61, 2))
    shares = [holder_share(q) for q in queues]
    assert shares[0] > 0.95 and shares[-1] < 0.05, shares
    assert all(b <= a + 0.12 for a, b in itertools.pairwise(shares)), shares
    # A switch would jump from ~1 to ~0 between two neighbouring queue lengths; a graded
    # score passes through intermediate shares.
    assert sum(0.05 < s < 0.95 for s in shares) >= 2, shares


def decoding_holder_share(running: int, trials: int = 200, **params: object) -> float:
    """Share of a prefix's requests its holder keeps while ``running`` 8k-token requests decode
    there (none waiting) and another backend is idle."""
    index = PrefixIndex()
    request = prompt(1, 8192)
    hold(index, "b0", request.block_hashes[:256])  # 4,096 cached tokens on b0
    busy = idle("b0", engine_waiting_requests=0, engine_running_requests=running,
                in_flight_requests=running, in_flight_prompt_tokens=8192 * running)
    v = view(index, busy, idle("b1", engine_waiting_requests=0, engine_running_requests=0))
    kv = policy(seed=running, **params)
    return sum(kv.choose(request, v).backend_id == "b0" for _ in range(trials)) / trials


def test_a_big_decode_batch_sheds_a_hot_prefix_gradually() -> None:
    batches = list(range(0, 13))
    # The decode horizon alone (the work floor adds a constant price, below), with every
    # candidate in the draw: the share falls through intermediate values.
    drawn = [decoding_holder_share(n, work_floor_ratio=0.0, copy_cutoff_t=0.0)
             for n in batches]
    assert drawn[0] > 0.95 and drawn[-1] < 0.05, drawn
    assert all(b <= a + 0.12 for a, b in itertools.pairwise(drawn)), drawn
    assert sum(0.05 < s < 0.95 for s in drawn) >= 1, drawn
    # The copy cutoff draws a copy only within copy_cutoff_t of the holder: the same shed,
    # over fewer steps, never earlier.
    shares = [decoding_holder_share(n, work_floor_ratio=0.0) for n in batches]
    assert shares[0] > 0.95 and shares[-1] < 0.05, shares
    assert all(b <= a + 0.12 for a, b in itertools.pairwise(shares)), shares
    assert all(c >= d - 0.05 for c, d in zip(shares, drawn, strict=True)), (shares, drawn)
    # The work floor makes leaving the holder cost a quarter of the recompute more: the
    # holder keeps the prefix at least as long, and a big batch still sheds it.
    floored = [decoding_holder_share(n) for n in batches]
    assert all(f >= s - 0.05 for f, s in zip(floored, shares, strict=True)), (floored, shares)
    assert floored[-1] < 0.05, floored
    # Scoring TTFT alone, the holder keeps the prefix under the same batch (until ~24 running):
    # the first token comes sooner there even though every later token is slower.
    assert decoding_holder_share(batches[-1], decode_horizon_tokens=0, stall_ratio=0.0,
                                 fleet_work_ratio=0.0) > 0.95


def test_a_prefill_is_charged_for_the_decodes_it_stalls_once_the_fleet_is_busy() -> None:
    # b0 holds half the prompt and runs 3 decodes; b1 is idle. Scoring TTFT and decode time
    # alone, b0 keeps the prefix; charging the stall to b0's running requests sheds it.
    without = decoding_holder_share(3, stall_ratio=0.0, fleet_work_ratio=0.0)
    with_stall = decoding_holder_share(3, fleet_work_ratio=0.0)
    assert without > 0.95 and with_stall < 0.05, (without, with_stall)


def test_the_externality_is_free_while_the_fleet_has_idle_backends() -> None:
    # Same request, same busy holder; three more idle backends make the fleet mostly idle
    # (busy share 1/4), so the charges shrink by (1/4)**2 against (1/2)**2.
    index = PrefixIndex()
    request = prompt(1, 8192)
    hold(index, "b0", request.block_hashes[:256])
    busy = idle("b0", engine_waiting_requests=0, engine_running_requests=6,
                in_flight_requests=6, in_flight_prompt_tokens=8192 * 6)

    def externality(*others: BackendState, **params: object) -> tuple[float, float]:
        decision = policy(**params).choose(request, view(index, busy, *others))
        b0 = next(s for s in decision.scores if s.backend_id == "b0")
        return b0.terms["externality_s"], b0.terms["prefill_s"]

    two, _ = externality(idle("b1"), work_floor_ratio=0.0)
    four, _ = externality(idle("b1"), idle("b2"), idle("b3"), work_floor_ratio=0.0)
    assert two > 0 and four == pytest.approx(two / 4)
    # The work floor is the part that does not shrink: a quarter of b0's own prefill.
    floored, prefill_s = externality(idle("b1"), idle("b2"), idle("b3"))
    assert floored == pytest.approx(four + 0.25 * prefill_s)



def test_past_saturation_the_stall_counts_only_the_steps_a_prefill_adds() -> None:
    # b0 runs a long batch with a queue; b1 is busy too. While b1 still admits (nothing
    # waiting there), b0's stall counts every step its queue spans; once every engine reports
    # requests waiting, only the steps this prompt's own tokens add (kv_aware's docstring,
    # "Why the stall counts only a prefill's own steps past saturation").
    request = prompt(1, 4096)
    b0 = idle("b0", engine_waiting_requests=4, engine_running_requests=40,
              in_flight_requests=44, in_flight_prompt_tokens=44 * 4096)

    def b0_terms(b1_waiting: int | None, **params: object) -> tuple[float, float]:
        b1 = idle("b1", engine_waiting_requests=b1_waiting, engine_running_requests=40,
                  in_flight_requests=44, in_flight_prompt_tokens=44 * 4096)
        decision = policy(**params).choose(request, view(PrefixIndex(), b0, b1))
        score = next(s for s in decision.scores if s.backend_id == "b0")
        return score.terms["externality_s"], score.terms["ttft_s"]

    admitting, ttft_admitting = b0_terms(0)
    saturated, ttft_saturated = b0_terms(3)
    assert 0 < saturated < admitting
    assert ttft_saturated == pytest.approx(ttft_admitting)  # the request's own time is the same
    assert b0_terms(None)[0] == pytest.approx(admitting)  # unknown numbers: not saturated
    # Only the stall's step term changes: without it the two fleets price b0 alike.
    assert b0_terms(3, stall_step_ratio=0.0)[0] == pytest.approx(
        b0_terms(0, stall_step_ratio=0.0)[0])

def test_a_prefix_evicted_everywhere_returns_to_its_home() -> None:
    # Each group is placed once on an idle fleet, then evicted everywhere (the index holds
    # nothing). Its later requests go back to where it lived, not wherever the RNG points.
    index = PrefixIndex()
    kv = policy(seed=3)
    homes: dict[int, str] = {}
    for group in range(40):
        request = prompt(group, 2048, suffix=0)
        decision = kv.choose(request, view(index, *(idle(b) for b in IDS)))
        kv.on_dispatched(request, decision, 0.0)
        homes[group] = decision.backend_id
    assert len(set(homes.values())) == len(IDS)  # new prefixes still spread
    for group in range(40):
        for suffix in (1, 2):
            request = prompt(group, 2048, suffix=suffix)
            # Long after: no dispatch is recent, the index holds nothing.
            decision = kv.choose(request, view(index, *(idle(b) for b in IDS), now_s=60.0))
            assert decision.backend_id == homes[group]
            home_score = next(s for s in decision.scores if s.backend_id == homes[group])
            assert home_score.terms["placement_s"] < 0
    # Without the credit the same requests scatter again.
    forgetful = policy(seed=3, home_credit_ratio=0.0)
    moved = 0
    for group in range(40):
        request = prompt(group, 2048, suffix=0)
        forgetful.on_dispatched(
            request, forgetful.choose(request, view(index, *(idle(b) for b in IDS))), 0.0)
        later = prompt(group, 2048, suffix=1)
        first = homes_of(forgetful, request, index)
        moved += forgetful.choose(
            later, view(index, *(idle(b) for b in IDS), now_s=60.0)).backend_id != first
    assert moved >= 10


def homes_of(kv: KvAware, request: RouteRequest, index: PrefixIndex) -> str:
    home, _ = kv._homes.home(request.block_hashes)
    assert home is not None
    return home


@pytest.mark.parametrize("seed", range(3))
def test_under_cache_pressure_new_prefixes_go_where_the_least_working_set_is_homed(
    seed: int,
) -> None:
    # 48 groups of 128 blocks arrive one at a time on idle backends of 200 blocks each: the
    # remembered working set (6,144 blocks) far exceeds the caches (800), so each backend's
    # hit rate falls with the groups homed on it. Predicted TTFTs tie, so without the
    # partition price the draw decides and homes drift apart (sglang-router sends a new prefix
    # to its smallest tree for the same reason).
    def homed_groups(kv: KvAware) -> Counter[str]:
        homes: Counter[str] = Counter()
        for group in range(48):
            request = prompt(group, 2048)
            now_s = 10.0 * group  # each request long finished before the next
            v = view(None, *(idle(b, total_kv_blocks=200) for b in IDS), now_s=now_s)
            decision = kv.choose(request, v)
            kv.on_dispatched(request, decision, now_s)
            kv.on_finished(request, decision, now_s + 1.0, True)
            homes[decision.backend_id] += 1
        return homes

    balanced = homed_groups(policy(seed))
    assert max(balanced.values()) - min(balanced.values()) <= 2, balanced  # the first 5 drawn
    drawn = [homed_groups(policy(seed * 10 + k, partition_ratio=0.0)) for k in range(4)]
    assert max(max(d.values()) - min(d.values()) for d in drawn) >= 4, drawn


def test_without_cache_pressure_the_partition_price_is_zero() -> None:
    kv = policy(0)
    for group in range(8):
        request = prompt(group, 2048)
        v = view(None, *(idle(b, total_kv_blocks=100_000) for b in IDS), now_s=10.0 * group)
        decision = kv.choose(request, v)
        kv.on_dispatched(request, decision, 10.0 * group)
        assert all(s.terms["placement_s"] == 0.0 for s in decision.scores)


def test_a_new_prefix_avoids_a_backend_whose_own_share_overflows_its_cache() -> None:
    # The fleet's caches hold the remembered working set (896 of 4,000 blocks), but b0's
    # share does not fit b0 (896 > 0.8 * 1,000): a new prefix homed there evicts one of its
    # prefixes. b0 is idle and the others each have a request waiting, so on predicted TTFT
    # alone b0 wins.
    def placed(**params: object) -> str:
        kv = policy(0, **params)
        for group in range(7):  # 7 x 128 blocks homed on b0
            request = prompt(group, 2048)
            decision = kv.choose(request, view(None, idle("b0", total_kv_blocks=1000)))
            kv.on_dispatched(request, decision, 0.0)
            kv.on_finished(request, decision, 1.0, True)
        others = (idle(b, total_kv_blocks=1000, engine_waiting_requests=1) for b in IDS[1:])
        v = view(None, idle("b0", total_kv_blocks=1000), *others, now_s=60.0)
        return kv.choose(prompt(50, 2048), v).backend_id

    assert placed(partition_ratio=0.0) == "b0"
    assert placed() != "b0"


def test_a_holder_a_few_temperatures_ahead_is_not_outdrawn_by_equivalent_copies() -> None:
    # The holder b0 scores ~3.2 T better than each of three idle backends that would compute
    # the prefix again. One such backend alone would be drawn ~4% of the time, three together
    # ~11%: the live agentic regime copied a system prompt that way. Beyond copy_cutoff_t a
    # backend that computes more than the best one is never drawn while some backend is idle.
    request = prompt(1, 2048)
    index = PrefixIndex()
    hold(index, "b0", request.block_hashes[:120])
    v = view(index, idle("b0", engine_waiting_requests=2, in_flight_requests=2),
             *(idle(b) for b in IDS[1:]))

    def copies(**params: object) -> int:
        return sum(policy(seed, default_prompt_tokens=1024, work_floor_ratio=0.0, **params)
                   .choose(request, v).backend_id != "b0" for seed in range(300))

    assert copies() == 0
    assert copies(copy_cutoff_t=0.0) >= 10

    # With every candidate busy the cutoff stays out of the draw (queue forecasts then err by
    # more than a few T): the same ~3.3 T margin, the externality off so that it holds.
    busy = view(index, idle("b0", engine_waiting_requests=2, in_flight_requests=2),
                *(idle(b, in_flight_requests=1) for b in IDS[1:]))

    def busy_copies(**params: object) -> int:
        return sum(policy(seed, default_prompt_tokens=864, work_floor_ratio=0.0,
                          fleet_work_ratio=0.0, stall_ratio=0.0, **params)
                   .choose(request, busy).backend_id != "b0" for seed in range(300))

    assert busy_copies() >= 10
    assert busy_copies() == busy_copies(copy_cutoff_t=0.0)


def test_a_copy_into_a_full_cache_costs_the_prefix_it_duplicates() -> None:
    # b0 holds the prefix and has a queue; b1 is idle. With b1's cache empty the queue wins
    # and the prefix is copied to b1; with b1's cache full the copy would evict as much as it
    # saves, so the holder keeps it.
    request = prompt(1, 8192)

    def holder_share(b1_cache_blocks: int) -> float:
        index = PrefixIndex()
        hold(index, "b0", request.block_hashes[:256])
        filler = prompt(99, b1_cache_blocks * BS, unique_tokens=0).block_hashes
        hold(index, "b1", filler)
        holder = idle("b0", engine_waiting_requests=3, total_kv_blocks=1000)
        other = idle("b1", engine_waiting_requests=0, total_kv_blocks=1000)
        # The copy price alone (the work floor would keep a little more at the holder).
        kv = policy(seed=1, default_prompt_tokens=2048, work_floor_ratio=0.0)
        v = view(index, holder, other)
        return sum(kv.choose(request, v).backend_id == "b0" for _ in range(100)) / 100

    assert holder_share(0) < 0.05
    assert holder_share(1000) > 0.95


def test_holder_score_grows_linearly_with_its_queue() -> None:
    index = PrefixIndex()
    request = prompt(1, 8192)
    hold(index, "b0", request.block_hashes[:256])
    kv = policy()
    scores = [
        kv.choose(request, view(index, idle("b0", engine_waiting_requests=w))).scores[0].score
        for w in range(9)
    ]
    steps = [b - a for a, b in itertools.pairwise(scores)]
    assert all(step > 0 for step in steps)
    assert max(steps) - min(steps) < 1e-9
    waiting = KvAwareParams().default_prompt_tokens  # each waiting request: a cold prompt
    cost = PrefillCost()
    assert steps[0] == pytest.approx(
        cost.seconds(waiting) + cost.step_floor_s * waiting / cost.max_batched_tokens)


def test_its_own_dispatches_queue_until_their_predicted_first_token() -> None:
    index = PrefixIndex()
    kv = policy()
    request = prompt(2, 4096)
    hold(index, "b0", request.block_hashes[:200])
    sent = 0
    for i in range(30):  # a burst of cold 4k prompts, all placed on b0 by hand
        cold = prompt(100 + i, 4096)
        decision = Decision(backend_id="b0", reason="test", scores=kv.choose(
            cold, view(index, idle("b0", in_flight_prompt_tokens=sent))).scores)
        kv.on_dispatched(cold, decision, 0.0)
        sent += 4096
    busy = idle("b0", in_flight_prompt_tokens=sent, in_flight_requests=30)
    now = kv.choose(request, view(index, busy, idle("b1"), now_s=0.1))
    assert now.backend_id == "b1"
    queued = {s.backend_id: s.terms["queued_s"] for s in now.scores}
    assert queued["b0"] > 20 * PrefillCost().seconds(4096) and queued["b1"] == 0.0
    # Long after every predicted first token the requests are decoding: nothing is queued on
    # b0 and its cached prefix makes the first token fastest there again. (The choice itself
    # may still go to b1: 30 requests decoding on b0 slow the new request's own decode.)
    later = kv.choose(request, view(index, busy, idle("b1"), now_s=1000.0))
    late = {s.backend_id: s.terms for s in later.scores}
    assert late["b0"]["queued_s"] == 0.0
    assert late["b0"]["ttft_s"] < late["b1"]["ttft_s"]
    assert late["b0"]["decode_s"] > late["b1"]["decode_s"]
    # Requests that already returned (released by the router) no longer count.
    released = kv.choose(request, view(index, idle("b0"), idle("b1"), now_s=0.2))
    assert released.backend_id == "b0"


@pytest.mark.parametrize(
    "saturated",
    [
        {"kv_usage_ratio": 0.99, "in_flight_prompt_tokens": 20000, "in_flight_requests": 20},
        {"engine_waiting_requests": 40},
        {"kv_usage_ratio": 1.0},
    ],
    ids=["kv-full-and-queued", "engine-queue", "kv-full"],
)
def test_avoids_saturated_backends_even_when_they_hold_the_prefix(
    saturated: dict[str, object]
) -> None:
    index = PrefixIndex()
    request = prompt(1, 4096)
    hold(index, "b0", request.block_hashes[:200])
    v = view(index, idle("b0", **saturated), idle("b1"), idle("b2"))
    picks = {policy(seed).choose(request, v).backend_id for seed in range(30)}
    assert "b0" not in picks and picks == {"b1", "b2"}


def test_kv_pressure_grows_smoothly_above_the_knee() -> None:
    request = prompt(1, 1024)
    kv = policy()
    pressure = [
        kv.choose(request, view(None, idle("b0", kv_usage_ratio=u / 100))).scores[0].terms[
            "kv_pressure_s"]
        for u in range(70, 101, 5)
    ]
    assert pressure[:3] == [0.0, 0.0, 0.0]
    assert all(b > a for a, b in itertools.pairwise(pressure[2:]))
    assert pressure[-1] == pytest.approx(KvAwareParams().kv_full_wait_s)


def test_a_hot_prefix_is_replicated_when_its_holder_saturates() -> None:
    index = PrefixIndex()
    kv = policy(seed=3)
    load = dict.fromkeys(IDS, 0)
    # A 4,000-token shared prefix and 2,000 tokens of each request's own: queued requests
    # cost real prefill time, so the holder's queue soon outweighs what its cache saves.
    first = prompt(9, 6000, suffix=0, unique_tokens=2000)
    hold(index, "b0", first.block_hashes)
    sent: Counter[str] = Counter()
    for i in range(1, 41):  # a burst: nothing finishes
        request = prompt(9, 6000, suffix=i, unique_tokens=2000)
        states = [idle(b, in_flight_prompt_tokens=load[b], in_flight_requests=load[b] // 6000)
                  for b in IDS]
        decision = kv.choose(request, view(index, *states))
        kv.on_dispatched(request, decision, 0.0)
        hold(index, decision.backend_id, request.block_hashes)
        load[decision.backend_id] += 6000
        sent[decision.backend_id] += 1
    holders = [b for b in IDS if index.match(first.block_hashes[:250]).get(b)]
    assert len(holders) >= 2
    # The first holder keeps at least an even share. Not more: in a burst where nothing
    # finishes, each request sent there stalls every one already in flight there, which is
    # what a cached 4,000 tokens saves once the fleet is this busy.
    assert sent["b0"] >= 40 / len(IDS)


def test_same_seed_same_decisions_other_seed_differs() -> None:
    def run(seed: int) -> list[str]:
        index = PrefixIndex()
        kv = policy(seed)
        out = []
        for i in range(60):
            request = prompt(i % 7, 1024, suffix=i)
            decision = kv.choose(request, view(index, *(idle(b) for b in IDS)))
            kv.on_dispatched(request, decision, float(i))
            hold(index, decision.backend_id, request.block_hashes)
            out.append(decision.backend_id)
        return out

    assert run(11) == run(11)
    assert run(11) != run(12)


def test_choose_changes_nothing_but_the_rng() -> None:
    index = PrefixIndex()
    request = prompt(2, 3000)
    hold(index, "b1", request.block_hashes[:50])
    kv = policy()
    v = view(index, *(idle(b) for b in IDS))
    state = kv._rng.getstate()
    first = kv.choose(request, v)
    kv._rng.setstate(state)
    assert kv.choose(request, v) == first


def test_scores_explain_every_candidate() -> None:
    index = PrefixIndex()
    request = prompt(3, 1000)
    hold(index, "b1", request.block_hashes)  # all 62 blocks; 999 tokens is the cap
    decision = policy().choose(request, view(index, *(idle(b) for b in IDS)))
    assert [s.backend_id for s in decision.scores] == list(IDS)
    by_id = {s.backend_id: s for s in decision.scores}
    assert by_id["b1"].matched_tokens == 992 and by_id["b0"].matched_tokens == 0
    cost = PrefillCost()
    # The first min(max_tokens, 8) output tokens decode beside the request's own 1000 tokens.
    decode_s = min(request.max_tokens, 8) * cost.step_overhead_s(0, 1000)
    # An idle fleet: the externality is only the work floor, a quarter of the own prefill.
    assert by_id["b0"].score == pytest.approx(
        1.25 * cost.seconds(1000) + cost.step_overhead_s(1000, 0) + decode_s)
    assert by_id["b1"].score == pytest.approx(
        1.25 * cost.seconds(8, 992) + cost.step_overhead_s(8, 0) + decode_s)
    for s in decision.scores:
        assert s.terms["ttft_s"] == pytest.approx(s.terms["queued_s"] + s.terms["prefill_s"]
                                                  + s.terms["step_s"] + s.terms["kv_pressure_s"])
        assert s.terms["externality_s"] == pytest.approx(0.25 * s.terms["prefill_s"])
        assert s.score == pytest.approx(s.terms["ttft_s"] + s.terms["decode_s"]
                                        + s.terms["externality_s"])
    assert decision.backend_id == "b1" and decision.predicted_hit_tokens == 992


def test_roles_prefill_on_prefill_side_and_split_to_decode() -> None:
    request = prompt(4, 2000)
    index = PrefixIndex()
    hold(index, "p1", request.block_hashes)
    states = (
        idle("d0", role=Role.DECODE, in_flight_requests=5),
        idle("d1", role=Role.DECODE, in_flight_requests=2),
        idle("p0", role=Role.PREFILL),
        idle("p1", role=Role.PREFILL),
    )
    decision = policy().choose(request, view(index, *states))
    assert decision.prefill_backend_id == "p1" and decision.backend_id == "d1"
    assert {s.backend_id for s in decision.scores} == {"p0", "p1"}
    mixed = policy().choose(request, view(index, idle("m0", role=Role.MIXED), states[0]))
    assert mixed.backend_id == "m0" and mixed.prefill_backend_id is None


def test_approximate_mode_remembers_dispatches_until_the_ttl() -> None:
    kv = policy(seed=5, approx_ttl_s=30.0)
    states = [idle(b, kv_events=False) for b in IDS]
    first = prompt(5, 4000, suffix=1)
    d = kv.choose(first, view(None, *states, now_s=0.0))
    kv.on_dispatched(first, d, 0.0)
    follow = prompt(5, 4000, suffix=2)
    for now in (1.0, 29.0):
        again = kv.choose(follow, view(None, *states, now_s=now))
        assert again.backend_id == d.backend_id and again.predicted_hit_tokens >= 3900
    later = [kv.choose(follow, view(None, *states, now_s=31.0)) for _ in range(40)]
    assert all(x.predicted_hit_tokens == 0 for x in later)
    # Past the TTL nothing is predicted cached, but the prefix's home is remembered.
    assert {x.backend_id for x in later} == {d.backend_id}
    forgetful = policy(seed=5, approx_ttl_s=30.0, home_credit_ratio=0.0)
    forgetful.on_dispatched(first, d, 0.0)
    scattered = [forgetful.choose(follow, view(None, *states, now_s=31.0)) for _ in range(40)]
    assert len({x.backend_id for x in scattered}) > 1
    kv.on_backend_removed(d.backend_id)
    assert kv.choose(follow, view(None, *states, now_s=2.0)).predicted_hit_tokens == 0


def test_registry_builds_it_and_bad_params_name_their_key() -> None:
    assert isinstance(build_policy("kv_aware", {"temperature_s": 0.01}, random.Random(0)), KvAware)
    with pytest.raises(ParamError, match=r"policy\.params\.cpu_hit_ratio"):
        create({"cpu_hit_ratio": "high"}, random.Random(0))
    with pytest.raises(ParamError, match="cpu_hit_ratio must be within"):
        create({"cpu_hit_ratio": 1.5}, random.Random(0))
    with pytest.raises(ParamError, match=r"policy\.params\.nope"):
        create({"nope": 1}, random.Random(0))


@pytest.mark.parametrize(("params", "message"), [
    ({"speed_band_ratio": 0.5}, "speed_band_ratio and speed_max_ratio must be >= 1"),
    ({"speed_max_ratio": 0.0}, "speed_band_ratio and speed_max_ratio must be >= 1"),
    ({"speed_memory_s": 0}, "speed_memory_s > 0"),
    ({"speed_min_ttft_s": -1}, "speed_min_ttft_s must be >= 0"),
    ({"speed_min_requests": 0}, "speed_min_requests must be >= 1"),
    ({"speed_window_requests": "x"}, r"policy\.params\.speed_window_requests"),
])
def test_bad_speed_params_name_their_key(params: dict[str, object], message: str) -> None:
    with pytest.raises(ParamError, match=message):
        create(params, random.Random(0))


def test_decision_is_a_plain_value() -> None:
    decision = policy().choose(prompt(6, 100), view(None, idle("b0")))
    assert isinstance(decision, Decision) and decision.backend_id == "b0"


def test_terms_read_as_a_mapping_of_every_term_in_one_order() -> None:
    # Built on first read (only people read them), but read like the dict they were:
    # /debug/route and the sync wire turn them into plain maps in this key order.
    request = prompt(6, 1000)
    index = PrefixIndex()
    hold(index, "b0", request.block_hashes[:20], "CPU")
    terms = policy().choose(request, view(index, idle("b0"), idle("b1"))).scores[0].terms
    plain = dict(terms.items())
    assert list(plain) == [
        "ttft_s", "queued_s", "prefill_s", "kv_pressure_s", "hit_tokens", "gpu_tokens",
        "cpu_tokens", "storage_tokens", "shared_tokens", "step_s", "decode_s", "externality_s",
        "placement_s", "queued_tokens", "running_context_tokens", "uncached_tokens",
        "prompt_tokens", "speed_factor"]
    assert terms == plain and dict(terms) == plain and len(terms) == 18
    assert plain["cpu_tokens"] == 320.0 and plain["prompt_tokens"] == 1000.0
    assert plain["uncached_tokens"] == 1000.0 - plain["hit_tokens"]
    assert all(isinstance(v, float) for v in plain.values())
    assert "nope" not in terms and terms.get("nope") is None


@pytest.mark.parametrize(
    ("state", "queued"),
    [({"in_flight_prompt_tokens": 8000, "in_flight_requests": 2}, True),
     ({"in_flight_prompt_tokens": 8000, "in_flight_requests": 2, "engine_waiting_requests": 0},
      False)],
    ids=["router-counters-only", "engine-says-nothing-waits"],
)
def test_unplaced_in_flight_work_counts_only_without_better_evidence(
    state: dict[str, object], queued: bool
) -> None:
    score = policy().choose(prompt(8, 1000), view(None, idle("b0", **state))).scores[0]
    expected = 2 * PrefillCost().seconds(4000) if queued else 0.0
    assert score.terms["queued_s"] == pytest.approx(expected)


def test_estimated_prompts_follow_their_own_dispatches_not_engine_events() -> None:
    # Without a tokenizer the router hashes character chunks, which engine events (token
    # blocks) can never match: the policy must fall back to its own memory even for backends
    # that publish events, or such prompts would get no affinity at all.
    p = policy(seed=2)
    index = PrefixIndex()
    exact = prompt(4, 4000)
    hold(index, "b3", exact.block_hashes)  # the engine events say b3 holds these blocks
    estimated = dataclasses.replace(exact, tokens_exact=False)
    v = view(index, *(idle(b) for b in IDS))
    first = p.choose(estimated, v)
    assert first.predicted_hit_tokens == 0  # the event index is not trusted for estimates
    assert all(s.prediction and not s.prediction.kv_events for s in first.scores)
    p.on_dispatched(estimated, first, 0.0)
    p.on_finished(estimated, first, 1.0, True)
    again = p.choose(estimated, view(index, *(idle(b) for b in IDS), now_s=2.0))
    assert again.backend_id == first.backend_id
    assert again.predicted_hit_tokens > 0
    # Exact prompts still trust the engines' events.
    assert p.choose(exact, view(index, *(idle(b) for b in IDS), now_s=2.0)).backend_id == "b3"


def test_salted_prompts_follow_their_own_dispatches_not_engine_events() -> None:
    # A cache_salt keeps a request's blocks apart in the engine, and engine events do not say
    # a block's salt, so a salted prompt can only hit where its own salt was sent before.
    p = policy(seed=3)
    index = PrefixIndex()
    salted_hasher = BlockHasher(Namespace("m", cache_salt="tenant-a"), BS)
    body = [4 * 100_003 + i for i in range(4000)]
    unsalted = RouteRequest(request_id="u", model="m", prompt_tokens=4000,
                            block_hashes=HASHER.hash_tokens(body), block_size=BS,
                            tokens_exact=True)
    hold(index, "b3", unsalted.block_hashes)  # b3 holds the unsalted blocks only
    salted = RouteRequest(request_id="s", model="m", prompt_tokens=4000,
                          block_hashes=salted_hasher.hash_tokens(body), block_size=BS,
                          tokens_exact=True, salted=True)
    assert not salted.matches_events and unsalted.matches_events
    first = p.choose(salted, view(index, *(idle(b) for b in IDS)))
    assert first.predicted_hit_tokens == 0
    assert all(s.prediction and not s.prediction.kv_events for s in first.scores)
    p.on_dispatched(salted, first, 0.0)
    p.on_finished(salted, first, 1.0, True)
    again = p.choose(salted, view(index, *(idle(b) for b in IDS), now_s=2.0))
    assert again.backend_id == first.backend_id
    assert again.predicted_hit_tokens > 0
    assert p.choose(unsalted, view(index, *(idle(b) for b in IDS), now_s=2.0)).backend_id == "b3"


def test_a_prefix_just_sent_counts_as_cached_there_until_events_can_say_so() -> None:
    # Two requests of one group 0.1 s apart: the first one's blocks are not in the index yet
    # (its prefill is running), but the second is routed where they will be.
    index = PrefixIndex()
    kv = policy(seed=11)
    first, second = prompt(7, 4000, suffix=1), prompt(7, 4000, suffix=2)
    decision = kv.choose(first, view(index, *(idle(b) for b in IDS)))
    kv.on_dispatched(first, decision, 0.0)
    follow = kv.choose(second, view(index, *(idle(b) for b in IDS), now_s=0.1))
    assert follow.backend_id == decision.backend_id
    assert follow.predicted_hit_tokens >= 3900
    # Past recent_ttl_s only the index (still empty: it was evicted) counts.
    late = kv.choose(second, view(index, *(idle(b) for b in IDS), now_s=5.0))
    assert late.predicted_hit_tokens == 0
    blind = policy(seed=11, recent_ttl_s=0.0)
    blind.on_dispatched(first, decision, 0.0)
    assert blind.choose(second, view(index, *(idle(b) for b in IDS), now_s=0.1)
                        ).predicted_hit_tokens == 0


def test_defers_while_every_backend_has_committed_its_kv_and_releases_on_finish() -> None:
    kv = policy(hold_kv_ratio=0.5, hold_queue_s=0.0)
    states = [idle(b, total_kv_blocks=1000) for b in IDS[:2]]  # 16,000 tokens each
    sent = []
    for i in range(4):
        request = prompt(i, 6000)  # uncached: 6,000 + 16 output tokens committed each
        v = view(PrefixIndex(), *states)
        if kv.defer(request, v):
            break
        decision = kv.choose(request, v)
        kv.on_dispatched(request, decision, 0.0)
        sent.append((request, decision))
    # A backend with nothing committed always has room, one with 6,016 has room for no more
    # than 8,000 - 6,016 tokens: the router holds requests once both have one.
    assert len(sent) < 4 and {d.backend_id for _, d in sent} == {"b0", "b1"}
    assert kv.defer(prompt(9, 6000), view(PrefixIndex(), *states))
    for request, decision in sent:
        if decision.backend_id == "b0":
            kv.on_finished(request, decision, 1.0, True)  # b0's requests finish: room there
    assert not kv.defer(prompt(9, 6000), view(PrefixIndex(), *states))
    # Unknown KV sizes (no scrape yet) and a disabled ratio never hold.
    assert not kv.defer(prompt(9, 6000), view(PrefixIndex(), idle("b1")))
    never = policy(hold_kv_ratio=0.0, hold_queue_s=0.0)
    for request, decision in sent:
        never.on_dispatched(request, decision, 0.0)
    assert not never.defer(prompt(9, 6000), view(PrefixIndex(), *states))


def test_a_group_sent_together_commits_its_shared_prefix_once() -> None:
    # Five requests of one group, none of them finding the prefix cached (its prefill has not
    # stored it yet): the engine holds the 2,944 shared tokens once, so the commitment must
    # too. Counted per request, the third one already past 0.5 of 16,000 tokens was held.
    kv = policy(hold_kv_ratio=0.5, hold_queue_s=0.0, recent_ttl_s=0.0)
    states = [idle("b0", total_kv_blocks=1000)]
    sent = []
    for i in range(5):
        request = prompt(1, 3008, suffix=i)  # 2,944 shared + 64 own tokens, 16 output
        v = view(PrefixIndex(), *states)
        assert not kv.defer(request, v)
        decision = kv.choose(request, v)
        assert decision.predicted_hit_tokens == 0
        kv.on_dispatched(request, decision, 0.0)
        sent.append((request, decision))
    # 2,944 + 5 * (64 + 16) = 3,344 committed: room for a 4,656-token prompt, not more.
    assert not kv.defer(prompt(2, 4656), view(PrefixIndex(), *states))
    assert kv.defer(prompt(2, 4672), view(PrefixIndex(), *states))
    # Finishes take out what the dispatches put in: the prefix with the last of them.
    for request, decision in sent[:4]:
        kv.on_finished(request, decision, 1.0, True)
    assert not kv.defer(prompt(2, 4976), view(PrefixIndex(), *states))  # 3,024 left
    assert kv.defer(prompt(2, 4992), view(PrefixIndex(), *states))
    kv.on_finished(*sent[4], 1.0, True)
    assert not kv.defer(prompt(2, 64_000), view(PrefixIndex(), *states))  # nothing committed


def test_defers_while_every_backend_has_prefill_queued_and_not_once_it_is_predicted_done() -> None:
    # Past capacity a request waits in the router, not in an engine queue, while every backend
    # has hold_queue_s of prefill this policy predicts is still queued; KV room is ample here.
    kv = policy(hold_kv_ratio=0.0, hold_queue_s=0.3)
    in_flight = {b: 0 for b in IDS[:2]}

    def current(now_s: float = 0.0) -> ClusterView:
        # The router's counters: what was sent and has not finished (8,000 tokens each).
        return view(PrefixIndex(), *(idle(b, total_kv_blocks=1_000_000, in_flight_requests=n,
                                          in_flight_prompt_tokens=8000 * n)
                                     for b, n in in_flight.items()), now_s=now_s)

    sent = []
    for i in range(8):
        request = prompt(i, 8000)  # ~0.25 s of prefill each
        if kv.defer(request, current()):
            break
        decision = kv.choose(request, current())
        kv.on_dispatched(request, decision, 0.0)
        in_flight[decision.backend_id] += 1
        sent.append(decision)
    assert 2 <= len(sent) < 8 and {d.backend_id for d in sent} == {"b0", "b1"}
    v = current()
    assert kv.defer(prompt(9, 8000), v)
    # Once the queued prefills are predicted done, the router places requests again.
    assert not kv.defer(prompt(9, 8000), current(now_s=60.0))
    # A backend that answered faster than predicted has nothing in flight: no queue there,
    # and no hold that only a finish could end (none would come).
    in_flight["b0"] = 0
    assert not kv.defer(prompt(9, 8000), current())
    # Disabled: never holds on queues.
    off = policy(hold_kv_ratio=0.0, hold_queue_s=0.0)
    for i, decision in enumerate(sent):
        off.on_dispatched(prompt(i, 8000), decision, 0.0)
    assert not off.defer(prompt(9, 8000), v)


def _streamed(request: RouteRequest) -> RouteRequest:
    return dataclasses.replace(request, stream=True)


def _dispatch(kv: KvAware, request: RouteRequest, on: BackendState, index: PrefixIndex,
              *others: BackendState, now_s: float = 0.0) -> Decision:
    """``request`` scored on ``on`` (and ``others``) and dispatched to ``on``, as the proxy
    would once the policy chose it."""
    scores = kv.choose(request, view(index, on, *others, now_s=now_s)).scores
    decision = Decision(backend_id=on.backend_id, reason="test", scores=scores)
    kv.on_dispatched(request, decision, now_s)
    return decision


def test_a_streamed_request_queues_until_its_first_token_however_late() -> None:
    """A backend slower than the model: its streamed requests' forecasts lapse while they are
    still queued. They count in full until their first token is reported, then not at all."""
    index = PrefixIndex()
    kv = policy()
    sent: list[tuple[RouteRequest, Decision]] = []
    for i in range(4):
        cold = _streamed(prompt(300 + i, 4096))
        decision = Decision(backend_id="b0", reason="test", scores=kv.choose(
            cold, view(index, idle("b0"))).scores)
        kv.on_dispatched(cold, decision, 0.0)
        sent.append((cold, decision))
    busy = idle("b0", in_flight_prompt_tokens=4 * 4096, in_flight_requests=4)
    probe = prompt(2, 4096)
    late = {s.backend_id: s.terms for s in kv.choose(
        probe, view(index, busy, idle("b1"), now_s=1000.0)).scores}
    # Long past every predicted first token, yet none reported: all four still queue.
    assert late["b0"]["queued_s"] == pytest.approx(4 * PrefillCost().seconds(4096), rel=1e-6)
    for request, decision in sent[:3]:
        kv.on_first_token(request, decision, 1000.0)
    left = {s.backend_id: s.terms for s in kv.choose(
        probe, view(index, busy, idle("b1"), now_s=1000.0)).scores}
    assert left["b0"]["queued_s"] == pytest.approx(PrefillCost().seconds(4096), rel=1e-6)
    kv.on_finished(*sent[3], 1001.0, True)
    done = {s.backend_id: s.terms for s in kv.choose(
        probe, view(index, busy, idle("b1"), now_s=1001.0)).scores}
    assert done["b0"]["queued_s"] == 0.0


def test_a_first_token_ends_the_forecast_before_its_predicted_time() -> None:
    index = PrefixIndex()
    kv = policy()
    cold = _streamed(prompt(400, 8000))
    decision = _dispatch(kv, cold, idle("b0"), index)
    busy = idle("b0", in_flight_prompt_tokens=8000, in_flight_requests=1)
    probe = prompt(2, 4096)
    before = {s.backend_id: s.terms for s in kv.choose(probe, view(index, busy)).scores}
    assert before["b0"]["queued_s"] > 0.2  # 8k cold tokens predicted ~0.27 s
    kv.on_first_token(cold, decision, 0.01)  # a faster engine than the model
    after = {s.backend_id: s.terms for s in kv.choose(probe, view(index, busy, now_s=0.01)).scores}
    assert after["b0"]["queued_s"] == 0.0


def test_whole_answers_forecasts_still_end_at_their_predicted_time() -> None:
    """Without a stream no first token is reported: the forecast ends when predicted."""
    index = PrefixIndex()
    kv = policy()
    _dispatch(kv, prompt(500, 4096), idle("b0"), index)  # stream=False
    busy = idle("b0", in_flight_prompt_tokens=4096, in_flight_requests=1)
    late = {s.backend_id: s.terms for s in kv.choose(
        prompt(2, 4096), view(index, busy, now_s=1000.0)).scores}
    assert late["b0"]["queued_s"] == 0.0


def test_a_burst_of_one_prefix_shares_its_prefill_instead_of_copying_it() -> None:
    # Two requests of one ~2,100-token prefix 1 ms apart, the fleet idle before them: on the
    # first one's backend the second waits for that prefill and then finds it cached; on an
    # idle backend it computes the whole prefix again. Predicted TTFTs are within noise of each
    # other, so the draw decided, and about half of such bursts copied the prefix (and took
    # a backend the next new prefix then had to share: the live agentic regime's first wave).
    def second_choices(**params: object) -> Counter[bool]:
        together: Counter[bool] = Counter()
        for seed in range(40):
            kv = policy(seed=seed, **params)
            first, second = prompt(3, 2100, suffix=1), prompt(3, 2100, suffix=2)
            states = {b: idle(b) for b in IDS}
            decision = kv.choose(first, view(PrefixIndex(), *states.values()))
            kv.on_dispatched(first, decision, 0.0)
            states[decision.backend_id] = idle(decision.backend_id, in_flight_requests=1,
                                               in_flight_prompt_tokens=2100)
            follow = kv.choose(second, view(PrefixIndex(), *states.values(), now_s=0.001))
            together[follow.backend_id == decision.backend_id] += 1
        return together

    assert second_choices() == Counter({True: 40})
    drawn = second_choices(ties_save_work=False, work_floor_ratio=0.0)
    assert drawn[False] >= 5, drawn  # without the rule, the draw copies it often


def test_a_holder_keeps_its_prefix_over_a_small_ttft_gain_on_an_idle_backend() -> None:
    """The live agentic regime's copy: b3 holds a ~2,100-token prefix with two requests
    queued; three idle backends would start the recompute at once and finish a few ms sooner.
    With the fleet a quarter busy the fleet-work price is a sixteenth of its busy value, so
    without the work floor the prefix was copied every time."""
    index = PrefixIndex()
    request = prompt(5, 2163, unique_tokens=67)
    hold(index, "b3", request.block_hashes[:2096 // BS])
    v = view(index, idle("b0"), idle("b1"), idle("b2"),
             idle("b3", in_flight_requests=2, in_flight_prompt_tokens=2500))

    def to_holder(**params: object) -> int:
        return sum(policy(seed=s, **params).choose(request, v).backend_id == "b3"
                   for s in range(40))

    assert to_holder(work_floor_ratio=0.0) == 0
    assert to_holder() >= 28  # the default floor; the rest is the draw within T
    # A prefix nobody holds: every candidate pays the same floor, so idle backends still win.
    cold = prompt(6, 2163)
    assert all(policy(seed=s).choose(cold, v).backend_id != "b3" for s in range(20))


def _first_tokens(kv: KvAware, index: PrefixIndex, backend: str, slowdown: float,
                  group: int) -> None:
    """A cold streamed request on an idle ``backend`` whose first token comes ``slowdown``
    times its predicted TTFT after its dispatch."""
    request = _streamed(prompt(group, 4096))
    decision = _dispatch(kv, request, idle(backend), index)
    kv.on_first_token(request, decision, slowdown * decision.scores[0].terms["ttft_s"])


def test_a_backend_whose_first_tokens_come_late_is_priced_at_its_speed() -> None:
    index = PrefixIndex()
    kv = policy()
    _first_tokens(kv, index, "b0", 4.0, 600)
    _first_tokens(kv, index, "b1", 1.0, 601)
    cold = prompt(602, 4096)
    decision = kv.choose(cold, view(index, idle("b0"), idle("b1")))
    terms = {s.backend_id: s.terms for s in decision.scores}
    assert terms["b0"]["speed_factor"] == pytest.approx(4.0)
    assert terms["b1"]["speed_factor"] == 1.0
    assert terms["b0"]["prefill_s"] == pytest.approx(4 * terms["b1"]["prefill_s"])
    assert decision.backend_id == "b1"
    # Holding the prefix, the slow backend still wins while its 4x prefill of the rest is
    # cheaper than a cold one elsewhere.
    hold(index, "b0", cold.block_hashes)
    assert kv.choose(cold, view(index, idle("b0"), idle("b1"))).backend_id == "b0"


def test_its_queue_is_kept_at_model_speed_and_priced_at_the_backends() -> None:
    """The slow backend's forecasts are stored at the cost model's speed, so its factor
    applies once to what is queued there, not again on top of a scaled forecast."""
    index = PrefixIndex()
    kv = policy()
    _first_tokens(kv, index, "b0", 4.0, 610)
    _first_tokens(kv, index, "b1", 1.0, 611)
    _dispatch(kv, _streamed(prompt(612, 4096)), idle("b0"), index, idle("b1"))
    busy = idle("b0", in_flight_prompt_tokens=4096, in_flight_requests=1)
    terms = {s.backend_id: s.terms for s in kv.choose(
        prompt(2, 4096), view(index, busy, idle("b1"), now_s=10.0)).scores}
    assert terms["b0"]["queued_s"] == pytest.approx(4 * PrefillCost().seconds(4096), rel=1e-6)


def test_a_first_token_behind_predicted_work_teaches_no_speed() -> None:
    """With work queued ahead, a late first token may be a queue the model priced wrong, not
    a slow backend."""
    index = PrefixIndex()
    kv = policy()
    _dispatch(kv, _streamed(prompt(620, 4096)), idle("b0"), index)
    second = _streamed(prompt(621, 4096))
    busy = idle("b0", in_flight_prompt_tokens=4096, in_flight_requests=1)
    d2 = _dispatch(kv, second, busy, index)
    assert d2.scores[0].terms["queued_s"] > 0
    kv.on_first_token(second, d2, 100.0)  # very late, behind the first
    _first_tokens(kv, index, "b1", 1.0, 622)
    terms = {s.backend_id: s.terms for s in kv.choose(
        prompt(623, 4096), view(index, idle("b0"), idle("b1"))).scores}
    assert terms["b0"]["speed_factor"] == 1.0


def test_speed_learning_can_be_turned_off() -> None:
    index = PrefixIndex()
    kv = policy(speed_max_ratio=1.0)
    _first_tokens(kv, index, "b0", 4.0, 630)
    _first_tokens(kv, index, "b1", 1.0, 631)
    terms = {s.backend_id: s.terms for s in kv.choose(
        prompt(632, 4096), view(index, idle("b0"), idle("b1"))).scores}
    assert terms["b0"]["speed_factor"] == 1.0


@pytest.mark.parametrize(
    ("scraped_usage", "in_flight", "expected"),
    [(0.0, None, "b0"), (0.8, None, "b1"), (0.8, "same-session", "b0"), (0.0, "other", "b1")],
    ids=["fits", "scraped-free-kv-too-small", "prefix-in-use-by-its-session",
         "router-knows-before-the-scrape"],
)
def test_a_prompt_the_free_kv_cannot_take_goes_where_it_can_be_admitted(
    scraped_usage: float, in_flight: str | None, expected: str
) -> None:
    # b0 holds 240 of the prompt's 256 blocks in 1,000 blocks of KV. An engine admits a
    # prompt only with free blocks for all of it (its cached blocks nobody uses count as
    # free), and one that does not fit waits at the head of its queue until running requests
    # finish: far longer than recomputing 4k tokens on an idle b1.
    index = PrefixIndex()
    request = prompt(1, 4096, suffix=2)
    hold(index, "b0", request.block_hashes[:240])
    kv = policy()
    b0 = {"kv_usage_ratio": scraped_usage, "total_kv_blocks": 1000}
    b1 = idle("b1", kv_usage_ratio=0.0, total_kv_blocks=1000)
    if in_flight is not None:
        # Sent to b0 since its last scrape: a turn of the same session (the same 240-block
        # prefix, in use there, so admitting this request takes none of it again), or 900
        # blocks of another group's prompt.
        earlier = prompt(1, 4000, suffix=1) if in_flight == "same-session" else prompt(7, 14400)
        _dispatch(kv, earlier, idle("b0", **b0), index, b1)
        b0.update(in_flight_requests=1, in_flight_prompt_tokens=earlier.prompt_tokens)
    # Ten seconds on: the earlier request is predicted past its first token (nothing queued).
    picks = {kv.choose(request, view(index, idle("b0", **b0), b1, now_s=10.0)).backend_id
             for _ in range(10)}
    assert picks == {expected}
