"""Emulated vLLM/SGLang pods on 127.0.0.1, startable in-process: N real aiohttp servers in the
current asyncio loop, each driven by its own engine model, each publishing KV events over ZMQ.

Async; must not import ``router``. The CLI front is ``simulator.emulator.cli``
(``kvrouter emulate``).

Usage from tests, benchmarks and the demo::

    async with EmulatedCluster(count=2, time_scale=50.0) as cluster:
        cluster.urls                 # ["http://127.0.0.1:PORT0", ...]
        cluster.kv_endpoints         # ["tcp://127.0.0.1:P0", ...] connectable PUB endpoints
        cluster.kv_replay_endpoints  # ["tcp://127.0.0.1:R0", ...] replay ROUTER endpoints
        cluster.kv_topics            # ["kv@pod-0", ...]
        cluster.pods[0].engine       # the engine model (stats, cached_keys())

Ports: ``port=0`` gives each pod an ephemeral port; ``port=P`` uses P..P+N-1.
KV events (``kv_events_endpoint``): an endpoint the engine binds (``*``, ``::``, ``ipc://``,
``inproc://``) gets port + i per pod (0 = ephemeral), like vLLM's data-parallel ranks; any other
endpoint (e.g. ``tcp://127.0.0.1:5557``) is connected to by every pod (fan-in: the router binds
it; topics tell pods apart). ``kv_events_endpoint=None`` disables events. The replay socket is
always bound (``kv_replay_endpoint``, port + i, 0 = ephemeral).
``num_gpu_blocks=0`` takes what the cost profile's KV memory holds at this block size.
``scale_out=True`` serves vLLM's render endpoints (``vllm serve --enable-scale-out``).
``slow_pods={i: f}`` makes pod i's engine f times slower than the others (every step lasts f
times longer in wall time; its metrics still report wall seconds), e.g. one GPU throttled.
``cpu_offload_tokens=N`` gives every pod vLLM's native CPU offloading of N tokens;
``shared_store_tokens=N`` makes the pods share one KV store of N tokens in a Redis/Valkey
server (``simulator.emulator.store``): the one at ``shared_store_url`` (``redis://host:port``,
``unix:///path``; shared with other emulator processes pointing there), else a private
``redis-server`` the cluster starts and stops.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from types import TracebackType

import zmq.asyncio
from aiohttp import web

from policies.types import EngineKind, Role
from simulator.emulator.http import build_app
from simulator.emulator.kv import KvEventPublisher, engine_binds
from simulator.emulator.pd import PdNode
from simulator.emulator.pod import EmulatedPod, PodConfig, load_codec
from simulator.emulator.store import RedisBlockStore, RedisServer
from simulator.engine.cost_model import DEFAULT_PROFILE, load_cost_model

__all__ = ["EmulatedCluster"]


def _nth_endpoint(endpoint: str, i: int) -> str:
    """``tcp://*:5557`` -> ``tcp://*:5557+i``; port 0 stays 0 (ephemeral)."""
    match = re.fullmatch(r"(tcp://.+):(\d+)", endpoint)
    if match is None:
        return endpoint if i == 0 else f"{endpoint}-{i}"  # ipc:// and inproc:// paths
    port = int(match.group(2))
    return f"{match.group(1)}:{port + i if port else 0}"


def _connectable(endpoint: str) -> str:
    return endpoint.replace("tcp://*:", "tcp://127.0.0.1:").replace(
        "tcp://[::]:", "tcp://127.0.0.1:"
    )


