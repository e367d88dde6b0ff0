"""The workloads and regimes of ``bench/quality.py``, and its table: pure, no I/O, no clock.

Base workload (issue 12): 48 groups of ~1,400-token shared prefixes x 5 requests per group,
shuffled with the seed, chat requests (the shared prefix is the system message, a short unique
question the user message), streamed, ``max_tokens`` 32. Prompt text is drawn from words the
tiny tokenizer has single tokens for, so a word is about one token.

A workload is a list of ``Item``: one request each, or (agentic) one session of requests sent
one after another. An item with ``at_s`` is released open-loop at that time after the start;
the others are taken by ``concurrency`` closed-loop workers.
"""

from __future__ import annotations

import json
import random
import statistics
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "REGIMES",
    "Item",
    "Regime",
    "build_workload",
    "markdown_table",
    "miss_kinds",
    "misses_table",
    "percentile",
    "pool_cells",
    "verdict_table",
]

MODEL = "tiny-llama"

# Words that are single tokens of the shipped tiny tokenizer (it was trained on them).
_WORDS = (
    "the of and to in is you that it he was for on are as with his they at be this have from "
    "or one had by word but not what all were we when your can said there use an each which she "
    "do how their if will up other about out many then them these so some her would make like "
    "him into time has look two more write go see number no way could people my than first water "
    "been call who oil its now find long down day did get come made may part system prompt user "
    "assistant model token cache block router request backend engine prefix decode prefill query "
    "answer document question tenant session agent tool context memory latency throughput"
).split()


@dataclass(frozen=True, slots=True)
class Regime:
    """One named preset. Closed loop at ``concurrency`` unless ``rate_per_s`` is set (then every
    request arrives open-loop, Poisson at that rate)."""

    name: str
    title: str
    concurrency: int = 8
    rate_per_s: float = 0.0
    num_gpu_blocks: int = 4096
    slow_pod: tuple[int, float] | None = None  # (pod index, slowdown factor)
    burst_requests: int = 0  # a hot tenant: this many requests of one new prefix at once
    burst_at_ratio: float = 0.4  # ... released when this share of the base workload was sent
    agentic: bool = False
    groups: int = 48
    per_group: int = 5
    prefix_tokens: int = 1400
    max_tokens: int = 32
    expected_cell_s: float = 13.0  # measured per cell (start-up, run, stop); for the estimate


# Capacity of 4 emulated pods on this machine (2 shared cores), base workload, measured
# 2026-12-03 (bench/README.md, "Routing quality vs peers"): closed loops of 16..128 with
# round_robin peak at ~90 req/s (hit ~0.37): the modelled GPUs' limit, since with the engines
# 10x faster the same chain carries ~170-190 req/s (the CPU's limit). With cache-aware routing
# (hit ~0.75) the modelled GPUs would carry ~190 req/s, past the CPU's limit, so open-loop
# sweeps decide: at 90 req/s every cache-aware router keeps p99 < 0.25 s; at 120 kvrouter
# kv_aware's hit rate fell to 0.39 (p99 2.3 s) while sglang-router held 0.68; at 150 sglang-
# router still held 0.76 (p99 0.56 s). Near saturation is 110 req/s (above round_robin's
# ceiling, where load starts to bend placement); overload 160 req/s (1.8x round_robin's ceiling
# and at this machine's CPU ceiling). Both use 144 groups (720 requests) so queues can build.
REGIMES: dict[str, Regime] = {
    r.name: r
    for r in (
        Regime("light", "light (default KV, concurrency 8)", concurrency=8),
        Regime("pressure", "cache pressure (700 blocks, concurrency 12)", concurrency=12,
               num_gpu_blocks=700, expected_cell_s=11.0),
        Regime("saturation", "near saturation (open loop 110 req/s, 144 groups)",
               rate_per_s=110.0, groups=144, expected_cell_s=16.0),
        Regime("overload", "overload (open loop 160 req/s, 144 groups)", rate_per_s=160.0,
               groups=144, expected_cell_s=16.0),
        Regime("slow_pod", "one pod 4x slower (concurrency 12)", concurrency=12,
               slow_pod=(0, 4.0)),
        Regime("hot_burst", "hot tenant burst (conc. 8 + 64 at once)", concurrency=8,
               burst_requests=64, expected_cell_s=16.0),
        Regime("agentic", "agentic tool-call chats (8 sessions at once)", concurrency=8,
               agentic=True, groups=32, per_group=5, expected_cell_s=10.0),
    )
}


