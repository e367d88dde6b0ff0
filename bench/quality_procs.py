"""The processes of ``bench/quality.py``: a set of emulated pods (``kvrouter emulate``) and one
router in front of them (kvrouter, sglang-router or vllm-router), each started, checked ready
and stopped by its own process id. All on 127.0.0.1 with free ports.

Launch commands follow /work/shared/notes/peers.md:
- ``kvrouter serve --config FILE``: the policy, its seed, the shipped tiny tokenizer for the
  model (precise mode), the pods as backends; kv_aware finds the pods' KV event sources
  through their ``/kv_event_sources`` and is ready once each source was replayed.
- ``python -m sglang_router.launch_router ... --policy cache_aware``.
- ``vllm-router ... --policy cache_aware`` (calls the pods' render endpoints) and ``--policy
  kv_aware`` with ``--kv-event-source URL=tcp://127.0.0.1:PUB`` per pod: the pods' PUB sockets
  bind (``tcp://*:0``), so vllm-router connects, as it must (tcp only), plus their replay
  sockets.
Each peer gets its own Prometheus port: both crash when theirs is taken.

``cpus`` pins a process, every thread included, to those CPUs from its start
(``bench/quality.py --pin``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp

from kvrouter.ports import free_port

__all__ = [
    "DEFAULT_ROUTERS",
    "ROUTER_NAMES",
    "Emulator",
    "Router",
    "RouterGroup",
    "add_pin_option",
    "free_port",
    "make_router",
    "pod_counters",
    "read_pin_option",
]

ROOT = Path(__file__).resolve().parent.parent
PEERS_BIN = ROOT / ".tools" / "peers-venv" / "bin"
MODEL = "tiny-llama"
BLOCK_SIZE = 16
START_TIMEOUT_S = 90.0

DEFAULT_ROUTERS = (
    "kvrouter:kv_aware",
    "kvrouter:sglang_cache_aware",
    "kvrouter:round_robin",
    "sglang-router:cache_aware",
    "vllm-router:cache_aware",
    "vllm-router:kv_aware",
)
ROUTER_NAMES = DEFAULT_ROUTERS


def _pinned(cpus: frozenset[int] | None) -> Any:
    """A ``preexec_fn`` that pins the child (and so every thread it starts) to ``cpus``."""
    if cpus is None:
        return None
    return lambda: os.sched_setaffinity(0, cpus)


def add_pin_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--pin", action="store_true",
        help="pin the emulated pods to the last CPU, and each router and this client to the "
             "others: the pods stand in for GPU servers, which never take a router's CPU "
             "(unpinned, the pods' tokenizer preempts whichever process woke it)")


def read_pin_option(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Set ``args.pod_cpus`` and ``args.router_cpus`` from ``--pin`` (None: the kernel's
    placement): the last CPU this process may use for the pods, the others for the routers
    and the client. A parser error with fewer than two CPUs."""
    args.pod_cpus = args.router_cpus = None
    if args.pin:
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            parser.error(f"--pin: needs 2 CPUs, this process may use {len(cpus)}")
        args.pod_cpus, args.router_cpus = frozenset(cpus[-1:]), frozenset(cpus[:-1])


def _env(root: Path = ROOT) -> dict[str, str]:
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{path}" if path else str(root),
            "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


async def _stop(proc: asyncio.subprocess.Process | None) -> None:
    if proc is None or proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), 15)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


def cpu_seconds(proc: asyncio.subprocess.Process | None) -> float | None:
    """User + system CPU seconds the process has used so far (Linux /proc), else None."""
    if proc is None or proc.returncode is not None:
        return None
    try:
        fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-600:] if log.exists() else ""


def _installed(exe: str) -> bool:
    return Path(exe).exists()


async def _wait_ok(url: str, proc: asyncio.subprocess.Process, log: Path,
                   timeout_s: float = START_TIMEOUT_S) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        while loop.time() < deadline:
            if proc.returncode is not None:
                tail = _tail(log)
                raise RuntimeError(f"exited with {proc.returncode} before {url} answered: {tail}")
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError, OSError):
                async with session.get(url) as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.2)
    raise RuntimeError(f"{url} not ready after {timeout_s:.0f} s (log {log})")


