"""``kvrouter serve --workers 2``: two real router processes on one port (SO_REUSEPORT),
synced over ipc://, in front of real HTTP backends. They route as one router; ``/metrics``
answers for both, each sample labelled with its worker; SIGTERM stops them all."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Awaitable, Callable

import aiohttp
from fake_backend import FakeBackend
from ports import free_port
from prometheus_client.parser import text_string_to_metric_families

from router.workers import merge_metrics


def samples(text: str, name: str) -> dict[str, float]:
    """worker label -> value of the unlabelled-otherwise sample ``name``."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                out[sample.labels.get("worker", "")] = sample.value
    return out


async def arrived(backends: list[FakeBackend], n: int, timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while sum(len(b.received) for b in backends) < n:
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"request {n} never reached a backend")
        await asyncio.sleep(0.01)


async def test_two_workers_share_the_port_and_route_as_one(
    start_backend: Callable[..., Awaitable[FakeBackend]],
) -> None:
    backends = [await start_backend(delay_s=4.0) for _ in range(2)]
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kvrouter.cli", "serve", "--workers", "2", "--port", str(port),
        "--policy", "least_loaded", "--log-level", "warning",
        *[a for b in backends for a in ("--backend", b.url)],
        env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    # A new connection per request, so the kernel spreads them over the two processes.
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as http:
        try:
            deadline = asyncio.get_running_loop().time() + 60
            while True:
                try:
                    async with http.get(f"{url}/metrics") as resp:
                        text = await resp.text()
                    if samples(text, "kvrouter_sync_peers") == {"0": 1.0, "1": 1.0}:
                        break
                except aiohttp.ClientError:
                    pass
                assert asyncio.get_running_loop().time() < deadline, "workers never synced"
                await asyncio.sleep(0.2)

            async def complete() -> int:
                async with http.post(f"{url}/v1/completions",
                                     json={"model": "tiny", "prompt": "x", "max_tokens": 1}) as r:
                    await r.read()
                    return r.status

            # One at a time, each on its own connection, all held open by the slow backends:
            # whichever worker takes a request sees the other's in flight, so least_loaded
            # alternates exactly. Two blind workers would each balance only their own share.
            held, counts = [], []
            for n in range(1, 13):
                held.append(asyncio.create_task(complete()))
                await arrived(backends, n)
                await asyncio.sleep(0.05)  # the dispatch reaches the sibling (ipc: well under)
                counts.append(tuple(len(b.received) for b in backends))
            # Even after every second request (ties in between are broken at random).
            assert [c for c in counts[1::2]] == [(k, k) for k in range(1, 7)], counts
            async with http.get(f"{url}/metrics") as resp:
                text = await resp.text()
            routed = samples(text, "kvrouter_sync_messages_total")
            assert set(routed) == {"0", "1"}
            assert await asyncio.gather(*held) == [200] * 12
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 30) == 0
    assert proc.stderr is not None
    errors = (await proc.stderr.read()).decode()
    assert "Traceback" not in errors, errors


def test_merged_metrics_label_each_worker() -> None:
    a = "# HELP x_total things\n# TYPE x_total counter\nx_total{b=\"1\"} 2.0\n"
    b = "# HELP x_total things\n# TYPE x_total counter\nx_total{b=\"1\"} 3.0\n"
    merged = merge_metrics([("0", a), ("1", b)]).decode()
    assert 'x_total{b="1",worker="0"} 2.0' in merged
    assert 'x_total{b="1",worker="1"} 3.0' in merged
    assert merged.count("# TYPE x_total counter") == 1
