"""``kvrouter tune``: search kv_aware's weights on a trace; print the best ``policy:`` block.

Example::

    kvrouter tune --trace synthetic:multi_tenant --backends 16 --trials 16 --seed 1

The trials table goes to stderr, the YAML block (paste it under the router's config) to
stdout. ``--out DIR`` also writes every trial's results and the report. Top-level imports stay
light (argparse only).
"""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["HELP", "add_arguments", "run"]

HELP = "Search kv_aware's weights on a trace in the simulator and print the best config block."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--trace", required=True, help="trace file or synthetic:NAME[,key=value...]"
    )
    parser.add_argument("--backends", type=int, default=16, help="engine count (default %(default)s)")
    parser.add_argument("--policy", default="kv_aware", help="policy to tune (default %(default)s)")
    parser.add_argument(
        "--trials",
        type=int,
        default=16,
        help="parameter sets tried, defaults included (default %(default)s)",
    )
    parser.add_argument(
        "--objective",
        default="ttft_p99_s",
        help="ttft_p99_s, ttft_p50_s, e2e_p99_s, imbalance, goodput_rps or hit_rate "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seeds the search, the policy and synthetic traces (default %(default)s)"
    )
    parser.add_argument("--config", type=Path, default=None, help="YAML with a simulation: section (default: none)")
    parser.add_argument("--cost-profile", default=None, help="engine cost profile (default h200-llama-3.1-8b)")
    parser.add_argument(
        "--event-delay-s",
        type=float,
        default=None,
        help="KV event delivery delay to the index, s (default 0)",
    )
    parser.add_argument(
        "--event-loss-ratio",
        type=float,
        default=None,
        help="share of KV event batches lost, 0..1 (default 0)",
    )
    parser.add_argument(
        "--slo-ttft-s",
        type=float,
        default=None,
        help="TTFT SLO for goodput, s (default 2)",
    )
    parser.add_argument(
        "--max-requests", type=int, default=None, help="stop the trace after this many requests (default: the whole trace)"
    )
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory for text traces (default: the shipped tiny one)")
    parser.add_argument("--jobs", type=int, default=2, help="parallel worker processes (default %(default)s)")
    parser.add_argument(
        "--out", type=Path, default=None, help="also write results.json and report.html here (default: no report)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    import sys

    from simulator.report import format_table, write_report
    from simulator.simulate_cli import build_config, load_sim_config
    from simulator.sweep import RunSpec, open_trace, run_all
    from simulator.traces import TraceError
    from simulator.tune import OBJECTIVES, best_trial, draw_trials, params_yaml

    try:
        if args.objective not in OBJECTIVES:
            raise ValueError(f"--objective: one of {', '.join(OBJECTIVES)}")
        if args.trials < 1:
            raise ValueError("--trials must be >= 1")
        simulation, _params = load_sim_config(args.config)
        config = build_config(args, simulation, args.backends)
        trials = draw_trials(args.trials, args.seed, args.policy)
        total = sum(
            1 for _ in open_trace(args.trace, config.seed, args.max_requests, args.tokenizer)
        )
    except (ValueError, TraceError, OSError, KeyError, StopIteration) as exc:
        print(f"kvrouter tune: {exc}", file=sys.stderr)
        return 2
    specs = [
        RunSpec(
            args.trace,
            config,
            args.policy,
            params,
            args.max_requests,
            args.tokenizer,
            label=f"trial {i}",
        )
        for i, params in enumerate(trials)
    ]
    try:
        results = run_all(specs, jobs=args.jobs, total_requests=total, show_progress=not args.quiet)
    except (ValueError, TraceError) as exc:
        print(f"\nkvrouter tune: {exc}", file=sys.stderr)
        return 2
    for i, result in enumerate(results):
        result.pop("wall_s", None)
        result["policy"] = f"{args.policy}#{i}" if i else f"{args.policy} (defaults)"
    best = best_trial(results, args.objective)
    print(format_table(results), file=sys.stderr)
    base, win = results[0], results[best]
    print(
        f"best: trial {best}, {args.objective} {win[args.objective]:.4g} "
        f"(defaults {base[args.objective]:.4g}); hit rate {win['hit_rate']:.3f}, "
        f"TTFT p99 {win['ttft_p99_s']:.3f} s, imbalance {win['imbalance']:.2f}",
        file=sys.stderr,
    )
    if args.out is not None:
        write_report(
            args.out, results, f"kvrouter tune: {args.trace}", {"trials": trials, "best": best}
        )
    print(params_yaml(args.policy, trials[best]), end="")
    return 0
