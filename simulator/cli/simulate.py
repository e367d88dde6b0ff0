"""``kvrouter simulate``: compare routing policies on a trace in the cluster simulator.

Example::

    kvrouter simulate --trace synthetic:multi_tenant --backends 16 \\
        --policies round_robin,session_affinity,kv_aware --out /tmp/sim

``--backends 8,12,16`` sweeps cluster sizes: the report then says, per policy, the fewest
backends that hold the TTFT SLO at p99. ``--config FILE`` reads YAML with optional sections
``simulation:`` (any ``SimConfig`` field), ``policy:`` (``name`` + ``params``, the router's own
shape: the params apply when that policy is simulated) and ``policies:`` (params per policy
name). Flags override the file. Top-level imports stay light (argparse only).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

__all__ = ["HELP", "add_arguments", "load_sim_config", "run"]

HELP = "Simulate routing policies on a trace in virtual time and write a comparison report."

_FLAG_FIELDS = ("cost_profile", "event_delay_s", "event_loss_ratio", "slo_ttft_s", "seed")
_TIER_FLAG_FIELDS = ("cpu_offload_tokens", "shared_store_tokens")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--trace",
        required=True,
        help="trace file (Mooncake JSONL, kvrouter JSONL, Azure CSV; .gz ok) or synthetic:NAME[,key=value...]",
    )
    parser.add_argument(
        "--backends", default="16", help="engine count, or a comma list to sweep (default %(default)s)"
    )
    parser.add_argument(
        "--policies",
        default="round_robin,session_affinity,kv_aware",
        help="comma-separated policy names (default %(default)s)",
    )
    parser.add_argument(
        "--out", required=True, type=Path, help="output directory (results.json, report.html, one .svg per chart)"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed for policies, losses and synthetic traces (default 0)",
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="YAML with simulation:, policy: and policies: sections (default: none)",
    )
    parser.add_argument(
        "--cost-profile", default=None, help="engine cost profile (default h200-llama-3.1-8b)"
    )
    parser.add_argument(
        "--event-delay-s", type=float, default=None, help="KV event delivery delay to the index, s (default 0)"
    )
    parser.add_argument(
        "--event-loss-ratio", type=float, default=None, help="share of KV event batches lost, 0..1 (default 0)"
    )
    parser.add_argument(
        "--slo-ttft-s",
        type=float,
        default=None,
        help="TTFT SLO for goodput and capacity (s, default 2)",
    )
    parser.add_argument(
        "--max-requests", type=int, default=None, help="stop the trace after this many requests (default: the whole trace)"
    )
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer directory for text traces (default: the tiny one)",
    )
    parser.add_argument(
        "--prefill-backends",
        default=None,
        help="prefill/decode disaggregation: K prefill + (backends - K) decode engines, or a "
        "comma list (0 = all mixed, through the same code); decider parameters come from the "
        "config file's disaggregation: section (see docs/disaggregation.md)",
    )
    parser.add_argument(
        "--routers",
        default=None,
        help="router replicas behind a Service, or a comma list to sweep (default 1: one "
        "router; see docs/scale-out.md)",
    )
    parser.add_argument(
        "--sync", default="on", help="replica sync between routers: on, off, or on,off (default %(default)s)"
    )
    parser.add_argument(
        "--sync-delay-s", type=float, default=0.001, help="replica sync delivery delay, s (default %(default)s)"
    )
    parser.add_argument(
        "--sync-loss-ratio", type=float, default=0.0, help="share of sync messages lost per peer, 0..1 (default 0)"
    )
    parser.add_argument(
        "--cpu-offload-tokens",
        type=int,
        default=None,
        help="per engine: vLLM native CPU offloading of this many tokens (default 0 = off; "
        "2000000 is ~250 GB of host RAM for Llama-3.1-8B)",
    )
    parser.add_argument(
        "--shared-store-tokens",
        type=int,
        default=None,
        help="fleet-wide: one LMCache/Mooncake-style KV store of this many tokens every engine "
        "writes to and loads from (default 0 = off)",
    )
    parser.add_argument(
        "--slow-backend",
        action="append",
        default=[],
        metavar="INDEX=FACTOR",
        help="make engine INDEX FACTOR times slower at compute than the others (repeatable), "
        "e.g. --slow-backend 0=4, as kvrouter emulate --slow-pod",
    )
    parser.add_argument("--jobs", type=int, default=2, help="parallel worker processes (default %(default)s)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def load_sim_config(path: Path | None) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(simulation section, params per policy name) from a YAML file; errors name the key."""
    if path is None:
        return {}, {}
    import yaml

    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: cannot read config ({exc})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    simulation = raw.get("simulation") or {}
    if not isinstance(simulation, dict):
        raise ValueError("simulation: expected a mapping")
    params: dict[str, dict[str, Any]] = {}
    policies = raw.get("policies") or {}
    if not isinstance(policies, dict):
        raise ValueError("policies: expected a mapping of policy name -> params")
    for name, value in policies.items():
        if not isinstance(value, dict):
            raise ValueError(f"policies.{name}: expected a mapping of params")
        params[str(name)] = value
    policy = raw.get("policy")
    if policy is not None:
        if not isinstance(policy, dict) or not isinstance(policy.get("name"), str):
            raise ValueError("policy.name: expected a policy name")
        value = policy.get("params") or {}
        if not isinstance(value, dict):
            raise ValueError("policy.params: expected a mapping")
        params[policy["name"]] = value
    return simulation, params