class Emulator:
    """``kvrouter emulate --count N`` in its own process, ports ephemeral."""

    def __init__(self, count: int, num_gpu_blocks: int, slow_pod: tuple[int, float] | None,
                 log: Path, cpus: frozenset[int] | None = None) -> None:
        self.count = count
        self.cpus = cpus
        self.num_gpu_blocks = num_gpu_blocks
        self.slow_pod = slow_pod
        self.log = log
        self.urls: list[str] = []
        self.kv_endpoints: list[str] = []
        self.replay_endpoints: list[str] = []
        self._proc: asyncio.subprocess.Process | None = None

    def cpu_s(self) -> float | None:
        return cpu_seconds(self._proc)

    async def start(self) -> None:
        cmd = [sys.executable, "-m", "kvrouter.cli", "emulate", "--count", str(self.count),
               "--port", "0", "--model", MODEL, "--block-size", str(BLOCK_SIZE),
               "--num-gpu-blocks", str(self.num_gpu_blocks), "--time-scale", "1",
               "--profile", "h200-llama-3.1-8b", "--enable-scale-out"]
        if self.slow_pod is not None:
            cmd += ["--slow-pod", f"{self.slow_pod[0]}={self.slow_pod[1]:g}"]
        err = self.log.open("wb")
        self._proc = await asyncio.create_subprocess_exec(
            *cmd, cwd=ROOT, env=_env(), stdout=asyncio.subprocess.PIPE, stderr=err,
            preexec_fn=_pinned(self.cpus))
        err.close()
        assert self._proc.stdout is not None
        lines = []
        while True:
            line = (await asyncio.wait_for(self._proc.stdout.readline(), START_TIMEOUT_S)).decode()
            if not line:
                raise RuntimeError(f"kvrouter emulate exited before it was ready (log {self.log})")
            lines.append(line)
            if "emulated pods ready" in line:
                break
        for line in lines:
            url = re.search(r"(http://\S+)", line)
            kv = re.search(r"kv_events=tcp://\*:(\d+)", line)
            replay = re.search(r"replay=tcp://\*:(\d+)", line)
            if url:
                self.urls.append(url.group(1))
                if kv and replay:
                    self.kv_endpoints.append(f"tcp://127.0.0.1:{kv.group(1)}")
                    self.replay_endpoints.append(f"tcp://127.0.0.1:{replay.group(1)}")
        if len(self.urls) != self.count:
            raise RuntimeError(f"expected {self.count} pods, got: {''.join(lines)}")

    async def stop(self) -> None:
        await _stop(self._proc)


