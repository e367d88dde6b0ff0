"""`kvrouter emulate` as a user runs it: a real process serving pods until SIGTERM; and a
client that goes away mid-stream frees its request in the engine (vLLM aborts it)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import aiohttp

from simulator.emulator.fleet import EmulatedCluster

ROOT = Path(__file__).resolve().parent.parent


async def test_cli_serves_pods_and_stops_on_sigterm() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kvrouter.cli", "emulate", "--count", "2", "--port", "0",
        "--time-scale", "100", "--engine", "sglang", "--num-gpu-blocks", "256",
        "--enable-scale-out", "--slow-pod", "1=2", "--kv-buffer-steps", "7",
        cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        lines = []
        while True:
            line = (await asyncio.wait_for(proc.stdout.readline(), 120)).decode()
            assert line, "emulate exited before it was ready"
            lines.append(line)
            if "ready" in line:
                break
        urls = [word for line in lines for word in line.split() if word.startswith("http://")]
        assert len(urls) == 2 and "engine=sglang" in lines[0]
        assert "slowdown" not in lines[0] and "slowdown=2x" in lines[1]
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
            for url in urls:
                async with s.get(url + "/get_server_info") as r:
                    info = await r.json()
                assert info["max_total_num_tokens"] == 256 * 16
            async with s.get(urls[0] + "/kv_event_sources") as r:
                assert "'buffer_steps': 7" in repr(await r.json())
            async with s.post(urls[0] + "/v1/completions/render",
                              json={"model": "tiny-llama", "prompt": "hi"}) as r:
                assert r.status == 200 and (await r.json())[0]["token_ids"]
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), 60) == 0


async def emulate_usage_error(*flags: str) -> bytes:
    """``kvrouter emulate FLAGS`` must exit 2 (argparse's usage error); its output."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kvrouter.cli", "emulate", *flags,
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 2, out
    return out


async def test_bad_flag_is_a_clear_error() -> None:
    assert b"--count must be >= 1" in await emulate_usage_error("--count", "0")
    assert b"--kv-buffer-steps: must be >= 1, got 0" in await emulate_usage_error(
        "--kv-buffer-steps", "0")


async def test_bad_slow_pod_is_a_clear_error() -> None:
    out = await emulate_usage_error("--count", "2", "--slow-pod", "2=4")
    assert b"--slow-pod '2=4': expected INDEX=FACTOR with 0 <= INDEX < 2" in out


async def test_client_disconnect_aborts_the_request() -> None:
    async with EmulatedCluster(count=1, time_scale=1.0) as cluster:
        engine = cluster.pods[0].engine
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
            body = {"model": "tiny-llama", "prompt": "a long answer please", "max_tokens": 5000,
                    "stream": True}  # fmt: skip
            async with s.post(cluster.urls[0] + "/v1/completions", json=body) as r:
                first = await r.content.readline()
                assert first.startswith(b"data: ")
                assert engine.num_running == 1
            # Leaving the block closed the connection mid-stream.
        for _ in range(600):
            if not engine.has_work:
                break
            await asyncio.sleep(0.05)
        assert not engine.has_work
        assert engine.cache.used_blocks == 0
        assert engine.generation_tokens_total < 5000