def build_config(args: argparse.Namespace, simulation: dict[str, Any], backends: int) -> Any:
    from dataclasses import fields

    from simulator.cluster import SimConfig

    known = {f.name for f in fields(SimConfig)}
    for key in simulation:
        if key not in known:
            raise ValueError(f"simulation.{key}: unknown key (known: {', '.join(sorted(known))})")
    values = dict(simulation)
    for name in _FLAG_FIELDS + _TIER_FLAG_FIELDS:
        flag = getattr(args, name, None)
        if flag is not None:
            values[name] = flag
    values["backends"] = backends
    if getattr(args, "slow_backend", None):
        from simulator.inputs import parse_slowdowns

        values["slow_backends"] = tuple(
            parse_slowdowns(args.slow_backend, backends, "--slow-backend").items())
    try:
        return SimConfig(**values)
    except (TypeError, ValueError) as exc:
        raise ValueError(str(exc)) from None


def parse_backends(text: str) -> list[int]:
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--backends: expected integers, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise ValueError("--backends: each count must be >= 1")
    return sizes


def replica_configs(args: argparse.Namespace) -> list[Any]:
    """One ``ReplicaConfig`` per (routers, sync) pair of the flags; ``[None]`` = one router."""
    if getattr(args, "routers", None) is None:
        return [None]
    from simulator.replicas import ReplicaConfig

    try:
        counts = [int(x) for x in args.routers.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--routers: expected integers, got {args.routers!r}") from None
    modes = [m.strip() for m in args.sync.split(",") if m.strip()]
    if not counts or not modes or any(m not in ("on", "off") for m in modes):
        raise ValueError("--routers needs counts and --sync one of on, off, on,off")
    out: list[Any] = []
    for count in counts:
        if count == 1:  # one router: nothing to sync, the plain path (same numbers as without)
            out.append(None)
            continue
        for mode in modes:
            out.append(ReplicaConfig(routers=count, sync=mode == "on",
                                     sync_delay_s=args.sync_delay_s,
                                     sync_loss_ratio=args.sync_loss_ratio))
    return out


def run(args: argparse.Namespace) -> int:
    import random
    import sys
    import time

    from policies.params import ParamError
    from policies.registry import build_policy
    from simulator.report import capacity_lines, format_table, short_name, write_report
    from simulator.sweep import RunSpec, open_trace, run_all
    from simulator.traces import TraceError

    try:
        simulation, params = load_sim_config(args.config)
        sizes = parse_backends(args.backends)
        policies = [p.strip() for p in args.policies.split(",") if p.strip()]
        for name in policies:
            build_policy(name, params.get(name, {}), random.Random(0))
        configs = [build_config(args, simulation, n) for n in sizes]
        scale_out = replica_configs(args)
        # Count the trace once (cheap: a streaming pass) for the progress bar, and fail fast on
        # a bad file before any worker starts.
        total = sessions = 0
        for request in open_trace(args.trace, configs[0].seed, args.max_requests, args.tokenizer):
            total += 1
            sessions += request.session_id is not None
    except (ValueError, ParamError, TraceError, OSError) as exc:
        print(f"kvrouter simulate: {exc}", file=sys.stderr)
        return 2
    specs = [
        RunSpec(args.trace, config, name, params.get(name, {}), args.max_requests, args.tokenizer,
                label=replicas.label if replicas else "", replicas=replicas)
        for config in configs
        for name in policies
        for replicas in scale_out
    ]
    if args.prefill_backends is not None:
        from simulator.sweep import disagg_specs

        try:
            specs = disagg_specs(specs, args.prefill_backends, args.config)
        except ValueError as exc:
            print(f"kvrouter simulate: {exc}", file=sys.stderr)
            return 2
    started = time.monotonic()
    try:
        results = run_all(specs, jobs=args.jobs, total_requests=total, show_progress=not args.quiet)
    except (ValueError, TraceError) as exc:
        print(f"\nkvrouter simulate: {exc}", file=sys.stderr)
        return 2
    wall_s = time.monotonic() - started
    # Wall time is the one number that is not a function of the inputs: it goes to the report's
    # header, so results.json stays byte-identical for the same trace, config and seed.
    walls = {f"{r['policy']}@{r['backends']}" + (f" {r['label']}" if r.get("label") else ""):
             round(r.pop("wall_s", 0.0), 2) for r in results}
    print(format_table(results))
    print(
        f"simulated in {wall_s:.1f} s wall time ({sum(walls.values()):.1f} s of run time summed "
        f"over {len(walls)} runs on {args.jobs} worker{'s' if args.jobs != 1 else ''})",
        file=sys.stderr,
    )
    if len(sizes) > 1:
        print("\n".join(capacity_lines(results)))
    from simulator.inputs import config_dict

    meta = {
        "trace": args.trace,
        "requests": total,
        "policies": policies,
        "backends": sizes,
        "config": config_dict(configs[0]),
        "wall_s": walls,
    }
    meta["wall_time_s"] = round(wall_s, 2)
    notes = []
    if "session_affinity" in policies and sessions == 0:
        notes.append(
            "This trace carries no session ids, so session_affinity has nothing to stick to: "
            "every request takes its fallback (least loaded), and it behaves like least_loaded."
        )
    path = write_report(
        args.out, results, f"kvrouter simulate: {short_name(args.trace)}", meta, notes
    )
    print(f"results: {args.out / 'results.json'}\nreport:  {path}")
    return 0
