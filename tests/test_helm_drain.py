"""What the chart's graceful termination relies on, checked on a real ``kvrouter serve``
process: discovery from the Kubernetes API configured as the chart renders it, and SIGTERM
letting a stream already in flight finish before the process exits 0."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import yaml
from fake_backend import FakeBackend
from fake_kube import FakeKube, make_pod
from ports import free_port


async def test_serve_discovers_pods_and_drains_streams_on_sigterm(
    tmp_path: Path,
    start_backend: Callable[..., Awaitable[FakeBackend]],
    http: aiohttp.ClientSession,
) -> None:
    backend = await start_backend(name="engine", chunks=8, chunk_delay_s=0.25)
    kube = FakeKube(token="sa-token")
    await kube.start()
    process = None
    try:
        await kube.apply(make_pod("engine-0", "127.0.0.1", labels={"app": "vllm"}, annotations={
            "kvrouter.io/port": backend.url.rsplit(":", 1)[1]}))
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(yaml.safe_dump({
            "current-context": "c",
            "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u",
                                                   "namespace": "default"}}],
            "clusters": [{"name": "k", "cluster": {"server": kube.url}}],
            "users": [{"name": "u", "user": {"token": "sa-token"}}],
        }))
        port = free_port()
        config = tmp_path / "config.yaml"
        config.write_text(yaml.safe_dump({
            "server": {"host": "127.0.0.1", "port": port, "log_level": "warning"},
            "discovery": {"mode": "kubernetes", "kubernetes": {
                "kubeconfig": str(kubeconfig), "label_selector": "app=vllm",
                "ask_event_sources": False}},
        }))
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "kvrouter.cli", "serve", "--config", str(config),
            env=os.environ.copy(), stderr=asyncio.subprocess.PIPE,
        )
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                async with http.get(f"{url}/ready") as ready:
                    if ready.status == 200:
                        break
            except OSError:
                pass
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("router never became ready with the discovered pod")

        resp = await http.post(f"{url}/v1/completions", json={
            "model": "tiny", "prompt": "hello", "stream": True, "max_tokens": 8})
        assert resp.status == 200 and resp.headers["x-kvrouter-backend"] == backend.url
        first = await resp.content.readline()
        assert b"engine-t0" in first
        process.send_signal(signal.SIGTERM)
        rest = await resp.read()
        assert b"engine-t7" in rest and rest.rstrip().endswith(b"data: [DONE]")
        assert await asyncio.wait_for(process.wait(), 60) == 0
        process = None
        assert backend.finished == 1 and backend.cancelled == 0
    finally:
        if process is not None and process.returncode is None:
            process.kill()
            await process.wait()
        await kube.stop()