@dataclass(slots=True)
class Item:
    """Requests sent one after another (one unless agentic); ``group`` names the shared prefix."""

    group: str
    bodies: list[dict[str, Any]]
    at_s: float | None = None
    tags: dict[str, str] = field(default_factory=dict)


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(n))


def _prefix(rng: random.Random, group: int, tokens: int) -> str:
    # The group number first, so no two prefixes share even their first block.
    return f"Group {group} instructions: {_words(rng, tokens - 4)}"


def _chat(system: str, user: str, max_tokens: int) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    }


def _base_items(regime: Regime, rng: random.Random, quick: bool) -> list[Item]:
    groups = max(4, regime.groups // 4) if quick else regime.groups
    prefixes = [_prefix(rng, g, regime.prefix_tokens) for g in range(groups)]
    items = [
        Item(f"g{g}", [_chat(prefixes[g], f"Question {g}.{k}: {_words(rng, 40)}",
                             regime.max_tokens)])
        for g in range(groups)
        for k in range(regime.per_group)
    ]
    rng.shuffle(items)
    return items


def _tools(rng: random.Random, agent: int) -> list[dict[str, Any]]:
    names = ["search_docs", "read_file", "run_query", "write_note"]
    return [
        {
            "type": "function",
            "function": {
                "name": f"{name}_{agent}",
                "description": f"Agent {agent} tool {name}: {_words(rng, 30)}",
                "parameters": {
                    "type": "object",
                    "properties": {"query": {"type": "string", "description": _words(rng, 8)},
                                   "limit": {"type": "integer"}},
                    "required": ["query"],
                },
            },
        }
        for name in names
    ]


def _agentic_items(regime: Regime, rng: random.Random, quick: bool) -> list[Item]:
    """Sessions of ``per_group`` turns over 4 agent kinds (system prompt + tools shared by the
    kind). Each turn appends the assistant's tool call and the tool's ~200-token result, so the
    context grows and every turn extends the previous turn's prompt."""
    kinds = 4
    sessions = max(4, regime.groups // 4) if quick else regime.groups
    systems = [_prefix(rng, 1000 + a, regime.prefix_tokens - 300) for a in range(kinds)]
    toolsets = [_tools(rng, a) for a in range(kinds)]
    items = []
    for s in range(sessions):
        agent = s % kinds
        messages: list[dict[str, Any]] = [
            {"role": "system", "content": systems[agent]},
            {"role": "user", "content": f"Task {s}: {_words(rng, 60)}"},
        ]
        bodies = []
        for turn in range(regime.per_group):
            call_id = f"call_{s}_{turn}"
            tool = toolsets[agent][turn % len(toolsets[agent])]["function"]["name"]
            # The first turn forces the call (a named tool_choice), later turns leave it to
            # the model, as agent loops do.
            choice: Any = "auto"
            if turn == 0:
                choice = {"type": "function", "function": {"name": tool}}
            body = {
                "model": MODEL,
                "messages": [dict(m) for m in messages],
                "tools": toolsets[agent],
                "tool_choice": choice,
                "max_tokens": regime.max_tokens,
                "temperature": 0,
                "stream": True,
            }
            bodies.append(body)
            messages.append({
                "role": "assistant", "content": None,
                "tool_calls": [{"id": call_id, "type": "function", "function": {
                    "name": tool, "arguments": json.dumps({"query": _words(rng, 6)})}}],
            })
            messages.append({"role": "tool", "tool_call_id": call_id,
                             "content": f"Result {s}.{turn}: {_words(rng, 200)}"})
        items.append(Item(f"agent{agent}", bodies, tags={"session": str(s)}))
    rng.shuffle(items)
    return items


def build_workload(regime: Regime, seed: int, quick: bool = False) -> list[Item]:
    """The regime's requests, deterministic for a seed. ``quick`` keeps a quarter of the groups
    (at least 4) and of the hot burst."""
    rng = random.Random(seed)
    if regime.agentic:
        return _agentic_items(regime, rng, quick)
    items = _base_items(regime, rng, quick)
    if regime.rate_per_s > 0:
        t = 0.0
        for item in items:
            t += rng.expovariate(regime.rate_per_s)
            item.at_s = t
    if regime.burst_requests:
        burst = max(4, regime.burst_requests // 4) if quick else regime.burst_requests
        hot = _prefix(rng, 999, regime.prefix_tokens)
        at = int(len(items) * regime.burst_at_ratio)
        # Released when the closed loop has sent `at` requests (the driver resolves the
        # marker); all at once, on top of the loop's own concurrency.
        for k in range(burst):
            items.append(Item("hot", [_chat(hot, f"Hot {k}: {_words(rng, 40)}",
                                            regime.max_tokens)],
                              tags={"burst_after": str(at)}))
    return items


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of a non-empty list, else None."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown_table(results: list[dict[str, Any]]) -> str:
    """One row per (regime, router) cell, in the order given."""
    lines = [
        "| regime | router | requests | hit rate | TTFT p50 s | TTFT p99 s | errors | "
        "imbalance | preemptions |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if r.get("skipped"):
            lines.append(f"| {r['regime']} | {r['router']} | skipped: {r['skipped']} "
                         "| | | | | | |")
            continue
        lines.append(
            f"| {r['regime']} | {r['router']} | {r['requests']} | {_fmt(r['hit_rate'], '.3f')} "
            f"| {_fmt(r['ttft_p50_s'], '.3f')} | {_fmt(r['ttft_p99_s'], '.3f')} "
            f"| {r['errors']} | {_fmt(r['imbalance'], '.2f')} | {r['preemptions']} |"
        )
    return "\n".join(lines)


def imbalance(per_pod_requests: list[float]) -> float | None:
    """max / mean of the requests each pod served (1.0 = perfectly even)."""
    if not per_pod_requests or sum(per_pod_requests) == 0:
        return None
    return max(per_pod_requests) / statistics.fmean(per_pod_requests)


def _best(cells: list[dict[str, Any]], key: str, lowest: bool) -> dict[str, Any] | None:
    ok = [c for c in cells if c.get(key) is not None]
    if not ok:
        return None
    return (min if lowest else max)(ok, key=lambda c: c[key])


def verdict_table(results: list[dict[str, Any]], subject: str = "kvrouter:kv_aware",
                  control: str | None = None,
                  per_seed: list[dict[str, Any]] | None = None) -> str:
    """Issue 12's bar per regime: the subject's pod hit rate >= the best peer's and its TTFT p99
    <= the best peer's, peers being the routers that are not kvrouter: none of its policies,
    other checkouts (``kvrouter@PATH:``) or replica sets (``kvrouterxR:``).

    ``control`` names the subject's own build run a second time in the same run
    (``quality.py --control``). The bar stays as it is; each gap it finds is then labelled
    against the two identical routers' gap in that regime, which is the run's own noise
    floor: "within" it, the run could not tell the subject from that peer. One pooled pair is
    one draw of that noise, so with ``per_seed`` (the unpooled cells) the label also gives the
    largest gap between the two in any one seed."""
    lines = [
        f"| regime | {subject} hit | best peer hit | {subject} p99 s | best peer p99 s | verdict |",
        "|---|---|---|---|---|---|",
    ]
    regimes = list(dict.fromkeys(r["regime"] for r in results))
    for regime in regimes:
        cells = [r for r in results if r["regime"] == regime and not r.get("skipped")]
        mine = next((c for c in cells if c["router"] == subject), None)
        twin = next((c for c in cells if control is not None and c["router"] == control), None)
        peers = [c for c in cells if not c["router"].startswith("kvrouter")]
        hit = _best(peers, "hit_rate", lowest=False)
        p99 = _best(peers, "ttft_p99_s", lowest=True)
        if mine is None or hit is None or p99 is None:
            lines.append(f"| {regime} | - | - | - | - | not measured |")
            continue
        fails = []
        if (mine["hit_rate"] or 0.0) < hit["hit_rate"]:
            gap = mine["hit_rate"] - hit["hit_rate"]
            # Four places where three would print -0.000 for a loss.
            fails.append(f"hit {gap:+.3f}" if gap <= -0.0005 else f"hit {gap:+.4f}")
            if twin is not None and twin["hit_rate"] is not None:
                seeds = [abs(a["hit_rate"] - b["hit_rate"])
                         for a, b in _seed_pairs(per_seed, regime, subject, control)]
                fails[-1] += _against(-gap, abs((mine["hit_rate"] or 0.0) - twin["hit_rate"]),
                                      max(seeds, default=None), "{:.4f}",
                                      _seed_wins(per_seed, regime, subject, control,
                                                 "hit_rate", "no lower"))
        if mine["errors"] or mine["ttft_p99_s"] is None or mine["ttft_p99_s"] > p99["ttft_p99_s"]:
            ratio = (mine["ttft_p99_s"] or float("inf")) / p99["ttft_p99_s"]
            fails.append(f"p99 {ratio:.2f}x")
            if twin is not None and twin["ttft_p99_s"] and mine["ttft_p99_s"]:
                seeds = [_ratio(a["ttft_p99_s"], b["ttft_p99_s"])
                         for a, b in _seed_pairs(per_seed, regime, subject, control)]
                fails[-1] += _against(ratio, _ratio(mine["ttft_p99_s"], twin["ttft_p99_s"]),
                                      max(seeds, default=None), "{:.3f}x",
                                      _seed_wins(per_seed, regime, subject, control,
                                                 "ttft_p99_s", "no higher"))
        lines.append(
            f"| {regime} | {_fmt(mine['hit_rate'], '.3f')} | {hit['hit_rate']:.3f} "
            f"({hit['router']}) | {_fmt(mine['ttft_p99_s'], '.3f')} | {p99['ttft_p99_s']:.3f} "
            f"({p99['router']}) | {'LOSES: ' + ', '.join(fails) if fails else 'meets the bar'} |"
        )
    return "\n".join(lines)


def _against(gap: float, spread: float, seed_spread: float | None, spec: str,
             wins: str = "") -> str:
    """A gap labelled against the same build's own gap between two runs of it."""
    side = "within" if gap <= spread else "beyond"
    seeds = "" if seed_spread is None else f"; up to {spec.format(seed_spread)} in one seed"
    return f" ({side} the same-build spread {spec.format(spread)}{seeds}{wins})"


def _seed_wins(cells: list[dict[str, Any]] | None, regime: str, subject: str,
               control: str | None, key: str, word: str) -> str:
    """Seed by seed, how often the subject and the control each met the best peer of that
    seed on ``key`` (a hit rate no lower, a p99 no higher): two identical routers that meet
    it in about as many seeds say the pooled gap is a draw, one that meets it in none says
    it is not."""
    if control is None:
        return ""
    lower_is_better = key == "ttft_p99_s"
    met = {subject: 0, control: 0}
    counted = 0
    for by_router in _by_seed(cells, regime).values():
        peers = [c for r, c in by_router.items() if not r.startswith("kvrouter")]
        best = _best(peers, key, lowest=lower_is_better)
        if best is None or subject not in by_router or control not in by_router:
            continue
        counted += 1
        for router in met:
            value = by_router[router][key]
            met[router] += value <= best[key] if lower_is_better else value >= best[key]
    if not counted:
        return ""
    return f"; {word} in {met[subject]} of {counted} seeds, the control in {met[control]}"


def _ratio(a: float, b: float) -> float:
    return max(a, b) / min(a, b)


def _seed_pairs(cells: list[dict[str, Any]] | None, regime: str, subject: str,
                control: str | None) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """The subject's and the control's cells of ``regime``, seed by seed."""
    return [(by_router[subject], by_router[control])
            for by_router in _by_seed(cells, regime).values()
            if subject in by_router and control in by_router]


def _by_seed(cells: list[dict[str, Any]] | None, regime: str) -> dict[Any, dict[str, dict[str, Any]]]:
    """The measured cells of ``regime`` (a hit rate and a p99), by seed, then by router."""
    seeds: dict[Any, dict[str, dict[str, Any]]] = {}
    for c in cells or ():
        if (c["regime"] == regime and not c.get("skipped") and c.get("hit_rate") is not None
                and c.get("ttft_p99_s")):
            seeds.setdefault(c.get("seed"), {})[c["router"]] = c
    return seeds


def pool_cells(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (regime, router) over every seed it ran with: hit rate = all hits / all
    queries, percentiles over all TTFTs, errors and preemptions summed, imbalance over the
    requests each pod position served. A (regime, router) with no measured seed stays skipped."""
    keys = list(dict.fromkeys((c["regime"], c["router"]) for c in cells))
    out = []
    for regime, router in keys:
        runs = [c for c in cells if (c["regime"], c["router"]) == (regime, router)]
        done = [c for c in runs if not c.get("skipped")]
        if not done:
            out.append({"regime": regime, "router": router, "skipped": runs[0]["skipped"]})
            continue
        hits = sum(p["hits"] for c in done for p in c["per_pod"])
        queries = sum(p["queries"] for c in done for p in c["per_pod"])
        ttfts = [t for c in done for t in c["ttft_s"]]
        pods = len(done[0]["per_pod"])
        per_pod = [sum(c["per_pod"][i]["requests"] for c in done) for i in range(pods)]
        out.append({
            "regime": regime,
            "router": router,
            "seeds": [c.get("seed") for c in done],
            "requests": sum(c["requests"] for c in done),
            "hit_rate": hits / queries if queries else None,
            "ttft_p50_s": percentile(ttfts, 50),
            "ttft_p99_s": percentile(ttfts, 99),
            "errors": sum(c["errors"] for c in done),
            "imbalance": imbalance(per_pod),
            "preemptions": sum(c["preemptions"] for c in done),
        })
    return out


# -- where a traced router's misses came from (--trace) ------------------------------------------

HIT_SHARE = 0.5  # a request hit when its pod had at least this share of its prompt cached
MISS_KINDS = ("first", "moved while computing", "moved", "evicted")


def miss_kinds(trace: list[dict[str, Any]]) -> dict[str, int] | None:
    """Why the requests of one traced cell missed, from the pods' cached tokens and the pod
    that answered each (``_pods``; None when some request's pod is unknown). In the order
    sent, a request that missed is:

    - ``first``: the first of its group; no router can hit it;
    - ``moved while computing``: sent to a pod that never had its group while an earlier
      request of the group was still short of its first token elsewhere (waiting there would
      have hit; a router that sends it elsewhere trades the hit for not queueing behind that
      prefill, as kv_aware does away from a slow pod);
    - ``moved``: sent to a pod that never had its group, the group's earlier requests done:
      a copy if their pod still held the prefix, a new home if it had evicted it;
    - ``evicted``: sent to a pod that had its group before, which no longer held it.

    Also counted: ``hits``, and ``stale``, misses the router predicted as hits (its index
    still listed a prefix the pod had evicted). A group is the request's ``group`` (for
    agentic sessions, the agent kind, whose first turns share a system prompt and tools)."""
    pods_of = _pods(trace)
    if pods_of is None:
        return None
    counts = dict.fromkeys(("hits", *MISS_KINDS, "stale"), 0)
    pods: dict[str, set[str]] = {}  # group -> pods sent it so far
    first_tokens: dict[str, list[float]] = {}  # group -> first-token times so far
    for row, pod in sorted(zip(trace, pods_of, strict=True), key=lambda rp: rp[0]["start_s"]):
        group, start = row["group"], row["start_s"]
        prompt = row.get("prompt_tokens") or 0
        cached = row.get("cached_tokens") or 0
        seen = pods.setdefault(group, set())
        if prompt and cached >= HIT_SHARE * prompt:
            counts["hits"] += 1
        elif not seen:
            counts["first"] += 1
        elif pod in seen:
            counts["evicted"] += 1
        elif any(t > start for t in first_tokens.get(group, ())):
            counts["moved while computing"] += 1
        else:
            counts["moved"] += 1
        if prompt and cached < HIT_SHARE * prompt <= (row.get("predicted_hit_tokens") or 0):
            counts["stale"] += 1
        seen.add(pod)
        first_tokens.setdefault(group, []).append(start + row["ttft_s"])
    return counts


def _pods(trace: list[dict[str, Any]]) -> list[str] | None:
    """The pod that answered each row: from the emulator's completion ids (any router), else
    the backends kvrouter reported choosing; one source for the whole cell, so that the two
    names of one pod never count as two pods. None: some row has neither."""
    for key in ("pod", "backend"):
        names = [row.get(key) for row in trace]
        if trace and all(names):
            return [str(name) for name in names]
    return None


def misses_table(cells: list[dict[str, Any]]) -> str:
    """``miss_kinds`` per (regime, router), summed over seeds; cells whose pods are unknown
    (traced before pods were recorded, or not emulated) are left out."""
    totals: dict[tuple[str, str], dict[str, int]] = {}
    for cell in cells:
        kinds = miss_kinds(cell.get("trace") or [])
        if kinds is None:
            continue
        total = totals.setdefault((cell["regime"], cell["router"]), dict.fromkeys(kinds, 0))
        for kind, n in kinds.items():
            total[kind] += n
    if not totals:
        return ""
    lines = ["| regime | router | hits | " + " | ".join(MISS_KINDS)
             + " | predicted hits that missed |",
             "|---|---|" + "---:|" * (len(MISS_KINDS) + 2)]
    for (regime, router), k in totals.items():
        lines.append(f"| {regime} | {router} | {k['hits']} | "
                     + " | ".join(str(k[kind]) for kind in MISS_KINDS) + f" | {k['stale']} |")
    return "\n".join(lines)
