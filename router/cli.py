"""``kvrouter serve``: run the router from a config file, flags, or both.

Precedence: the file, then the environment (``KVROUTER_PORT``, ``KVROUTER_LOG_LEVEL``), then
flags. ``--backend``/``--prefill``/``--decode`` replace the file's backends when given. Top-level
imports stay light (argparse only) so ``kvrouter --help`` is fast.
"""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["HELP", "add_arguments", "build_config", "run"]

HELP = "Run the OpenAI-compatible routing proxy in front of vLLM/SGLang backends."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # Defaults shown here come from the config dataclasses, so help and code cannot disagree.
    from policies.registry import policy_names
    from router.config import PolicyConfig, ServerConfig

    server, policy = ServerConfig(), PolicyConfig()
    parser.add_argument("--config", metavar="FILE",
                        help="YAML config (see config.example.yaml); flags override it "
                             "(default: none, every key at its default)")
    parser.add_argument("--backend", metavar="URL", action="append", default=[],
                        help="a mixed-role backend's server root, e.g. http://10.0.0.1:8000 "
                             "(no /v1; repeatable; replaces the config's backends)")
    parser.add_argument("--prefill", metavar="URL", action="append", default=[],
                        help="a prefill-role backend for prefill/decode disaggregation (repeatable)")
    parser.add_argument("--decode", metavar="URL", action="append", default=[],
                        help="a decode-role backend for prefill/decode disaggregation (repeatable)")
    parser.add_argument("--policy", metavar="NAME",
                        help=f"routing policy: {', '.join(policy_names())}; its params come "
                             "from the config file (default: the config's policy.name, else "
                             f"{policy.name})")
    parser.add_argument("--model-tokenizer", metavar="NAME=DIR", action="append", default=[],
                        help="tokenize model NAME's prompts with the Hugging Face tokenizer in DIR "
                             "(or an offline model id), as the engine does (repeatable; same as "
                             "models.NAME.tokenizer in the config; without one, kv_aware runs in "
                             "approximate mode)")
    parser.add_argument("--host", help=f"address to listen on (default {server.host})")
    parser.add_argument("--port", type=int, help=f"port to listen on (default {server.port})")
    parser.add_argument("--loop", choices=["auto", "asyncio", "uvloop"],
                        help="event loop: uvloop when installed, else asyncio (auto), or force "
                             f"one (default {server.event_loop})")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error", "critical"],
                        help=f"log verbosity (default {server.log_level})")
    parser.add_argument("--workers", type=int, default=1, metavar="N",
                        help="router processes sharing the port (SO_REUSEPORT), synced as "
                             "replicas over Unix sockets, so one pod uses N cores (default %(default)s)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # set by the parent


def build_config(args: argparse.Namespace, environ: dict[str, str]) -> Any:
    """The effective Config: file (or defaults), env overrides, then flags."""
    import dataclasses

    from router.config import (
        Config,
        ConfigError,
        EventLoop,
        LogLevel,
        apply_env,
        load_config,
        parse_config,
    )

    config: Config = load_config(args.config) if args.config else parse_config({})
    config = apply_env(config, environ)
    server = config.server
    if args.host:
        server = dataclasses.replace(server, host=args.host)
    if args.port is not None:
        if not 0 <= args.port <= 65535:
            raise ConfigError("--port", "expected 0..65535")
        server = dataclasses.replace(server, port=args.port)
    if args.log_level:
        server = dataclasses.replace(server, log_level=LogLevel(args.log_level))
    if args.loop:
        server = dataclasses.replace(server, event_loop=EventLoop(args.loop))
    flagged = (
        [("--backend", {"url": u}) for u in args.backend]
        + [("--prefill", {"url": u, "role": "prefill"}) for u in args.prefill]
        + [("--decode", {"url": u, "role": "decode"}) for u in args.decode]
    )
    backends = config.backends
    if flagged:
        try:
            backends = parse_config({"backends": [raw for _flag, raw in flagged]}).backends
        except ConfigError as exc:
            # Name the flag the user typed, not the config key it became.
            index = int(exc.path.split("[", 1)[1].split("]", 1)[0]) if "[" in exc.path else 0
            raise ConfigError(flagged[index][0], exc.problem) from None
    policy = config.policy
    if args.policy:
        # Params in the file belong to the file's policy; a different policy starts from its
        # defaults rather than inheriting keys it may not know.
        params = policy.params if args.policy == policy.name else {}
        policy = parse_config({"policy": {"name": args.policy, "params": params,
                                          "seed": policy.seed}}).policy
    return dataclasses.replace(config, server=server, backends=backends, policy=policy)


def run(args: argparse.Namespace) -> int:
    import asyncio
    import logging
    import os
    import random
    import signal
    import sys

    from router.app import create_app, serve
    from router.config import ConfigError
    from router.setup.discovery import discovery_background
    from router.setup.kv import build_kv, wants_kv
    from router.sync.service import build_sync

    worker = getattr(args, "worker", None)
    try:
        config = build_config(args, dict(os.environ))
        if worker is not None:  # one of `--workers N`: the shared port, synced with siblings
            from pathlib import Path

            from router.workers import worker_config

            config = worker_config(config, worker[0], worker[1], Path(worker[2]), worker[3])
        # Logging first: start-up warnings (no tokenizer, approximate mode) get the format.
        logging.basicConfig(level=config.server.log_level.upper(),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        tokenizer_dirs = _model_tokenizers(args.model_tokenizer)
        kv = (build_kv(config, tokenizer_dirs, os.environ) if wants_kv(config, tokenizer_dirs)
              else None)
        background = discovery_background(config, os.environ)
        sync = build_sync(config, os.environ)
    except ConfigError as exc:
        print(f"kvrouter serve: config error: {exc}", file=sys.stderr)
        return 2
    log = logging.getLogger("kvrouter")
    workers = getattr(args, "workers", 1) or 1
    if workers < 1:
        print("kvrouter serve: --workers: must be >= 1", file=sys.stderr)
        return 2
    if workers > 1 and worker is None:
        from router.workers import run_workers

        return run_workers(args, config, workers, run)
    if kv is None and config.sync.warm_start.enabled:
        log.warning("sync.warm_start is on but nothing uses the prefix index (no kv_events, "
                    "tokenizer or KV-aware policy): starting without a snapshot")
    if not config.backends and not background:
        log.warning("no backends configured: every request will get 503 until some are added")

    async def main() -> None:
        if kv is None:
            app = create_app(config, background=background, sync=sync)
        else:
            rng = random.Random(config.policy.seed)
            app = create_app(config, background=[*background, kv.background],
                             analyzer=kv.analyzer, index=kv.index, policy=kv.policy(rng), rng=rng,
                             sync=sync, routes=kv.routes(), ready_checks=[kv.not_ready])
        worker_metrics = None
        if worker is not None:
            from pathlib import Path

            from router.workers import WorkerMetrics

            state = app.state
            worker_metrics = WorkerMetrics(
                worker[0], worker[1], Path(worker[2]), state.metrics.registry,
                lambda: app.local_metrics(), state.session)
            app.routes["/metrics"] = {"GET": worker_metrics.handle, "HEAD": worker_metrics.handle}
        freeze_startup_heap()
        runner, port = await serve(app, config.server.host, config.server.port,
                                   access_log=config.server.log_level == "debug",
                                   reuse_port=worker is not None)
        if worker_metrics is not None:
            await worker_metrics.start()
        log.info("kvrouter listening on http://%s:%d with policy %s and %d backends%s",
                 config.server.host, port, config.policy.name, len(config.backends),
                 _compiled())
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            if worker_metrics is not None:
                await worker_metrics.stop()
            await runner.cleanup()

    try:
        _run_loop(main(), config.server.event_loop, log)
    except OSError as exc:
        print(f"kvrouter serve: {exc}", file=sys.stderr)
        return 1
    return 0


def _model_tokenizers(pairs: list[str]) -> dict[str, str]:
    from router.config import ConfigError

    out = {}
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep or not name or not path:
            raise ConfigError("--model-tokenizer", f"expected NAME=DIR, got {pair!r}")
        out[name] = path
    return out


def freeze_startup_heap() -> int:
    """Move everything alive after start-up into the collector's permanent generation, once,
    before serving; returns how many objects that froze.

    Tokenizers, vocabularies and transformers' module state are ~90k tracked objects that
    live until exit. A full (generation 2) collection scans every one of them with the event
    loop stopped: 25-36 ms here, and the first one lands in the first requests' path (it
    held the second request of a cold burst for 36 ms; bench/README.md). Frozen, they are
    skipped: a full collection then scans only what serving allocated (the prefix index's
    entries are not tracked objects). ``gc.freeze`` is CPython's tool for exactly this."""
    import gc

    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def _run_loop(main: Any, event_loop: str, log: Any) -> None:
    """uvloop's C transports lowered the router's CPU per request and raised its req/s
    (bench/README.md); asyncio when uvloop is absent or not wanted."""
    import asyncio

    if event_loop != "asyncio":
        try:
            import uvloop
        except ImportError:
            if event_loop == "uvloop":
                raise OSError("--loop uvloop: uvloop is not installed") from None
        else:
            log.debug("running on uvloop")
            uvloop.run(main)
            return
    asyncio.run(main)


def _compiled() -> str:
    """Said at start-up when the request path runs compiled (``kvrouter.native``)."""
    import importlib.machinery

    import router.proxy

    compiled = str(router.proxy.__file__).endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))
    return " (request path compiled: make native)" if compiled else ""
