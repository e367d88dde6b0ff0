"""kv_aware: route each request to the backend with the lowest predicted time to first token.

Algorithm, per request, for each candidate backend ``b`` (score in seconds):

    hit_tokens_b  = gpu_tokens + r_cpu * cpu_tokens + r_store * (storage_tokens + shared_tokens)
                    (the request's longest chain prefix ``b`` holds, from the prefix index, at
                    most prompt - 1 tokens since the last token is always computed; shared
                    tokens are in the fleet-shared store, held by every backend alike); each
                    lower tier's ratio is what loading it saves against recomputing it
                    (``tier_pricing``, below)
    prefill_s_b   = cost.seconds(new = prompt - hit_tokens_b, cached = hit_tokens_b)
    queued_s_b    = predicted prefill time of the work ahead: the larger of (a) the prefill
                    seconds this policy sent to ``b`` and not yet done: a streamed request's
                    until its first token is reported (``on_first_token``; past its predicted
                    first token, dispatch time + its ttft_s, it is overdue and counts in
                    full), any other's until its predicted first token, scaled down if the
                    router's in-flight prompt tokens show some of it already returned, and
                    (b) the engine's own waiting
                    requests times the mean prefill seconds of what was sent there
                    (``default_prompt_tokens`` cold before any history): traffic from other
                    router replicas shows up only there. With neither (no dispatch history
                    there, no engine numbers) the router's in-flight prompt tokens are taken
                    as cold queued prompts
    step_s_b      = cost.step_overhead_s(queued + own uncached tokens, running context): the
                    step floors and the decode work of running requests (context = the router's
                    in-flight prompt tokens, or the engine's running requests times their mean
                    size when larger) paid while those tokens are prefilled in chunks
    kv_pressure_s = kv_full_wait_s * max(0, (kv_usage - kv_knee_ratio) / (1 - kv_knee_ratio))**2
                    (admission waits for KV to free up; a cached prefix may be evicted first),
                    + admission_wait_s where b's free KV cannot take the prompt at all
                    ("Admission", below)
    ttft_s_b      = queued_s_b + prefill_s_b + step_s_b + kv_pressure_s_b
    decode_s_b    = min(max_tokens, decode_horizon_tokens) * cost.step_overhead_s(0, running
                    context + prompt, at most total_kv_blocks * block_size when known), MIXED
                    backends only: the first output tokens decode in that engine's batch, so a
                    big running batch costs every one of them (the KV cap keeps a queue, priced
                    in queued_s, from also counting as decode work)
    externality_s = busy ** busy_power * (stall_ratio * in_flight_b * (prefill_s_b
                    + stall_step_ratio * stall_step_s_b) + fleet_work_ratio * prefill_s_b)
                    + work_floor_ratio * recompute_s_b,
                    stall_step_s_b = step_s_b, or, while every candidate's engine reports
                    requests waiting for admission, step_s_b - cost.step_overhead_s(queued,
                    running context): only the steps this prompt's own tokens add,
                    recompute_s_b = cost.seconds of the tokens b holds in no tier it can load
                    from (prefill_s_b when everything held is in HBM),
                    busy = share of candidates with requests in flight (in_flight_b: the
                    router's count or the engine's running, the larger)
    placement_s_b = - home_credit_ratio * (prefill seconds the remembered prefix would save) at
                    the prefix's home (the backend that last received it, kept after eviction:
                    ``policies.placement``); elsewhere + duplicate_ratio * full_b * (prefill
                    seconds of the prefix tokens another candidate holds and b would copy),
                    full_b = (held_blocks / total_blocks - cache_full_knee_ratio) /
                    (1 - cache_full_knee_ratio), clipped to [0, 1]; for a prefix nobody holds
                    or remembers, once the remembered working set (placement memory) passes
                    cache_full_knee_ratio of the candidates' KV memory, instead + partition_ratio
                    * prefill_s_b * (homed_b - least homed) / mean homed, homed_b = blocks
                    whose home is b; short of that, + partition_ratio * prefill_s_b on each b
                    whose own homed_b passes cache_full_knee_ratio of its KV memory; all times
                    (1 + fleet_work_ratio * busy ** busy_power), the price of a prefill second
                    in externality_s, since they are prefill seconds won or lost later
    score_b       = ttft_s_b + decode_s_b + externality_s_b + placement_s_b
    speed_b       = b's learned speed factor (``policies.prefill_cost.BackendSpeed``; 1 for a
                    backend as fast as the fleet's median): queued_s, prefill_s, step_s,
                    externality_s and placement_s of b are all times speed_b (decode_s is not)

Why ``decode_s``: TTFT alone lets a holder keep a hot prefix until one decode step of its batch
costs as much as a cold prefill elsewhere (0.27 s for 8k tokens, ~650k tokens of running
context); the hot tenants' engine then runs TPOT 0.2 s while others idle. Each token of the
horizon turns running-context differences into seconds, so affinity yields gradually. Eight
tokens (the default) bring the 20 req/s multi-tenant simulation to imbalance 1.17 at 98% of the
oracle's hits; longer horizons spread harder and lose hits under saturation (docs/simulation.md).

Why ``externality_s`` (issue 12; docs/simulation.md "Across the capacity edge"): a score of
one request's own time sends a prefill wherever it starts soonest, even when it stalls every
decode running there (a chunked prefill step is long and each running request waits for it)
and when the tokens it recomputes are work the whole fleet will queue behind. Near capacity
those costs compound: batches grow, steps slow, KV fills and preemptions recompute whole
prompts. On the Mooncake trace at 7 engines that tipped every engine into 100% busy with
TPOT 0.29 s. Each request in flight on b is stalled once by this prefill (those queued ahead
are admitted first, so they are decoding when it runs), and with the fleet busy every
recomputed second delays the queue; both are charged in proportion to busy**2, so they cost
nothing while idle backends exist, where spreading for TTFT is free. The stall is the prefill's
own compute; ``stall_step_ratio`` (0.1) adds a tenth of its step overhead (the running batch's
decode work over the steps it spans): at 0 hot tenants pile onto holders whose batches are
already long (multi_tenant 30/s at 8 engines: TTFT p99 186 s against 36 s), at 1 a long batch
outweighs any cached prefix and deep overload replicates hot prompts (prefill GPU-s +9%).

Why the stall counts only a prefill's own steps past saturation (``stall_step_s``): the
stall's step term spans the queue ahead too, ``step_overhead_s(queued + own, context)``, and
that is what spreads hot tenants off holders whose batches are long and whose queues are deep
(without it multi_tenant 30/s at 8 engines reached TTFT p99 178 s, seed 0, and 82 s, seed 1,
against 38 and 26 s). It spreads toward admission capacity some backend has spare. Once every
candidate's engine reports requests waiting for admission (``engine_waiting_requests``; the
fleet is past what its engines admit, and late binding holds the excess), none has any: the
queue's steps stall that batch whether or not this request joins it, and only the steps its
own tokens add, ``step_overhead_s(queued + own) - step_overhead_s(queued)``, are its doing.
Charged the queue's steps there, each request was sent to whichever engine's queue was
momentarily shortest, and released held requests and sessions left the engine holding their
prefix (multi_tenant 30/s at 6 engines, seed 2: 70 of 1,533 follow-up turns moved, 20 of 288
tenants on 2-4 engines, prefill 678 GPU-s against sglang_cache_aware's 673; with the rule 23
moved, 7 tenants split, 670 GPU-s, TTFT p99 118 against 120 s). Unknown engine numbers never
count as saturated. The capacity-edge set meets sglang_cache_aware in all 36 cells with it
(docs/simulation.md, "Across the capacity edge").

Why the work floor (``work_floor_ratio``, 0.25): the fleet-work price scales with busy**2, so
with a quarter of the backends busy a recompute cost a sixteenth of the busy price, and a
holder with two requests queued lost a ~2,100-token prefix to an idle backend over a 7 ms
TTFT difference (the live agentic regime, seed 2: one agent's system prompt copied to a second
pod, pod hits 0.899 against sglang-router's 0.904). The floor charges a quarter of every
candidate's own prefill whatever the load. Where nothing is cached anywhere every candidate
pays the same and nothing changes; where one holds the prefix, leaving it must now save a
quarter of the recompute. Only recompute is floored: tokens a backend can load from a lower
tier it holds are not (a floor on load time too kept returning users behind their writer
despite a shared store). Live (bench/quality.py, seeds 1-2), agentic tied sglang-router's
0.904 hits in one run and was 0.003 short in the next: one copied prefix is the whole gap
(bench/README.md); the copy cutoff (below) closed that gap. Simulated, the capacity-edge set
still meets sglang_cache_aware in every cell (docs/simulation.md, "The work floor").

Why ``placement_s``: engine events say where a prefix IS, and once it is evicted everywhere
they say nothing; spreading it anew each time makes every cache hold copies of the same
prefixes instead of a stable share of the working set, and under cache pressure the partition
is what holds hits (sglang-router's tree never forgets, which is why it won there). The home
credit keeps that partition; the copy price keeps a busy holder's prefix from being duplicated
into a full cache, where it evicts as much as it saves. The partition price places new
prefixes: when the working set outgrows the caches, each backend's hit rate falls with the
working set homed on it, and predicted TTFTs of idle backends tie, so a draw let homes drift
apart (10 to 14 groups per engine in the 700-block simulation) and the crowded caches thrashed;
sending a new prefix where the least is homed keeps the shares even, as sglang-router's
smallest-tree rule does (docs/simulation.md, "Cache pressure and late events"). The fleet's
caches can hold the working set while one backend's share overflows its own: near saturation
held requests are released to whichever backend frees up first, and in the live saturation
regime one pod was homed with 44 of 144 groups against 29 on another and evicted some, where
every peer kept all. A new prefix homed on such a backend evicts one of its prefixes, so it is
charged a whole prefill there.

Why first tokens (``on_first_token``): a forecast of queued prefill that ends at its predicted
time makes a backend slower than the cost model (a throttled GPU, a noisy neighbour, a batch
the model underrates) look idle once its forecasts lapse, so it keeps receiving work. A
streamed request's forecast now ends at its reported first token, and counts in full while
overdue. The groups trace at 80 req/s on 4 engines, one 4x slower (``simulate --slow-backend
0=4``): TTFT p99 0.73 -> 0.61 s (sglang_cache_aware 0.66); and in a homogeneous fleet past
capacity the queues it sees are real ones: multi_tenant 30 req/s at 6 engines 827 -> 786
prefill GPU-seconds, preemptions 8 -> 0; mixed 20 req/s at 6, 1,002 -> 916 GPU-s.

Why a learned speed (``speed_b``): first tokens stop a slow backend from looking idle while it
is late, but once it catches up its queue and the next prefill are priced at the cost model's
speed again, and it is offered work as if it were as fast as the rest. Its first tokens say
how fast it really is: each streamed request predicted at least ``speed_min_ttft_s`` (20 ms:
shorter ones are mostly network and the engine's tokenizer) with nothing predicted queued ahead
of it and its KV below ``kv_knee_ratio`` (else the lateness may be a queue or an admission wait
the model priced wrong) compares its TTFT with the prediction, and ``BackendSpeed`` turns the
ratios into factors against the fleet's median, equal within ``speed_band_ratio`` (2: at 1.5,
live overload on homogeneous pods, where first tokens are late by what a CPU-bound machine and
a full batch add, priced one pod slow and moved its groups, hits 0.766 against 0.774 in one of
four seeds); a factor nothing has taught for ``speed_memory_s`` (60 s) is forgotten, so a
backend that recovered is offered work again (one priced as slow gets little, and so teaches
little). Forecasts are stored at the model's speed, so the factor never feeds itself. It
scales what a first token measures (the prefills ahead, this one, its steps, and the prices
made of them), not ``decode_s``: decode is bound by memory bandwidth where prefill is bound by
compute, so a GPU throttled in one need not be in the other, and scaled, the decode horizon
of a 4x engine (8 steps at 4x) outweighed a cached prefix there, so kv_aware moved the groups
it held and lost their hits (live slow_pod, four seeds: 0.769 against 0.773 unscaled, the
same TTFT p99). The same groups trace: TTFT p99
0.61 -> 0.10 s (an oracle factor of 4 from the start gives 0.13 s); the capacity-edge set,
homogeneous, keeps its TTFT p99, prefill GPU-seconds, preemptions and hits in all 36 cells
(docs/simulation.md, "A slow engine"). A mixed fleet (H100s beside H200s, a smaller
tensor-parallel group) is the same case at ~2x, the band's edge. The router exports the
factors as ``kvrouter_backend_speed_factor{backend}``; ``/debug/route`` shows ``speed_factor``.

Late binding (``defer``): while no prefill candidate has KV room for the prompt, the router
holds the request (``router.hold``; the simulator alike) and asks again when a request
finishes or has its first token. Room is ``policies.kv_commitment``: what this policy sent a backend and is unfinished
(its uncached prompt blocks, each counted once however many in-flight requests there share
it, plus up to ``hold_output_tokens`` of output per request) plus this prompt within
``hold_kv_ratio`` (0.9) of its KV memory; an empty backend or an unknown KV size always has
room. An engine admits whatever fits at the instant and preempts when decodes outgrow it;
past capacity, holding the excess in the router places it when a backend has room, on
fresher cache state. The ratio was swept from 0.2 to 1.0 on the capacity-edge set (Mooncake
first half at 6-8 engines, multi_tenant 30/s and mixed 20/s at 6 and 8; docs/simulation.md,
"Late binding's KV ratio"). Low ratios hold more: 0.3 was at or below sglang_cache_aware's
TTFT p99, prefill GPU-seconds and preemptions in every cell, where 0.9 spent more prefill at 6
engines, but in deep overload 0.3 keeps requests waiting in the router (Mooncake at 6: TTFT
p50 146 against 89 s, 15.7% within a 2 s SLO against 30.0%, sglang 20.7%) and short of it the
hold binds where no engine would preempt (bench/quality.py's overload regime, simulated: TTFT
p99 0.61-0.69 s against 0.48-0.58 s at 0.9 over three seeds; live, four paired runs: 1.67
against 1.05 s). With first tokens ending forecasts (above), 0.9 meets sglang on all three
measures except mixed at 6 engines (916 against 850 prefill GPU-s, 27 against 26
preemptions), so 0.9 stays; an operator who prefers less recompute to a lower median in deep
overload can lower it. The held requests' commitment matches the engines' KV usage (0.68
against 0.64 at 0.3), and counting shared prefixes once moved that p99 from 0.78 to
0.74 s at 0.7.

The ratio follows the engines (``policies.preemption_backoff``): when a backend's scraped
``vllm:num_preemptions_total`` rises, its ratio is multiplied by ``hold_kv_backoff_ratio``
(0.33: from 0.9 to ``hold_kv_floor_ratio`` 0.3 at once) and climbs back linearly over
``hold_kv_recovery_s`` (300 s) without preemptions; a counter that goes down is an engine
restart. A preemption is the engine saying the commitment was optimistic: decodes outgrew the
KV the router counted. The hold uses the lowest ratio among the candidates, since it binds only
when no candidate has room: each backend's own ratio would bind only once every engine had
preempted (mixed 20/s at 6 engines, seed 0, preempts on two engines of six; held by each
backend's own ratio, seeds 0-2 ran identical to the fixed 0.9). Where no engine preempts
nothing changes: every such cell of the capacity-edge set and the live overload regime
simulated give results identical to the fixed 0.9. Mixed 20/s at 6 engines, seeds 0-2, TTFT
p99 s / prefill GPU-s / preemptions: 82 / 786 / 6, 81 / 766 / 7, 82 / 867 / 7, against
88 / 916 / 27, 62 / 966 / 20, 67 / 1,075 / 29 at the fixed 0.9 and sglang_cache_aware's
135 / 850 / 26, 177 / 986 / 53, 100 / 999 / 52. A floor of 0.4 leaves 892-915 GPU-s there; a
120 s recovery lets preemptions come back (8-18 against 5-8). What it costs is what 0.3 costs
where engines preempt all along: Mooncake first half at 6 engines holds at the floor, TTFT p99
318 against 303 s (sglang_cache_aware 352), prefill 4,221 against 4,861 GPU-s (4,893),
preemptions 249 against 959 (1,357), but p50 149 against 92 s (112) and 15.9% within the 2 s
SLO against 27.8% (20.7%); ``hold_kv_recovery_s`` 0 turns the backoff off
(docs/simulation.md, "The KV hold backs off on preemptions").

The router also holds while every prefill candidate has at least
``hold_queue_s`` (0.3 s) of prefill this policy predicts is queued there: past capacity, a request placed at arrival waits minutes in an engine's queue for a prefix
picture that is stale by the time it runs, so hot prefixes get copied to whichever queue looked
shortest. Held in the router, it is placed when a finish frees room, where its prefix is then.
On the synthetic multi-tenant workload at 6 engines (30 req/s against capacity for ~18) this
raised hits from 79.0 to 83.3% and cut prefill GPU-seconds by 9%; short of saturation it
never holds.

Tiers (``tier_pricing``, issue 18). A block below HBM is loaded, not recomputed: vLLM's
offloading connector copies it host-to-device (CPU tier), LMCache/Mooncake read it over the
network (shared store, a backend's storage tier). Loading T tokens takes
``load_s = T * kv_bytes_per_token / bandwidth`` (pinned H2D ``cpu_load_bytes_per_s``, 55.2 GB/s
measured on the H200; the store's ``shared_load_bytes_per_s``, 12.5 GB/s assumed: one 100 Gb/s
NIC) while recomputing them costs ``recompute_s = seconds(uncached after GPU hits) -
seconds(uncached after GPU + tier hits)`` from the same cost model. A tier's tokens count as
hits at ``r = max(0, 1 - load_s / recompute_s)``, so the score's prefill term is about
``seconds(cold part) + load_s``: 8k CPU tokens of the 8B model load in 19 ms against ~0.25 s
of prefill (r ~0.93), over the network in 86 ms (r ~0.68); for a short prefix the prefill is
cheap and the load's share grows. Tiers are priced in order GPU, CPU, store. ``load_time``
(default) does this; ``fixed_ratio`` uses ``cpu_hit_ratio`` and ``storage_hit_ratio`` (shared
as storage) as constants (the policy before issue 18); ``gpu_only`` is tier-blind: only GPU
blocks count (a router that ignores ``medium``, kept for comparisons). Without tiers in the
index all three give the same scores.

Admission: an engine admits a prompt only with free KV blocks for it, and admits in arrival
order, so one that does not fit waits at the head of the queue, and holds everything behind
it, until running requests finish: for a long context, tens to hundreds of seconds. Its
cached prefix does not help: vLLM takes cached blocks nobody uses from the same free pool
(they count as free in ``kv_usage_ratio``), and a lower tier's tokens need HBM slots before
their load starts. Only blocks already in use by a running request are free of charge. So
where ``ceil(prompt / block_size)`` minus the longest prefix the request shares with one in
flight there (this policy's own dispatches) is more than the free blocks, ``total_kv_blocks``
minus the larger of the scraped ``kv_usage_ratio`` share and the distinct blocks of the
requests in flight there (fresher than any scrape), ``admission_wait_s`` (100 s: practically
"only if every backend waits") joins ``kv_pressure_s``. The hits stay priced: where every
backend waits, the one holding the prefix still computes least. Unknown KV numbers: no wait.
On long-context agents (``synthetic:long_agent``, 16 engines of the Qwen3-32B shape, which
holds 226k tokens of KV, contexts of 30k-200k tokens) the tail was steps queued behind a
context that did not fit beside another one: TTFT p99 122-187 s over five seeds, with HBM
only or a CPU tier, and 44-62 s with the wait priced. On workloads whose prompts are small beside KV memory it fires only
with KV nearly full (docs/simulation.md, "Admission").

(``policies.prefill_cost`` holds the formulas and their H200 Llama-3.1-8B defaults.)

The choice is a softmax over ``-score / T`` drawn with the injected RNG, with
``T = max(temperature_s, temperature_ratio * best score)``: backends whose predicted TTFT is
within a few T of the best are near-ties and share the traffic (new prefixes spread over idle
backends instead of collapsing onto the first one); far worse ones are practically never
picked. While some candidate is idle, a candidate that computes more prompt tokens than the
best one (a copy of a prefix the best holds) is drawn only within ``copy_cutoff_t`` (2) T of it:
several equivalent alternatives a few T worse add up, and in the live agentic regime three idle
pods ~2.7 T behind an agent's holder took ~17% of the draw between them and copied its system
prompt. With every candidate busy the draw keeps its full width: queue forecasts then err by
more than a few T, and cutting there lengthened tails (Mooncake with a CPU tier at 7 engines,
TTFT p99 5.69 against 5.60 s over five seeds; docs/simulation.md). Among the near-ties
within one T of the best, only those that compute the fewest prompt tokens share the draw
(``ties_save_work``): equal TTFTs, so the choice that leaves the fleet the most prefill
capacity for what arrives next. It decides bursts: a second request of
a prefix whose prefill has just started elsewhere scores about the same there (it waits for
that prefill, then hits) as on an idle backend (it computes the prefix again), and the draw
copied the prefix about half the time, taking a backend from the next new prefix. Live
(``bench/quality.py --regimes agentic,light,pressure --seeds 3,4``, 4 emulated pods): agentic
hits 0.904 against 0.902 (sglang-router 0.904), the first wave one agent kind per pod (its
slowest first token 0.106 against 0.149 s); pressure hits 0.497 against 0.477 (0.467-0.484). Affinity yields to load continuously: each queued second adds one second to the
holder's score, so a holder keeps requests whose cached prefix saves more than its queue
costs, and sheds the rest (a hot prefix gets replicated on a second backend when its holder
is saturated, because that is then the fastest place to prefill it).

Roles: prefill decisions go to MIXED or PREFILL backends (DECODE ones only if nothing else is
eligible). When the winner is a PREFILL backend and DECODE backends exist, the decode side is
the DECODE backend with the fewest in-flight requests (ties by RNG) and the Decision is split.

Where cache knowledge comes from: backends with ``kv_events`` are matched in ``view.index``,
the caller's index fed by engine events (read-only here), when the request's tokens are exact
and unsalted (``RouteRequest.matches_events``). For backends without events, and for requests
whose tokens were only estimated or that carry a ``cache_salt`` (engine events do not say a
block's salt), the policy keeps its own approximate ``PrefixIndex`` of what it sent (``record_dispatch`` in
``on_dispatched``, entries expire after ``approx_ttl_s``, at most ``approx_capacity_blocks``
per backend or the engine's own ``total_kv_blocks`` when known), like any policy's memory of
its own decisions; ``on_backend_removed`` purges it. Engine events trail the prefill that
stores the blocks (plus delivery lag), so for ``recent_ttl_s`` (0.5 s) after a dispatch the
prompt's blocks count as GPU-cached where it was sent, whatever the index says: without it a
group's next requests, arriving before the events, spread and copy the prefix (simulated at
110 req/s with events 0.3 s late: 35.9% hits against sglang_cache_aware's 76.4%). ``choose`` mutates nothing a later
``choose`` could see except the RNG: it only drops pending prefills predicted done before
``now_s``, which no later call (``now_s`` never decreases) would count anyway.

Cost per request: O(blocks matched + backends), plus amortised O(log n) per dispatch for the
pending-prefill heaps and O(blocks) to record the prompt's home (and its approximate-mode
record). A chain recorded on the same backend less than ``record_refresh_s`` (1 s) ago is not
recorded again (``policies.kv.refresh``): a hot prompt, or a sibling replica's replay of
it, then costs O(1) there; its records' expiry and LRU place are then at most that much older
than every dispatch's re-recording would leave them (``_recorded_lately``). Pure: no I/O,
clock or global RNG.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from policies.base import PolicyBase
from policies.kv.index import PrefixIndex
from policies.kv.peers import PeerWork
from policies.kv.refresh import RecordRefresh
from policies.kv_commitment import KvCommitment
from policies.params import parse_params
from policies.placement import PlacementMemory
from policies.preemption_backoff import PreemptionBackoff
from policies.prefill_cost import BackendSpeed, PendingPrefill, PrefillCost
from policies.types import (
    BackendId,
    BackendMatch,
    BackendScore,
    BackendState,
    BlockHash,
    ClusterView,
    Decision,
    Prediction,
    Role,
    RouteRequest,
    SharedState,
    value_type,
)

__all__ = ["KvAware", "KvAwareParams", "create"]

_TIER_PRICING = ("load_time", "fixed_ratio", "gpu_only")


@value_type  # built per request: a frozen dataclass's init is ~7x slower
class _FleetContext:
    """Per-request facts about the whole candidate set, computed once per ``choose``."""

    busy_weight: float  # (share of candidates with requests in flight) ** busy_power
    prefill_price: float  # what a prefill second won or lost later is worth now:
    # 1 + fleet_work_ratio * busy_weight, the same price externality_s puts on one
    home: BackendId | None  # where this prefix was last sent (placement memory)
    home_blocks: int  # how many of its leading blocks that record covers
    deepest_blocks: int  # the longest prefix any candidate holds
    full_caches: Mapping[BackendId, float]  # the candidates whose cache fill (held / total
    # blocks) is past cache_full_knee_ratio, and that fill: only there does a copy cost
    partition: Mapping[BackendId, float]  # a new prefix's homing price shares (empty: none)
    prompt_tokens: int  # the prompt, at least its full blocks
    cap_tokens: int  # the most of it a cache can hold: engines always compute the last token
    cold_prefill_s: float  # its whole prefill, where nothing is cached
    decode_tokens: int  # output tokens whose decode joins the score
    saturated: bool  # every candidate's engine reports requests waiting for admission: the
    # fleet is past what its engines admit (unknown numbers: not saturated)


class _Terms(Mapping[str, float]):
    """A score's terms by name, built on first read. Only people read them (``/debug/route``,
    tests); a dict of 17 per candidate and request cost ~0.5 us each, a third of a
    microsecond more than keeping the numbers (``bench/policy_scale.py``)."""

    __slots__ = ("_numbers", "_terms")

    def __init__(self, numbers: tuple[float, ...]) -> None:
        self._numbers = numbers
        self._terms: dict[str, float] | None = None

    def _built(self) -> dict[str, float]:
        if self._terms is None:
            (ttft_s, queued_s, prefill_s, kv_pressure_s, hit, gpu, cpu, storage, shared, step_s,
             decode_s, externality_s, placement_s, queued_tokens, context,
             prompt, speed) = self._numbers
            self._terms = {
                "ttft_s": ttft_s,
                "queued_s": queued_s,
                "prefill_s": prefill_s,
                "kv_pressure_s": kv_pressure_s,
                "hit_tokens": hit,
                "gpu_tokens": float(gpu),
                "cpu_tokens": float(cpu),
                "storage_tokens": float(storage - shared),
                "shared_tokens": float(shared),
                "step_s": step_s,
                "decode_s": decode_s,
                "externality_s": externality_s,
                "placement_s": placement_s,
                "queued_tokens": queued_tokens,
                "running_context_tokens": context,
                "uncached_tokens": prompt - hit,
                "prompt_tokens": float(prompt),
                "speed_factor": speed,
            }
        return self._terms

    def __getitem__(self, name: str) -> float:
        return self._built()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._built())

    def __len__(self) -> int:
        return len(self._built())

    def __repr__(self) -> str:
        return repr(self._built())


@dataclass(frozen=True, slots=True)
class KvAwareParams:
    """Every weight has a unit; defaults: the H200 Llama-3.1-8B fit and measured peer choices."""

    linear_s_per_token: float = 29.3e-6
    attention_s_per_token_pair: float = 0.393e-9
    step_floor_s: float = 0.004  # fixed cost of one engine step
    decode_s_per_context_token: float = 0.4e-6  # per step, per context token of running requests
    max_batched_tokens: int = 8192  # prefill chunk per step (vLLM max_num_batched_tokens)
    cpu_hit_ratio: float = 0.8  # fixed_ratio only: share of a block's prefill saved from CPU
    storage_hit_ratio: float = 0.3  # fixed_ratio only: ... from storage or the shared store
    tier_pricing: str = "load_time"  # load_time | fixed_ratio | gpu_only (tier-blind)
    kv_bytes_per_token: int = 131072  # KV of one token, all layers (Llama-3.1-8B bf16)
    cpu_load_bytes_per_s: float = 55.2e9  # pinned host-to-device copy (H200, measured)
    shared_load_bytes_per_s: float = 12.5e9  # shared store / storage read (100 Gb/s NIC, assumed)
    prefill_memory_requests: int = 16  # moving-average window of prefill seconds per request
    default_prompt_tokens: int = 1024  # cold size of an engine-waiting request without history
    kv_full_wait_s: float = 1.0  # predicted admission wait with the KV cache 100% used
    kv_knee_ratio: float = 0.8  # KV usage below which admission does not wait
    admission_wait_s: float = 100.0  # predicted wait of a prompt whose blocks the backend's
    # free KV cannot take: it waits for running requests to finish (0: off; docstring,
    # "Admission")
    decode_horizon_tokens: int = 8  # output tokens whose decode time joins the score
    temperature_s: float = 0.002  # TTFT differences of this size are noise
    temperature_ratio: float = 0.02  # ... or this share of the best predicted TTFT
    ties_save_work: bool = True  # among backends within one T of the best, only those that
    # compute the fewest prompt tokens share the draw
    copy_cutoff_t: float = 2.0  # while some candidate is idle, a backend that computes more
    # prompt tokens than the best one is never drawn when more than this many T worse (0: off)
    approx_ttl_s: float = 120.0  # approximate mode: how long a dispatched prefix stays cached
    approx_capacity_blocks: int = 65536  # approximate mode: blocks a backend is assumed to hold
    approx_max_entries: int = 1_000_000  # approximate mode: the policy's own index budget
    stall_ratio: float = 1.0  # share of a prefill charged per request it stalls on the backend
    stall_step_ratio: float = 0.1  # share of the prefill's step overhead charged with it
    fleet_work_ratio: float = 3.0  # share of a prefill charged again as work the fleet queues behind
    work_floor_ratio: float = 0.25  # share of a prefill charged even with the fleet idle: a
    # recompute of what another backend holds is never free (docstring, "Why the work floor")
    busy_power: float = 2.0  # both charges scale with (share of backends with requests) ** this
    home_credit_ratio: float = 1.0  # share of an evicted prefix's prefill credited to its home
    duplicate_ratio: float = 1.0  # share of a prefix copy's prefill charged to a full cache
    cache_full_knee_ratio: float = 0.8  # cache fill (held / total blocks) where copies start to cost
    home_max_blocks: int = 1_000_000  # placement memory budget (blocks remembered fleet-wide)
    partition_ratio: float = 1.0  # share of a new prefix's prefill charged per mean share of
    # the remembered working set a backend is homed with beyond the least-homed one, once that
    # working set passes cache_full_knee_ratio of the candidates' KV memory
    recent_ttl_s: float = 0.5  # a dispatched prefix counts as cached there until events say
    # so, for this long (0: trust events only)
    record_refresh_s: float = 1.0  # a prompt chain recorded on a backend (approximate index,
    # placement memory) less than this long ago is not recorded again for the same backend
    # (0: every dispatch records)
    hold_kv_ratio: float = 0.9  # hold in the router while every backend's committed KV is past
    # this share of its KV memory (0: never hold)
    hold_output_tokens: int = 1024  # output tokens a request is assumed to commit, at most
    hold_queue_s: float = 0.3  # ... or while every backend has at least this much predicted
    # prefill queued (0: never)
    hold_kv_floor_ratio: float = 0.3  # the hold ratio, while engines preempt, at the lowest
    hold_kv_backoff_ratio: float = 0.33  # ... times this per scrape with new preemptions (1: off)
    hold_kv_recovery_s: float = 300.0  # ... climbing back from the floor to hold_kv_ratio in
    # this long without preemptions (0: off)
    speed_window_requests: int = 32  # first tokens a backend's learned speed mostly rests on
    speed_min_requests: int = 1  # first tokens before a backend's speed counts
    speed_min_ttft_s: float = 0.02  # only first tokens predicted at least this long, with
    # nothing predicted queued ahead of them, teach speed
    speed_band_ratio: float = 2.0  # speeds within this factor of the fleet's median count as equal
    speed_max_ratio: float = 16.0  # the largest factor a learned speed applies (1: off)
    speed_memory_s: float = 60.0  # a backend's speed taught nothing for this long is forgotten

    def __post_init__(self) -> None:
        for name in ("cpu_hit_ratio", "storage_hit_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be within [0, 1]")
        if self.tier_pricing not in _TIER_PRICING:
            raise ValueError(f"tier_pricing must be one of {', '.join(_TIER_PRICING)}")
        if (self.kv_bytes_per_token < 0 or self.cpu_load_bytes_per_s <= 0
                or self.shared_load_bytes_per_s <= 0):
            raise ValueError("kv_bytes_per_token must be >= 0 and the load bandwidths > 0")
        if not 0.0 <= self.kv_knee_ratio < 1.0:
            raise ValueError("kv_knee_ratio must be within [0, 1)")
        if self.temperature_s <= 0 or self.temperature_ratio < 0:
            raise ValueError("temperature_s must be > 0 and temperature_ratio >= 0")
        if self.copy_cutoff_t < 0:
            raise ValueError("copy_cutoff_t must be >= 0")
        if self.decode_horizon_tokens < 0:
            raise ValueError("decode_horizon_tokens must be >= 0")
        for name in ("stall_ratio", "stall_step_ratio", "fleet_work_ratio", "work_floor_ratio",
                     "busy_power",
                     "home_credit_ratio", "duplicate_ratio", "partition_ratio"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.recent_ttl_s < 0:
            raise ValueError("recent_ttl_s must be >= 0")
        if not 0.0 <= self.record_refresh_s < math.inf:
            raise ValueError("record_refresh_s must be >= 0 and finite")
        if self.hold_kv_ratio < 0 or self.hold_output_tokens < 0 or self.hold_queue_s < 0:
            raise ValueError("hold_kv_ratio, hold_output_tokens and hold_queue_s must be >= 0")
        if self.hold_kv_floor_ratio < 0 or self.hold_kv_recovery_s < 0:
            raise ValueError("hold_kv_floor_ratio and hold_kv_recovery_s must be >= 0")
        if not 0.0 < self.hold_kv_backoff_ratio <= 1.0:
            raise ValueError("hold_kv_backoff_ratio must be within (0, 1]")
        if not 0.0 <= self.cache_full_knee_ratio < 1.0:
            raise ValueError("cache_full_knee_ratio must be within [0, 1)")
        for name in ("prefill_memory_requests", "default_prompt_tokens", "approx_capacity_blocks",
                     "approx_max_entries", "home_max_blocks", "speed_window_requests",
                     "speed_min_requests"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.approx_ttl_s <= 0 or self.kv_full_wait_s < 0 or self.admission_wait_s < 0:
            raise ValueError(
                "approx_ttl_s must be > 0, kv_full_wait_s and admission_wait_s >= 0")
        if self.speed_band_ratio < 1.0 or self.speed_max_ratio < 1.0:
            raise ValueError("speed_band_ratio and speed_max_ratio must be >= 1")
        if self.speed_min_ttft_s < 0 or self.speed_memory_s <= 0:
            raise ValueError("speed_min_ttft_s must be >= 0 and speed_memory_s > 0")
        self.cost()

    def cost(self) -> PrefillCost:
        return PrefillCost(
            self.linear_s_per_token,
            self.attention_s_per_token_pair,
            self.step_floor_s,
            self.decode_s_per_context_token,
            self.max_batched_tokens,
        )


class KvAware(PolicyBase):
    name = "kv_aware"
    uses_kv_index = True

    def __init__(self, params: KvAwareParams, rng: random.Random) -> None:
        self.params = params
        self._rng = rng
        self._cost = params.cost()
        # what an engine-waiting request costs before any dispatch history there
        self._default_mean_s = self._cost.seconds(float(params.default_prompt_tokens))
        self._approx = PrefixIndex(max_entries=params.approx_max_entries)
        self._homes = PlacementMemory(params.home_max_blocks)
        self._recent = PrefixIndex(max_entries=params.approx_max_entries)
        self._refresh = RecordRefresh(params.record_refresh_s)
        self._pending: dict[BackendId, PendingPrefill] = {}
        # request id -> (prefill backend, its forecast's key there, dispatch time, predicted
        # TTFT at the cost model's speed) until the first token or the finish retires it
        self._forecasts: dict[str, tuple[BackendId, int, float, float]] = {}
        self._committed = KvCommitment(params.hold_output_tokens)
        self._peers = PeerWork()  # replica peers' pending prefill (policies.replica_sync)
        # chains whose recent-dispatch record peers heard of lately (shares_dispatch)
        self._shared_recent = RecordRefresh(params.recent_ttl_s / 2)
        self._backoff = PreemptionBackoff(params.hold_kv_ratio, params.hold_kv_floor_ratio,
                                          params.hold_kv_backoff_ratio, params.hold_kv_recovery_s)
        self._speed = BackendSpeed(params.speed_window_requests, params.speed_min_requests,
                                   params.speed_band_ratio, params.speed_max_ratio,
                                   params.speed_memory_s)

    # ---- scoring ------------------------------------------------------------------------------

    def _matches(
        self, request: RouteRequest, view: ClusterView, candidates: tuple[BackendState, ...]
    ) -> Mapping[BackendId, BackendMatch]:
        hashes = request.block_hashes
        if not hashes:
            return {}
        # Engine events describe the engine's unsalted token blocks; an estimated prompt (no
        # tokenizer for its model) hashes character chunks and a salted one hashes in its
        # salt's namespace, neither of which can match them, so such requests are matched
        # against the policy's own record of where it sent them instead.
        exact = request.matches_events
        precise = exact and view.index is not None and any(b.kv_events for b in candidates)
        found: Mapping[BackendId, BackendMatch] = (
            view.index.match(hashes, view.now_s) if precise and view.index else {})
        if precise and view.index is not None and (shared := view.index.shared_prefix(hashes)):
            # The fleet-shared tier is every backend's, heard from or not.
            found = {b.backend_id: BackendMatch(b.backend_id, shared, 0, shared_blocks=shared)
                     for b in candidates if b.kv_events} | dict(found)
        if precise and self.params.recent_ttl_s:
            found = self._with_recent(hashes, view.now_s, found)
        if precise and all(b.kv_events for b in candidates):
            return found
        approx = self._approx.match(hashes, view.now_s)
        return {
            b.backend_id: m
            for b in candidates
            if (m := (found if exact and b.kv_events else approx).get(b.backend_id)) is not None
        }

    def _with_recent(
        self, hashes: tuple[BlockHash, ...], now_s: float, found: Mapping[BackendId, BackendMatch]
    ) -> Mapping[BackendId, BackendMatch]:
        """Engine events arrive after the prefill that stores the blocks, plus delivery lag:
        a prefix dispatched moments ago is where it will be cached, but the index cannot say
        so yet. Its dispatch record (kept ``recent_ttl_s``) counts as a GPU hit until then."""
        recent = self._recent.match(hashes, now_s)
        if not recent:
            return found
        merged = dict(found)
        for backend_id, m in recent.items():
            held = merged.get(backend_id)
            if held is None or held.matched_blocks < m.matched_blocks:
                merged[backend_id] = m
        return merged

    def _score(
        self,
        request: RouteRequest,
        backend: BackendState,
        match: BackendMatch | None,
        now_s: float,
        fleet: _FleetContext,
    ) -> BackendScore:
        p = self.params
        bs = request.block_size
        prompt, cap = fleet.prompt_tokens, fleet.cap_tokens
        gpu = cpu = storage = shared = 0
        if match is None:
            # Nothing cached here: the same prefill as every other such candidate, computed
            # once per request (they differ only in load and placement).
            hit, prefill_s = 0.0, fleet.cold_prefill_s
            floor_s = p.work_floor_ratio * prefill_s
        else:
            gpu, cpu = match.gpu_blocks * bs, match.cpu_blocks * bs
            shared = match.shared_blocks * bs
            storage = match.storage_blocks * bs + shared
            # Past the cap, give up the slowest tiers first (they save the least).
            over = max(gpu + cpu + storage - cap, 0)
            cut = min(storage, over)
            storage, over = storage - cut, over - cut
            cut = min(cpu, over)
            cpu, gpu = cpu - cut, gpu - (over - cut)
            loads = cpu or storage
            hit = self._hit_tokens(prompt, gpu, cpu, storage) if loads else float(gpu)
            shared = min(shared, storage)  # past the cap the store's blocks go first
            prefill_s = self._cost.seconds(prompt - hit, hit)
            # The work floor prices recompute only: what this backend can load from a lower
            # tier it holds (as the policy's tier pricing sees it) is not computed again.
            held_here = gpu + cpu + storage if loads and hit != gpu else gpu
            floor_s = p.work_floor_ratio * (
                prefill_s if held_here == hit else self._cost.seconds(prompt - held_here,
                                                                      held_here))
        held = gpu + cpu + storage
        placement_s = 0.0  # elsewhere than its home, in a cache short of full, with no partition
        if (min(fleet.home_blocks * bs, cap) > held if backend.backend_id == fleet.home
                else fleet.partition or backend.backend_id in fleet.full_caches):
            # (At its home, only a remembered prefix it no longer holds earns a credit.)
            placement_s = self._placement_s(request, backend, fleet, prompt, cap, held, hit,
                                            prefill_s)

        pending = self._pending.get(backend.backend_id)
        own_s = own_tokens = own_prompt = mean_s = mean_tokens = 0.0
        placed = pending is not None  # some of its work was placed by this policy (or a peer)
        if pending is not None:
            # Bookkeeping only: what is predicted done by now_s stays done for any later call.
            pending.expire(now_s)
            own_s, own_tokens = pending.remaining_s(now_s), pending.new_tokens
            own_prompt = float(pending.prompt_tokens)
            mean_s, mean_tokens = pending.mean_prefill_s, pending.mean_new_tokens
        if self._peers and (peer := self._peers.pending(backend.backend_id, now_s)) is not None:
            placed = True
            own_s, own_tokens, own_prompt = (own_s + peer[0], own_tokens + peer[1],
                                             own_prompt + peer[2])
            if not mean_tokens and (means := self._peers.means(backend.backend_id)) is not None:
                mean_s, mean_tokens = means
        if placed and own_prompt > backend.in_flight_prompt_tokens:
            returned = backend.in_flight_prompt_tokens / own_prompt
            own_s, own_tokens = own_s * returned, own_tokens * returned
        if not mean_tokens:
            mean_tokens, mean_s = float(p.default_prompt_tokens), self._default_mean_s
        waiting = backend.engine_waiting_requests or 0
        queued_s, queued_tokens = own_s, own_tokens
        if waiting * mean_s > own_s:  # traffic this policy did not send (other replicas)
            queued_s, queued_tokens = waiting * mean_s, waiting * mean_tokens
        elif (not placed and backend.engine_waiting_requests is None
              and backend.in_flight_requests and backend.in_flight_prompt_tokens):
            # In flight there, but not placed by this policy and no engine numbers: the only
            # evidence is the router's counters, so assume all of it still needs prefill.
            queued_tokens = float(backend.in_flight_prompt_tokens)
            queued_s = backend.in_flight_requests * self._cost.seconds(
                queued_tokens / backend.in_flight_requests)

        # Decode work of running requests slows every step our prefill shares with them.
        context = float(backend.in_flight_prompt_tokens)
        if backend.engine_running_requests is not None:
            mean_prompt = (context / backend.in_flight_requests if backend.in_flight_requests
                           else float(p.default_prompt_tokens))
            context = max(context, backend.engine_running_requests * mean_prompt)
        step_s = self._cost.step_overhead_s(queued_tokens + prompt - hit, context)
        # The stall's steps: all of them, the queue's too (the queue spreads hot tenants off
        # long batches), unless every engine has requests waiting for admission. Then the
        # queue's steps stall the batch wherever this request goes, and only those its own
        # tokens add are its doing (module docstring, "Why the stall counts ...").
        stall_step_s = (step_s - self._cost.step_overhead_s(queued_tokens, context)
                        if fleet.saturated else step_s)

        usage = backend.kv_usage_ratio
        pressure = 0.0
        if usage is not None and usage > p.kv_knee_ratio:
            pressure = min((usage - p.kv_knee_ratio) / (1.0 - p.kv_knee_ratio), 1.0)
        kv_pressure_s = p.kv_full_wait_s * pressure * pressure
        if p.admission_wait_s and self._admission_waits(backend, request, prompt, bs, gpu):
            kv_pressure_s += p.admission_wait_s
        speed = self._speed.factor(backend.backend_id, now_s)
        if speed != 1.0:
            # A backend slower than the fleet computes all of it slower: its queue, this
            # prefill and its steps, and the prices made of them (BackendSpeed).
            queued_s, prefill_s, step_s = queued_s * speed, prefill_s * speed, step_s * speed
            stall_step_s *= speed
            floor_s, placement_s = floor_s * speed, placement_s * speed
        ttft_s = queued_s + prefill_s + step_s + kv_pressure_s
        # The first output tokens are decoded beside the running batch there: without this,
        # a holder keeps its hot prefix until its decode steps cost as much as a cold prefill.
        # Only MIXED backends: a split's decode side is priced by the disaggregation wrapper,
        # which also asks this policy where a DECODE backend would prefill fastest.
        decode_s = 0.0
        if backend.role is Role.MIXED:
            decode_context = context + prompt
            if backend.total_kv_blocks is not None:
                # A batch never holds more context than KV memory; the rest waits (queued_s).
                decode_context = min(decode_context, float(backend.total_kv_blocks * bs))
            decode_s = fleet.decode_tokens * self._cost.step_overhead_s(0.0, decode_context)
        # What this prefill costs everyone else, priced only as the fleet fills up.
        # Every request in flight there is decoding by the time this prefill runs (those queued
        # ahead are admitted first), so each one is stalled by it.
        running = max(backend.in_flight_requests, backend.engine_running_requests or 0)
        externality_s = fleet.busy_weight * (
            p.stall_ratio * running * (prefill_s + p.stall_step_ratio * stall_step_s)
            + p.fleet_work_ratio * prefill_s) + floor_s
        # Positional, in field order: keywords cost twice as much to build these two per
        # candidate and request (0.7 against 0.33 us).
        return BackendScore(
            backend.backend_id,  # backend_id
            ttft_s + decode_s + externality_s + placement_s,  # score
            gpu + cpu + storage,  # matched_tokens
            _Terms((ttft_s, queued_s, prefill_s, kv_pressure_s, hit, gpu, cpu, storage, shared,
                    step_s, decode_s, externality_s, placement_s, queued_tokens, context,
                    prompt, speed)),  # terms
            Prediction(
                ttft_s,  # ttft_s
                prefill_s,  # prefill_s
                prompt - hit,  # uncached_tokens
                prompt,  # prompt_tokens
                backend.kv_events and request.matches_events,  # kv_events
                backend.total_kv_blocks or p.approx_capacity_blocks,  # capacity_blocks
                speed,  # speed
                queued_s + kv_pressure_s,  # wait_s
            ),  # prediction
        )

    def _admission_waits(self, backend: BackendState, request: RouteRequest, prompt: int,
                         block_size: int, gpu_tokens: int) -> bool:
        """Whether ``backend``'s free KV cannot take the prompt's blocks (docstring,
        "Admission"). Unknown KV numbers: False. ``gpu_tokens``: its prefix cached there."""
        usage, total = backend.kv_usage_ratio, backend.total_kv_blocks
        if usage is None or total is None or block_size <= 0:
            return False
        need = -(-prompt // block_size)
        used = usage * total
        # In flight counts each request's whole prompt, shared prefixes again: an upper bound
        # that settles nearly every call without looking at blocks.
        if need <= total - max(used, backend.in_flight_prompt_tokens / block_size):
            return False
        committed = self._committed
        backend_id = backend.backend_id
        # This replica's own requests only: which blocks peers' requests hold there is not
        # shared (their states are sums), and adding their committed prompt tokens counted a
        # group's prefix once per replica, predicted a wait for room (admission_wait_s: 100 s)
        # on the group's own backend and moved groups off it in overload (bench/README.md,
        # "State, not requests"). Peers' admitted requests are in the engine's usage.
        used = max(used, committed.in_flight_blocks(backend_id))
        in_use = committed.in_flight_prefix_blocks(backend_id, request.block_hashes)
        if self._peers and self._peers.has_work(backend_id):
            # Likewise the prefix cached there is taken to be held by a peer's request, not
            # needed again.
            in_use = max(in_use, gpu_tokens // block_size)
        return need - in_use > total - used

    def _hit_tokens(self, prompt: int, gpu: int, cpu: int, storage: int) -> float:
        """GPU hits plus each lower tier's tokens at what loading them saves (``tier_pricing``)."""
        p = self.params
        if p.tier_pricing == "gpu_only":
            return float(gpu)
        if p.tier_pricing == "fixed_ratio":
            return gpu + p.cpu_hit_ratio * cpu + p.storage_hit_ratio * storage
        hit = float(gpu)
        for tokens, bytes_per_s in ((cpu, p.cpu_load_bytes_per_s),
                                    (storage, p.shared_load_bytes_per_s)):
            if not tokens:
                continue
            recompute_s = (self._cost.seconds(prompt - hit, hit)
                           - self._cost.seconds(prompt - hit - tokens, hit + tokens))
            load_s = tokens * p.kv_bytes_per_token / bytes_per_s
            if recompute_s > load_s:
                hit += tokens * (1.0 - load_s / recompute_s)
        return hit

    def _fleet(
        self,
        request: RouteRequest,
        view: ClusterView,
        candidates: tuple[BackendState, ...],
        matches: Mapping[BackendId, BackendMatch],
    ) -> _FleetContext:
        busy = len([b for b in candidates if b.in_flight_requests]) / len(candidates)
        home, home_blocks = self._homes.home(request.block_hashes)
        deepest = max([m.matched_blocks for m in matches.values()], default=0)
        full: dict[BackendId, float] = {}
        if deepest and self.params.duplicate_ratio:
            knee = self.params.cache_full_knee_ratio
            for b in candidates:
                source = view.index if b.kv_events and view.index is not None else self._approx
                total = b.total_kv_blocks or self.params.approx_capacity_blocks
                fill = source.backend_entries(b.backend_id) / total
                if fill > knee:
                    full[b.backend_id] = fill
        busy_weight = busy ** self.params.busy_power
        bs = request.block_size
        prompt = max(request.prompt_tokens, len(request.block_hashes) * bs)
        return _FleetContext(busy_weight, 1.0 + self.params.fleet_work_ratio * busy_weight,
                             home, home_blocks, deepest, full,
                             self._partition(request, candidates, home, deepest),
                             prompt, max(prompt - 1, 0) // bs * bs,
                             self._cost.seconds(prompt - 0.0, 0.0),
                             min(request.max_tokens, self.params.decode_horizon_tokens),
                             all(b.engine_waiting_requests for b in candidates))

    def _partition(self, request: RouteRequest, candidates: tuple[BackendState, ...],
                   home: BackendId | None, deepest: int) -> dict[BackendId, float]:
        """For a prefix nobody holds or remembers, once the remembered working set overflows
        the caches: each candidate's homed blocks beyond the least-homed one's, in mean shares
        (sglang-router sends such a prefix to its smallest tree)."""
        p = self.params
        if not p.partition_ratio or home is not None or deepest or not request.block_hashes:
            return {}
        homed = {b.backend_id: self._homes.homed_blocks(b.backend_id) for b in candidates}
        total = sum(homed.values())
        capacity = sum(b.total_kv_blocks or p.approx_capacity_blocks for b in candidates)
        knee = p.cache_full_knee_ratio
        if total <= knee * capacity:
            # The fleet's caches hold the working set, but one backend's share may not: a new
            # prefix homed there evicts one of its prefixes, a whole prefill lost.
            return {b.backend_id: 1.0 for b in candidates
                    if homed[b.backend_id] > knee * (b.total_kv_blocks or p.approx_capacity_blocks)}
        low, mean = min(homed.values()), total / len(candidates)
        return {b: (n - low) / mean for b, n in homed.items()}

    def _placement_s(
        self,
        request: RouteRequest,
        backend: BackendState,
        fleet: _FleetContext,
        prompt: int,
        cap: int,
        held: int,
        hit: float,
        prefill_s: float,
    ) -> float:
        """Seconds for where the prefix should live: minus a credit at its home, plus the
        price of a copy in a full cache elsewhere (both are future hits won or lost)."""
        p = self.params
        bs = request.block_size
        if backend.backend_id == fleet.home:
            remembered = max(min(fleet.home_blocks * bs, cap) - held, 0)
            if remembered and p.home_credit_ratio:
                saved = prefill_s - self._cost.seconds(prompt - hit - remembered, hit + remembered)
                return -p.home_credit_ratio * saved * fleet.prefill_price
            return 0.0
        if fleet.partition:
            # A new prefix evicts others wherever it goes; where the most working set is
            # already homed, it evicts what is most likely to be asked for again.
            return (p.partition_ratio * fleet.partition.get(backend.backend_id, 0.0)
                    * prefill_s * fleet.prefill_price)
        fill = fleet.full_caches.get(backend.backend_id)
        copied = max(min(fleet.deepest_blocks * bs, cap) - held, 0)
        if fill is None or not copied:
            return 0.0
        full = min((fill - p.cache_full_knee_ratio) / (1.0 - p.cache_full_knee_ratio), 1.0)
        lost = prefill_s - self._cost.seconds(prompt - hit - copied, hit + copied)
        return p.duplicate_ratio * full * lost * fleet.prefill_price

    def _pick(self, scores: list[BackendScore], some_idle: bool) -> BackendScore:
        p = self.params
        values = [s.score for s in scores]
        best = min(values)
        temperature = max(p.temperature_s, p.temperature_ratio * best)
        if p.ties_save_work:
            # Among near-ties (within one T of the best), the fewest tokens to compute: equal
            # predicted TTFTs, so the one that leaves the fleet the most prefill capacity.
            near = [s for s, v in zip(scores, values, strict=True) if v - best <= temperature]
            work = [_uncached(s) for s in near] if len(near) > 1 else []  # one: nothing to narrow
            least = min(work, default=0.0)
            if least < max(work, default=0.0):
                scores = [s for s, w in zip(near, work, strict=True) if w == least]
                values = [s.score for s in scores]
                best = min(values)
        if p.copy_cutoff_t and some_idle:
            # A backend that computes more than the best one does (a copy of a prefix the
            # best holds) is drawn only as a near-tie: equivalent alternatives a few T worse
            # add up (three idle backends at 2.7 T took 17% of the draws from a holder).
            # Only while some candidate is idle, where its prediction is just its own
            # prefill; with every backend busy, queue forecasts err by more than 2 T and
            # the wider draw keeps tails shorter (docs/simulation.md).
            top = scores[values.index(best)]
            limit, least_work = best + p.copy_cutoff_t * temperature, _uncached(top)
            kept = [(s, v) for s, v in zip(scores, values, strict=True)
                    if v <= limit or _uncached(s) <= least_work]
            if len(kept) < len(scores):
                scores, values = [s for s, _ in kept], [v for _, v in kept]
        weights = [math.exp(-(v - best) / temperature) for v in values]
        draw = self._rng.random() * sum(weights)
        for score, weight in zip(scores, weights, strict=True):
            draw -= weight
            if draw < 0:
                return score
        return scores[-1]

    # ---- the Policy interface -------------------------------------------------------------------

    def choose(self, request: RouteRequest, view: ClusterView) -> Decision:
        backends = view.backends
        decode = [b for b in backends if b.role is Role.DECODE]
        # Without DECODE backends (the common case) every backend is a prefill candidate.
        prefill_side = (tuple(b for b in backends if b.role is not Role.DECODE) if decode
                        else backends)
        candidates = prefill_side or backends
        matches = self._matches(request, view, candidates)
        fleet = self._fleet(request, view, candidates, matches)
        scores = [
            self._score(request, b, matches.get(b.backend_id), view.now_s, fleet)
            for b in candidates
        ]
        chosen = self._pick(scores, any(not b.in_flight_requests for b in candidates))
        predicted = chosen.matched_tokens
        if decode and prefill_side and next(
                b.role for b in candidates if b.backend_id == chosen.backend_id) is Role.PREFILL:
            fewest = min(b.in_flight_requests for b in decode)
            target = self._rng.choice([b for b in decode if b.in_flight_requests == fewest])
            return Decision(
                backend_id=target.backend_id,
                reason="kv_aware: lowest predicted TTFT prefill, least-loaded decode",
                predicted_hit_tokens=predicted,
                prefill_backend_id=chosen.backend_id,
                scores=tuple(scores),
            )
        return Decision(
            backend_id=chosen.backend_id,
            reason="kv_aware: lowest predicted TTFT",
            predicted_hit_tokens=predicted,
            scores=tuple(scores),
        )

    def defer(self, request: RouteRequest, view: ClusterView) -> bool:
        """Hold while every candidate has ``hold_queue_s`` of predicted prefill in flight, or
        while none has KV room for this prompt (``policies.kv_commitment``): placed later,
        when a finish frees room, it sees fresher cache state, no engine queue holds it on a
        stale picture, and no engine admits what it would preempt. Notes each candidate's
        preemption counter first (``policies.preemption_backoff``): the only state it
        changes, and a second call on the same view changes nothing."""
        candidates = [b for b in view.backends if b.role is not Role.DECODE]
        if not candidates:
            return False
        backoff, now_s = self._backoff, view.now_s
        for b in candidates:
            if b.engine_preemptions_total is not None:  # (None: nothing to note)
                backoff.observe(b, now_s)  # idempotent: the same view twice is one observation
        queue_s = self.params.hold_queue_s
        if queue_s and all(self._queued_s(b, now_s) >= queue_s for b in candidates):
            return True
        if not self.params.hold_kv_ratio:
            return False
        committed = self._committed
        if any(committed.has_room_at_any_ratio(b) for b in candidates):
            return False  # the backoff's ratio need not be asked
        ratio = min(backoff.ratio(b.backend_id, now_s) for b in candidates)
        return not any(committed.has_room(b, request.prompt_tokens, request.block_size, ratio)
                       for b in candidates)

    def _queued_s(self, backend: BackendState, now_s: float) -> float:
        """Prefill seconds this policy predicts are still queued on ``backend``, scaled down to
        what is still in flight there: a backend faster than predicted has returned its
        requests, and one with nothing in flight has no queue. That also keeps the hold live:
        it holds only while every candidate has a request whose finish will ask again."""
        if not backend.in_flight_requests:
            return 0.0
        pending = self._pending.get(backend.backend_id)
        peer = self._peers.pending(backend.backend_id, now_s) if self._peers else None
        if pending is None and peer is None:
            return 0.0
        queued_s = prompt = 0.0
        if pending is not None:
            pending.expire(now_s)  # bookkeeping only, as in _score
            queued_s, prompt = pending.remaining_s(now_s), float(pending.prompt_tokens)
        if peer is not None:
            queued_s, prompt = queued_s + peer[0], prompt + peer[2]
        queued_s *= self._speed.factor(backend.backend_id, now_s)
        if prompt > backend.in_flight_prompt_tokens:
            queued_s *= backend.in_flight_prompt_tokens / prompt
        return queued_s

    def speed_factors(self, now_s: float) -> dict[BackendId, float]:
        """Each backend's learned speed factor (``policies.base.backend_speed_factors``)."""
        return self._speed.heard(now_s)

    def on_first_token(self, request: RouteRequest, decision: Decision, now_s: float) -> None:
        forecast = self._retire(request)
        if forecast is not None:
            self._speed.observe(forecast[0], forecast[3], now_s - forecast[2], now_s)

    def on_finished(
        self, request: RouteRequest, decision: Decision, now_s: float, ok: bool
    ) -> None:
        self._committed.remove(decision.prefill_backend_id or decision.backend_id,
                               request.request_id, request.block_hashes)
        self._retire(request)

    def _retire(self, request: RouteRequest) -> tuple[BackendId, int, float, float] | None:
        forecast = self._forecasts.pop(request.request_id, None)
        if forecast is not None and (pending := self._pending.get(forecast[0])) is not None:
            pending.retire(forecast[1])
        return forecast

    def on_dispatched(self, request: RouteRequest, decision: Decision, now_s: float) -> None:
        prefill_id = decision.prefill_backend_id or decision.backend_id
        predicted = _prediction(decision, prefill_id)
        if predicted is None:
            return
        self._committed.add(prefill_id, request.request_id, request.block_hashes,
                            request.block_size, predicted.prompt_tokens,
                            predicted.uncached_tokens, request.max_tokens)
        pending = self._pending.get(prefill_id)
        if pending is None:
            pending = self._pending[prefill_id] = PendingPrefill(
                self.params.prefill_memory_requests
            )
        # Queued work is kept at the cost model's speed; scoring applies the backend's speed.
        # A first token teaches speed only with nothing predicted ahead of it (no queue, KV
        # below the knee): then its TTFT is its own prefill and steps, not a queue or an
        # admission wait the model may have priced wrong.
        speed = predicted.speed
        model_ttft_s = predicted.ttft_s / speed
        if predicted.wait_s or model_ttft_s < self.params.speed_min_ttft_s:
            model_ttft_s = 0.0  # (observe ignores it)
        self._forecasts[request.request_id] = prefill_id, pending.add(
            now_s + predicted.ttft_s,
            predicted.prefill_s / speed,
            predicted.uncached_tokens,
            predicted.prompt_tokens,
            awaits_first_token=request.stream,
        ), now_s, model_ttft_s
        self._record(request, prefill_id, predicted, now_s)

    def _record(self, request: RouteRequest, prefill_id: BackendId, predicted: Prediction,
                now_s: float) -> None:
        """What a dispatch records beyond its own lifetime: where its chain went (recent
        dispatches, placement, the approximate index). A peer's shared dispatch records only
        this (``on_peer_dispatched``)."""
        hashes = request.block_hashes
        if not hashes:
            return
        if predicted.kv_events and self.params.recent_ttl_s:
            # Not skipped below: its records live recent_ttl_s (0.5 s), less than a refresh.
            self._recent.record_dispatch(prefill_id, hashes, now_s, self.params.recent_ttl_s)
        if self._recorded_lately(prefill_id, hashes[-1], now_s, predicted.kv_events):
            return
        self._homes.record(prefill_id, hashes)
        if not predicted.kv_events:
            self._approx.record_dispatch(prefill_id, hashes, now_s, self.params.approx_ttl_s,
                                         capacity_blocks=predicted.capacity_blocks)
        self._refresh.note(prefill_id, hashes[-1], now_s)

    def _recorded_lately(self, backend_id: BackendId, deepest: BlockHash, now_s: float,
                         kv_events: bool) -> bool:
        """Whether this chain was recorded on ``backend_id`` less than ``record_refresh_s``
        ago and is still recorded there, so recording it again would only refresh it (a hot
        prompt, a benchmark's one prompt, a sibling replica's replay of either).

        What skipping leaves different is bounded by ``record_refresh_s``:
        - expiry: the chain's approximate records expire ``approx_ttl_s`` after its last full
          record, at most ``record_refresh_s`` before they would have. Expiry still never
          increases along a chain (``PrefixIndex.match`` binary-searches it): a skip leaves
          the whole chain as its last record set it, and every record sets a whole chain;
        - order: the chain's place in the index's and the placement memory's LRU (what their
          capacity drops first) is at most ``record_refresh_s`` old;
        - homes: blocks sent to several backends within ``record_refresh_s`` (a chain, or a
          prefix chains share) are homed on the one that recorded them last in full, not
          the latest dispatch's; every one of them was sent them within that time (and a
          home is credited only where its prefix is no longer cached).
        Presence in the approximate index stays exact: the chain's deepest block, its first
        to expire or be dropped, must still be recorded and unexpired there. The KV commitment,
        the pending prefill forecasts and the recent-dispatch records are per request and
        always recorded."""
        if not self._refresh.fresh(backend_id, deepest, now_s):
            return False
        if kv_events:
            return True
        expiry_s = self._approx.recorded_until(backend_id, deepest)
        return expiry_s is not None and expiry_s > now_s

    # ---- replica sync (policies.replica_sync, policies.kv.peers) ---------------------------------

    def shares_dispatch(self, request: RouteRequest, decision: Decision, now_s: float) -> bool:
        """Peers replay a dispatch for its chain records only (``_record``); its queue and KV
        commitment reach them in ``shared_state``. So a dispatch is shared when ``_record``
        would record something they lack: a chain not recorded lately; with KV events, a
        chain with blocks the engine has yet to store, or whose recent-dispatch record peers
        last heard of more than half of ``recent_ttl_s`` ago. That record bridges the events'
        lag, and every dispatch refreshes it here: a group's later requests, predicted as
        hits on it, kept it alive here while the peers' copy lapsed, and in overload (first
        requests queued for longer than its 0.5 s) the peers moved those groups away
        (bench/README.md, "State, not requests"). Called once per dispatch, just before
        ``on_dispatched``: a True answer is noted as shared."""
        hashes = request.block_hashes
        if not hashes:
            return False
        prefill_id = decision.prefill_backend_id or decision.backend_id
        predicted = _prediction(decision, prefill_id)
        if predicted is None:
            return False
        if predicted.kv_events and self.params.recent_ttl_s:
            tail = max(predicted.prompt_tokens - len(hashes) * request.block_size, 0)
            shared = self._shared_recent
            if predicted.uncached_tokens > tail or not shared.fresh(prefill_id, hashes[-1],
                                                                    now_s):
                shared.note(prefill_id, hashes[-1], now_s)
                return True
        return not self._recorded_lately(prefill_id, hashes[-1], now_s, predicted.kv_events)

    def on_peer_dispatched(self, request: RouteRequest, decision: Decision, now_s: float) -> None:
        prefill_id = decision.prefill_backend_id or decision.backend_id
        predicted = _prediction(decision, prefill_id)
        if predicted is not None:
            self._record(request, prefill_id, predicted, now_s)

    def shared_state(self, now_s: float) -> SharedState:
        """This replica's own work per backend with any in flight (``policies.kv.peers``)."""
        out: dict[BackendId, tuple[float, ...]] = {}
        for backend_id, queue in self._pending.items():
            queue.expire(now_s)
            own = self._committed.own_committed(backend_id)
            if not queue.prompt_tokens and not own:
                continue
            out[backend_id] = (queue.remaining_s(now_s), 1.0 if queue.overdue else 0.0,
                               queue.new_tokens, float(queue.prompt_tokens),
                               queue.mean_prefill_s, queue.mean_new_tokens, own)
        return out

    def on_peer_state(self, origin: str, state: SharedState | None, now_s: float) -> None:
        self._committed.set_peers(self._peers.update(origin, state, now_s))

    def on_backend_removed(self, backend_id: BackendId) -> None:
        self._peers.remove_backend(backend_id)
        self._approx.remove_backend(backend_id)
        self._homes.remove_backend(backend_id)
        self._recent.remove_backend(backend_id)
        self._refresh.clear()  # a backend back under the same id starts with nothing recorded
        self._shared_recent.clear()
        self._pending.pop(backend_id, None)
        self._forecasts = {r: f for r, f in self._forecasts.items() if f[0] != backend_id}
        self._committed.remove_backend(backend_id)
        self._backoff.remove_backend(backend_id)
        self._speed.remove_backend(backend_id)


def _uncached(score: BackendScore) -> float:
    return score.prediction.uncached_tokens if score.prediction is not None else math.inf


def _prediction(decision: Decision, backend_id: BackendId) -> Prediction | None:
    """This policy's forecast for ``backend_id`` in ``decision`` (None: not this policy's)."""
    for score in decision.scores:
        if score.backend_id == backend_id and score.prediction is not None:
            return score.prediction
    return None


def create(params: Mapping[str, object], rng: random.Random) -> KvAware:
    return KvAware(parse_params(KvAwareParams, params, "policy.params"), rng)