class Router:
    """One router process in front of an ``Emulator``'s pods."""

    def __init__(self, name: str, log: Path, seed: int,
                 sync: dict[str, Any] | None = None, cpus: frozenset[int] | None = None) -> None:
        self.name = name
        self.cpus = cpus
        self.log = log
        self.seed = seed
        self.sync = sync  # a kvrouter replica's `sync:` section (RouterGroup)
        self.url = ""
        self.urls: list[str] = []
        self._proc: asyncio.subprocess.Process | None = None

    def cpu_s(self) -> float | None:
        return cpu_seconds(self._proc)

    def tree(self) -> Path:
        """The checkout the router runs from: ``kvrouter@PATH:POLICY`` runs the one at PATH
        (an A/B against the tree before a change, in one run); everything else this one."""
        return Path(self.name.partition(":")[0].partition("@")[2] or ROOT)

    def _command(self, pods: Emulator, port: int) -> tuple[list[str], str]:
        kind, _, policy = self.name.partition(":")
        if kind == "kvrouter" or kind.startswith("kvrouter@"):
            import yaml

            # kvrouter:kv_aware+copy_cutoff_t=0+work_floor_ratio=0.1: the policy's parameters,
            # for an A/B of one parameter in a single run.
            policy, *pairs = policy.split("+")
            params = {k: yaml.safe_load(v) for k, _, v in (pair.partition("=") for pair in pairs)}

            from simulator.tiny_tokenizer import default_path

            config = self.log.with_suffix(".yaml")
            config.write_text(yaml.safe_dump({
                "server": {"host": "127.0.0.1", "port": port, "log_level": "warning"},
                "health": {"interval_s": 1.0},
                "policy": {"name": policy, "seed": self.seed,
                           **({"params": params} if params else {})},
                "models": {MODEL: {"tokenizer": str(default_path()), "block_size": BLOCK_SIZE}},
                "backends": [{"url": u} for u in pods.urls],
                **({"sync": self.sync} if self.sync else {}),
            }))
            return [sys.executable, "-m", "kvrouter.cli", "serve", "--config", str(config)], \
                "/ready"
        metrics = ["--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port())]
        base = ["--host", "127.0.0.1", "--port", str(port), "--worker-urls", *pods.urls]
        if kind == "sglang-router":
            exe = PEERS_BIN / "python"
            return [str(exe), "-m", "sglang_router.launch_router", *base, "--policy", policy,
                    "--log-level", "warn", *metrics], "/health"
        if kind == "vllm-router":
            cmd = [str(PEERS_BIN / "vllm-router"), *base, "--policy", policy,
                   "--log-level", "warning", *metrics]
            if policy == "kv_aware":
                for url, pub, replay in zip(pods.urls, pods.kv_endpoints,
                                            pods.replay_endpoints, strict=True):
                    cmd += ["--kv-event-source", f"{url}={pub}",
                            "--kv-event-replay-source", f"{url}={replay}"]
                cmd += ["--kv-event-block-size", str(BLOCK_SIZE), "--kv-event-model", MODEL]
            return cmd, "/health"
        raise ValueError(f"unknown router {self.name!r}")

    async def start(self, pods: Emulator, port: int) -> None:
        cmd, ready = self._command(pods, port)
        tree = self.tree()
        if not _installed(cmd[0]):
            raise RuntimeError(f"{cmd[0]} is not installed (run bench/install-peers)")
        out = self.log.open("wb")
        self._proc = await asyncio.create_subprocess_exec(
            *cmd, cwd=tree, env=_env(tree), stdout=out, stderr=asyncio.subprocess.STDOUT,
            stdin=asyncio.subprocess.DEVNULL, preexec_fn=_pinned(self.cpus))
        out.close()
        self.url = f"http://127.0.0.1:{port}"
        self.urls = [self.url]
        await _wait_ok(self.url + ready, self._proc, self.log)
        kind, _, policy = self.name.partition(":")
        if kind.startswith("kvrouter") and policy.split("+")[0] == "kv_aware":
            # Every kv_aware variant (parameters, another checkout) starts on the same footing.
            await self._wait_events(len(pods.urls))
        await asyncio.sleep(1.0)  # one scrape / health round before traffic, for every router

    async def _wait_events(self, sources: int) -> None:
        """kv_aware is ready for a fair start once every pod's event source was replayed."""
        assert self._proc is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT_S
        async with aiohttp.ClientSession() as session:
            while loop.time() < deadline:
                async with session.get(self.url + "/metrics") as resp:
                    text = await resp.text()
                ok = [line for line in text.splitlines()
                      if line.startswith("kvrouter_kv_event_replays_total")
                      and 'outcome="ok"' in line and not line.endswith(" 0.0")]
                if len(ok) >= sources:
                    return
                await asyncio.sleep(0.2)
        raise RuntimeError("kv_aware never replayed every pod's KV events")

    async def token_parity(self) -> dict[str, float] | None:
        """kvrouter's own check that its block hashes equal the engines' (tools, templates):
        blocks checked and mismatched, summed over models; None for the peers."""
        if not self.name.startswith(("kvrouter:", "kvrouter@")):
            return None
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            async with session.get(self.url + "/metrics") as resp:
                text = await resp.text()
        out = {"checked_blocks": 0.0, "mismatched_blocks": 0.0}
        for line in text.splitlines():
            if line.startswith("kvrouter_token_parity_checked_blocks_total"):
                out["checked_blocks"] += float(line.rsplit(" ", 1)[1])
            elif line.startswith("kvrouter_token_parity_mismatch_total"):
                out["mismatched_blocks"] += float(line.rsplit(" ", 1)[1])
        return out

    async def stop(self) -> None:
        await _stop(self._proc)


class RouterGroup:
    """``kvrouterxR:POLICY`` (replica sync on) or ``kvrouterxR-nosync:POLICY``: R kvrouter
    processes in front of the same pods, each a replica synced with the others over
    127.0.0.1 (static peers; batch frames, as ``serve --workers`` sends them); the client
    alternates requests between them (docs/scale-out.md). ``kvrouterxR@PATH:POLICY`` runs
    the checkout at PATH, as ``kvrouter@PATH:POLICY`` does."""

    def __init__(self, name: str, log: Path, seed: int,
                 cpus: frozenset[int] | None = None) -> None:
        kind, _, policy = name.partition(":")
        kind, at, tree = kind.partition("@")
        count, _, flag = kind.removeprefix("kvrouterx").partition("-")
        self.name = name
        self.count = int(count)
        ports = [free_port() for _ in range(self.count)]
        self.routers = []
        for i in range(self.count):
            sync = None
            if flag != "nosync":
                sync = {"enabled": True, "bind": f"tcp://127.0.0.1:{ports[i]}",
                        "peers": [f"tcp://127.0.0.1:{p}" for j, p in enumerate(ports) if j != i],
                        "allow_from": ["127.0.0.1"], "send_prompt_text": policy != "kv_aware",
                        "batch_frames": True}  # one version: every replica reads batches
            self.routers.append(Router(f"kvrouter{at}{tree}:{policy}",
                                       log.with_name(f"{log.stem}-r{i}.log"),
                                       seed * 100 + i, sync, cpus))
        self.url = ""
        self.urls: list[str] = []

    def cpu_s(self) -> float | None:
        values = [r.cpu_s() for r in self.routers]
        return None if any(v is None for v in values) else sum(v or 0.0 for v in values)

    async def start(self, pods: Emulator, port: int) -> None:
        for i, router in enumerate(self.routers):
            await router.start(pods, port if i == 0 else free_port())
        self.urls = [r.url for r in self.routers]
        self.url = self.urls[0]
        await asyncio.sleep(1.0)  # heartbeats: every replica hears every other before traffic

    async def token_parity(self) -> dict[str, float] | None:
        out = {"checked_blocks": 0.0, "mismatched_blocks": 0.0}
        for router in self.routers:
            parity = await router.token_parity()
            for key in out:
                out[key] += (parity or {}).get(key, 0.0)
        return out

    async def stop(self) -> None:
        for router in self.routers:
            await router.stop()


def make_router(name: str, log: Path, seed: int,
                cpus: frozenset[int] | None = None) -> Router | RouterGroup:
    if name.startswith("kvrouterx"):
        return RouterGroup(name, log, seed, cpus)
    return Router(name, log, seed, cpus=cpus)


_COUNTERS = {
    "vllm:prefix_cache_hits_total": "hits",
    "vllm:prefix_cache_queries_total": "queries",
    "vllm:num_preemptions_total": "preemptions",
    "vllm:e2e_request_latency_seconds_count": "requests",
}


async def pod_counters(urls: list[str]) -> list[dict[str, float]]:
    """Each pod's own counters (summed over label sets)."""
    out = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        for url in urls:
            async with session.get(f"{url}/metrics") as resp:
                text = await resp.text()
            values: dict[str, Any] = dict.fromkeys(_COUNTERS.values(), 0.0)
            for line in text.splitlines():
                name = line.split("{", 1)[0].split(" ", 1)[0]
                key = _COUNTERS.get(name)
                if key is not None:
                    values[key] += float(line.rsplit(" ", 1)[1])
            out.append(values)
    return out
