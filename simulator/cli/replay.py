"""``kvrouter replay``: replay a trace live against an OpenAI-compatible endpoint.

Example::

    kvrouter replay --trace synthetic:multi_tenant,requests=300 --target http://127.0.0.1:8080 \\
        --out /tmp/live --speedup 4

Open loop at the trace's arrival times divided by ``--speedup``; streaming; TTFT, inter-token
latency and end-to-end measured from the client. Writes the same ``results.json`` and report as
``kvrouter simulate``. Top-level imports stay light (argparse only).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

__all__ = ["HELP", "add_arguments", "run"]

HELP = "Replay a trace live against an OpenAI-compatible endpoint and report TTFT, ITL and hit rate."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--trace", required=True, help="trace file or synthetic:NAME[,key=value...]"
    )
    parser.add_argument(
        "--target", required=True, help="server root (no /v1), e.g. http://127.0.0.1:8080"
    )
    parser.add_argument("--out", required=True, type=Path, help="output directory (results.json, report.html, one .svg per chart)")
    parser.add_argument("--speedup", type=float, default=1.0, help="divide arrival times by this (default %(default)s)")
    parser.add_argument(
        "--model", default=None, help="model name (default: the target's first /v1/models entry)"
    )
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer directory (vocabulary for hash-only traces; text traces; default: the "
        "shipped tiny tokenizer)",
    )
    parser.add_argument(
        "--max-requests", type=int, default=None, help="stop after this many requests (default: the whole trace)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed for synthetic traces and hash-only prompts (default %(default)s)"
    )
    parser.add_argument("--slo-ttft-s", type=float, default=2.0, help="TTFT SLO for goodput, s (default %(default)s)")
    parser.add_argument(
        "--latency-scale",
        type=float,
        default=1.0,
        help="multiply measured times (an emulator's --time-scale gives virtual seconds; "
        "default %(default)s)",
    )
    parser.add_argument("--timeout-s", type=float, default=600.0, help="per-request timeout, s (default %(default)s)")
    parser.add_argument("--label", default="replay", help="name of this run in the report (default %(default)s)")
    parser.add_argument(
        "--no-ignore-eos",
        action="store_true",
        help="do not send ignore_eos (for endpoints that reject it)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


async def _first_model(target: str) -> str:
    import aiohttp

    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
        session.get(target.rstrip("/") + "/v1/models") as resp,
    ):
        data = await resp.json(content_type=None)
    models = data.get("data") or []
    if not models:
        raise ValueError(f"{target}/v1/models lists no model; pass --model")
    return str(models[0]["id"])


def _vocab(tokenizer: str | None) -> int:
    from transformers import AutoTokenizer

    from simulator.tiny_tokenizer import default_path

    return len(AutoTokenizer.from_pretrained(tokenizer or str(default_path())))


def run(args: argparse.Namespace) -> int:
    import asyncio
    import sys

    import aiohttp

    from simulator.replay import ReplayConfig, TokenBlocks, grouped_errors, replay
    from simulator.report import format_table, short_name, write_report
    from simulator.sweep import open_trace
    from simulator.traces import TraceError

    if args.speedup <= 0 or args.latency_scale <= 0:
        print("kvrouter replay: --speedup and --latency-scale must be > 0", file=sys.stderr)
        return 2
    target = args.target.rstrip("/")
    if target.endswith("/v1"):
        # The OpenAI base-URL habit: replay appends /v1/... itself.
        print(f"kvrouter replay: --target {args.target!r} includes /v1: give the server's root "
              f"({target[:-3]})", file=sys.stderr)
        return 2

    def draw(done: int, sent: int) -> None:
        if not args.quiet:
            sys.stderr.write(f"\rreplay: {done} done / {sent} sent")
            sys.stderr.flush()

    async def main() -> dict[str, Any]:
        model = args.model or await _first_model(args.target)
        config = ReplayConfig(
            target=args.target,
            model=model,
            speedup=args.speedup,
            timeout_s=args.timeout_s,
            slo_ttft_s=args.slo_ttft_s,
            latency_scale=args.latency_scale,
            ignore_eos=not args.no_ignore_eos,
        )
        # Ids below 5 are the tiny tokenizer's special tokens; keep hash-only prompts plain.
        blocks = TokenBlocks(_vocab(args.tokenizer), first_id=5, seed=args.seed)
        requests = open_trace(args.trace, args.seed, args.max_requests, args.tokenizer)
        return await replay(requests, config, blocks, label=args.label, progress=draw)

    try:
        result = asyncio.run(main())
    except (ValueError, TraceError, OSError, aiohttp.ClientError) as exc:
        print(f"\nkvrouter replay: {exc}", file=sys.stderr)
        return 2
    if not args.quiet:
        sys.stderr.write("\n")
    print(format_table([result]))
    errors = grouped_errors(result.get("errors") or {})
    notes = []
    if errors:
        print("errors from the target:\n  " + "\n  ".join(errors))
        notes.append(
            f"{result['failed']} of {result['arrived']} requests failed (grouped under the table). "
            "Hit rate and oracle both count only the requests the target accepted."
        )
    path = write_report(
        args.out,
        [result],
        f"kvrouter replay: {short_name(args.trace)}",
        {"trace": args.trace, "target": args.target, "speedup": args.speedup},
        notes,
    )
    print(f"results: {args.out / 'results.json'}\nreport:  {path}")
    return 0 if result["requests"] else 1