class EmulatedCluster:
    def __init__(
        self,
        count: int = 2,
        port: int = 0,
        *,
        engine: str = "vllm",
        model: str = "tiny-llama",
        block_size: int = 16,
        num_gpu_blocks: int = 4096,
        max_model_len: int = 8192,
        max_num_batched_tokens: int = 8192,
        max_num_seqs: int = 256,
        time_scale: float = 1.0,
        profile: str | Path = DEFAULT_PROFILE,
        tokenizer: str | Path | None = None,
        kv_events_endpoint: str | None = "tcp://*:0",
        kv_replay_endpoint: str = "tcp://*:0",
        buffer_steps: int = 10_000,
        role: str = "mixed",
        kv_network_bytes_per_s: float = 25e9,
        slow_pods: dict[int, float] | None = None,
        scale_out: bool = False,
        cpu_offload_tokens: int = 0,
        shared_store_tokens: int = 0,
        shared_store_url: str | None = None,
    ) -> None:
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        if engine not in ("vllm", "sglang"):
            raise ValueError(f"engine must be vllm or sglang, got {engine!r}")
        self.count = count
        self.port = port
        self.slow_pods = dict(slow_pods or {})
        for index, factor in self.slow_pods.items():
            if not 0 <= index < count:
                raise ValueError(f"slow pod index {index} is not a pod (0..{count - 1})")
            if not factor > 0:
                raise ValueError(f"slow pod factor must be > 0, got {factor} for pod {index}")
        cost = load_cost_model(profile)
        blocks = num_gpu_blocks or cost.num_gpu_blocks(block_size)
        self.config = PodConfig(
            model=model,
            engine_kind=engine,
            block_size=block_size,
            num_gpu_blocks=blocks,
            max_model_len=max_model_len,
            max_num_batched_tokens=max_num_batched_tokens,
            max_num_seqs=max_num_seqs,
            time_scale=time_scale,
            scale_out=scale_out,
            cpu_offload_blocks=cpu_offload_tokens // block_size,
        )
        if cpu_offload_tokens < 0 or shared_store_tokens < 0:
            raise ValueError("cpu_offload_tokens and shared_store_tokens must be >= 0")
        self._store_blocks = shared_store_tokens // block_size
        self.shared_store_url = shared_store_url
        self._redis: RedisServer | None = None
        self.stores: list[RedisBlockStore] = []
        self._cost = cost
        self._tokenizer = tokenizer
        self._kv_endpoint = kv_events_endpoint
        self._kv_replay = kv_replay_endpoint
        self._buffer_steps = buffer_steps
        # Prefill/decode role of every pod (simulator.emulator.pd); "mixed" adds nothing.
        self.role = Role(role)
        self._kv_network_bytes_per_s = kv_network_bytes_per_s
        self.pd_nodes: list[PdNode] = []
        self.pods: list[EmulatedPod] = []
        self.urls: list[str] = []
        self._runners: list[web.AppRunner] = []
        self._zmq: zmq.asyncio.Context | None = None

    @property
    def kv_endpoints(self) -> list[str]:
        return [_connectable(p.publisher.endpoint) for p in self.pods if p.publisher is not None]

    @property
    def kv_replay_endpoints(self) -> list[str]:
        return [
            _connectable(p.publisher.replay_endpoint or "")
            for p in self.pods
            if p.publisher is not None
        ]

    @property
    def kv_topics(self) -> list[str]:
        return [p.publisher.topic for p in self.pods if p.publisher is not None]

    async def start(self) -> None:
        codec = load_codec(self._tokenizer)
        if self._kv_endpoint is not None:
            self._zmq = zmq.asyncio.Context()
        try:
            if self._store_blocks and self.shared_store_url is None:
                self._redis = RedisServer()
                self.shared_store_url = await self._redis.start()
            for i in range(self.count):
                store = None
                if self._store_blocks:
                    assert self.shared_store_url is not None
                    store = RedisBlockStore(self.shared_store_url, self._store_blocks,
                                            name=self.config.model)
                    await store.start()
                    self.stores.append(store)
                publisher = None
                if self._zmq is not None and self._kv_endpoint is not None:
                    endpoint = self._kv_endpoint
                    if engine_binds(endpoint):
                        endpoint = _nth_endpoint(endpoint, i)
                    publisher = KvEventPublisher(
                        self._zmq,
                        endpoint,
                        _nth_endpoint(self._kv_replay, i),
                        topic=f"kv@pod-{i}",
                        buffer_steps=self._buffer_steps,
                    )
                config = self.config
                if i in self.slow_pods:
                    # A virtual second lasting `factor` times longer slows every step alike.
                    config = replace(config, time_scale=config.time_scale / self.slow_pods[i])
                pod = EmulatedPod(config, self._cost, codec, index=i, publisher=publisher,
                                  store=store)
                self.pods.append(pod)
                await pod.start()
                app = build_app(pod)
                node = None
                if self.role is not Role.MIXED:
                    node = PdNode(self.role, EngineKind(self.config.engine_kind), f"pod-{i}",
                                  block_size=self.config.block_size,
                                  kv_bytes_per_token=self._cost.kv_bytes_per_token or 131072,
                                  network_bytes_per_s=self._kv_network_bytes_per_s,
                                  time_scale=self.config.time_scale)
                    node.attach(app)
                    self.pd_nodes.append(node)
                # Closing the cluster cuts in-flight requests after a short grace period rather
                # than waiting for long generations to finish.
                runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
                await runner.setup()
                self._runners.append(runner)
                site = web.TCPSite(runner, "127.0.0.1", self.port + i if self.port else 0)
                await site.start()
                host, bound_port = runner.addresses[0][:2]
                if node is not None:
                    node.host, node.port = host, int(bound_port)
                self.urls.append(f"http://{host}:{bound_port}")
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        for runner in self._runners:
            await runner.cleanup()
        for pod in self.pods:
            await pod.close()
        for store in self.stores:
            await store.close()
        self.stores.clear()
        if self._redis is not None:
            await self._redis.stop()
            self._redis = None
            self.shared_store_url = None
        self._runners.clear()
        if self._zmq is not None:
            self._zmq.term()
            self._zmq = None

    async def __aenter__(self) -> EmulatedCluster:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
