"""Many simulated runs (policies x backend counts x parameter sets), optionally in parallel.

A run is described by a picklable ``RunSpec`` (trace spec string, config, policy, params), so
worker processes re-open the trace themselves: nothing big crosses a process boundary and the
results do not depend on ``jobs``. Progress is a shared array of finished-request counts, one
slot per run, that the parent draws as one line on stderr.

Also the one place a trace spec (``FILE`` or ``synthetic:NAME[,key=value...]``) becomes a
stream of requests. Must not import ``router``.
"""

from __future__ import annotations

import itertools
import multiprocessing
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from policies.disaggregation import DisaggregationParams
from policies.params import parse_params
from simulator.cluster import SimConfig, simulate
from simulator.traces import Tokenize, TraceError, TraceRequest, open_trace_file
from simulator.workloads import parse_synthetic, synthetic

__all__ = ["RunSpec", "disagg_specs", "open_trace", "run_all", "tokenizer_function"]


def tokenizer_function(directory: str | None) -> Tokenize:
    """A ``Tokenize`` over a local tokenizer directory (default: the project's tiny one)."""
    from transformers import AutoTokenizer

    from simulator.tiny_tokenizer import default_path

    tok = AutoTokenizer.from_pretrained(directory or str(default_path()))

    def tokenize(prompt: Any) -> list[int]:
        if isinstance(prompt, str):
            return list(tok.encode(prompt, add_special_tokens=True))
        # As vLLM does: render the template to text, then encode without adding specials.
        text = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        return list(tok.encode(text, add_special_tokens=False))

    return tokenize


def open_trace(
    spec: str, seed: int = 0, max_requests: int | None = None, tokenizer: str | None = None
) -> Iterator[TraceRequest]:
    """Stream the requests of ``spec``: a trace file of any supported format or a synthetic one."""
    if spec.startswith("synthetic:"):
        name, params = parse_synthetic(spec)
        if max_requests is not None:
            params = replace(params, requests=min(params.requests, max_requests))
        return synthetic(name, params, seed)
    path = Path(spec)
    if not path.is_file():
        raise TraceError(f"trace: no such file {spec!r} (or use synthetic:NAME)")
    lazy: list[Tokenize] = []

    def tokenize(prompt: Any) -> list[int]:
        if not lazy:
            lazy.append(tokenizer_function(tokenizer))
        return lazy[0](prompt)

    stream = open_trace_file(path, tokenize)
    return itertools.islice(stream, max_requests) if max_requests is not None else stream


@dataclass(frozen=True, slots=True)
class RunSpec:
    trace: str
    config: SimConfig
    policy: str
    params: Mapping[str, object] = field(default_factory=dict)
    max_requests: int | None = None
    tokenizer: str | None = None
    label: str = ""
    # Prefill/decode disaggregation (simulator.disagg): prefill engine count, None = off.
    prefill_backends: int | None = None
    disagg_params: Mapping[str, object] = field(default_factory=dict)


_progress: Any = None  # the shared counters, set in each worker by the pool initializer


def _init_worker(progress: Any) -> None:
    global _progress
    _progress = progress


def _run_one(args: tuple[int, RunSpec]) -> dict[str, Any]:
    slot, spec = args
    shared = _progress

    def report(done: int) -> None:
        if shared is not None:
            shared[slot] = done

    requests = open_trace(spec.trace, spec.config.seed, spec.max_requests, spec.tokenizer)
    if spec.prefill_backends is not None:
        from simulator.disagg import simulate_disagg

        result = simulate_disagg(spec.config, spec.policy, spec.prefill_backends, requests,
                                 spec.params, spec.disagg_params, progress=report)
    else:
        result = simulate(spec.config, spec.policy, requests, spec.params, progress=report)
    result["trace"] = spec.trace
    if spec.label:
        result["label"] = spec.label
    return result


def _draw(progress: Any, total: int | None, runs: int, done_runs: int, started: float) -> None:
    finished = sum(progress[:])
    if total:
        ratio = min(finished / (total * runs), 1.0)
        bar = "#" * int(30 * ratio)
        text = f"\rsimulate [{bar:<30}] {100 * ratio:5.1f}%  runs {done_runs}/{runs}"
    else:
        text = f"\rsimulate: {finished} requests done, runs {done_runs}/{runs}"
    sys.stderr.write(f"{text}  {time.monotonic() - started:6.1f} s")
    sys.stderr.flush()


def run_all(
    specs: Sequence[RunSpec],
    jobs: int = 1,
    total_requests: int | None = None,
    show_progress: bool = True,
    on_result: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Run every spec; results come back in ``specs`` order whatever ``jobs`` is."""
    ctx = multiprocessing.get_context("fork")
    progress = ctx.Array("q", len(specs), lock=False)
    started = time.monotonic()
    results: list[dict[str, Any] | None] = [None] * len(specs)
    work = list(enumerate(specs))
    if jobs <= 1 or len(specs) == 1:
        _init_worker(progress)
        for slot, spec in work:
            results[slot] = _run_one((slot, spec))
            if on_result:
                on_result(results[slot])  # type: ignore[arg-type]
            if show_progress:
                _draw(progress, total_requests, len(specs), slot + 1, started)
    else:
        with ctx.Pool(
            min(jobs, len(specs)), initializer=_init_worker, initargs=(progress,)
        ) as pool:
            pending = {slot: pool.apply_async(_run_one, ((slot, spec),)) for slot, spec in work}
            while pending:
                for slot in [s for s, r in pending.items() if r.ready()]:
                    results[slot] = pending.pop(slot).get()
                    if on_result:
                        on_result(results[slot])  # type: ignore[arg-type]
                if show_progress:
                    _draw(progress, total_requests, len(specs), len(specs) - len(pending), started)
                if pending:
                    time.sleep(0.25)
    if show_progress:
        sys.stderr.write("\n")
    return [r for r in results if r is not None]

def disagg_specs(specs: Sequence[RunSpec], prefill_backends: str,
                 config_path: Path | None) -> list[RunSpec]:
    """``kvrouter simulate --prefill-backends K[,K...]``: each spec once per K, with the
    decider parameters of the config file's ``disaggregation:`` section."""
    try:
        counts = [int(x) for x in prefill_backends.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--prefill-backends: expected integers, got {prefill_backends!r}"
                         ) from None
    raw: object = {}
    if config_path is not None:
        loaded = yaml.safe_load(config_path.read_text()) or {}
        raw = loaded.get("disaggregation") or {} if isinstance(loaded, dict) else {}
    if not isinstance(raw, Mapping):
        raise ValueError("disaggregation: expected a mapping")
    params = asdict(parse_params(DisaggregationParams, raw, "disaggregation"))
    given = {k: v for k, v in params.items() if k in raw}
    out = []
    for spec in specs:
        for k in counts:
            if not 0 <= k < spec.config.backends:
                raise ValueError(f"--prefill-backends: {k} is not within [0, "
                                 f"{spec.config.backends})")
            out.append(replace(spec, prefill_backends=k, disagg_params=given))
    return out
