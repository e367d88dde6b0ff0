"""What `kvrouter serve` says at start, as a real process in front of emulated pods: the
default policy, approximate mode said once, tokenizers that match no served model, why a
backend is unhealthy, and one-line errors for a /v1 URL or a tokenizer that cannot load."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from fake_backend import wait_until_ok
from ports import free_port

from simulator.emulator.fleet import EmulatedCluster
from simulator.tiny_tokenizer import default_path

MODEL = "tiny-llama"


async def _serve_log(args: list[str], settle_s: float = 1.5) -> str:
    """Start `kvrouter serve ARGS`, wait for /health, let the first checks run, stop it, and
    return everything it logged."""
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kvrouter.cli", "serve", "--port", str(port), "--loop", "asyncio",
        "--log-level", "info", *args, env={**os.environ, "HF_HUB_OFFLINE": "1"},
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        async with aiohttp.ClientSession() as session:
            await wait_until_ok(session, f"http://127.0.0.1:{port}/health", proc)
        await asyncio.sleep(settle_s)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        _out, err = await asyncio.wait_for(proc.communicate(), 30)
    return err.decode()


async def test_no_config_runs_kv_aware_and_says_approximate_once() -> None:
    async with EmulatedCluster(count=1, model=MODEL, time_scale=10.0) as cluster:
        log = await _serve_log(["--backend", cluster.urls[0]])
    assert "with policy kv_aware" in log, log
    assert log.count("approximate mode") == 1, log


async def test_tokenizer_for_a_model_nobody_serves_is_named() -> None:
    async with EmulatedCluster(count=1, model=MODEL, time_scale=10.0) as cluster:
        log = await _serve_log(["--backend", cluster.urls[0],
                                "--model-tokenizer", f"llama-8b={default_path()}"])
    assert ("tokenizer for model 'llama-8b' (--model-tokenizer / models.llama-8b.tokenizer) "
            f"matches no served model; the backends serve: {MODEL}") in log, log
    # ...and the model that is served has none: approximate mode, said once.
    assert log.count(f"model '{MODEL}' has no tokenizer") == 1, log


async def test_unhealthy_warnings_say_why() -> None:
    refused = free_port()  # nothing listens there
    async with EmulatedCluster(count=1, model=MODEL, time_scale=10.0) as cluster:
        # A path prefix the pod does not serve: its health check gets 404.
        log = await _serve_log(["--backend", f"http://127.0.0.1:{refused}",
                                "--backend", f"{cluster.urls[0]}/engine"])
    assert (f"backend http://127.0.0.1:{refused} is unhealthy: connection refused at "
            f"127.0.0.1:{refused}") in log, log
    assert f"backend {cluster.urls[0]}/engine is unhealthy: GET {cluster.urls[0]}/engine/health " \
           "answered 404: wrong path?" in log, log


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--backend", "http://10.0.0.1:8001/v1"],
         "--backend: 'http://10.0.0.1:8001/v1' includes /v1: give the server's root "
         "(e.g. http://10.0.0.1:8001), the router adds /v1/... itself"),
        (["--backend", "http://10.0.0.1:8001", "--model-tokenizer", "m={empty}"],
         "--model-tokenizer m: no tokenizer in '{empty}': expected one of tokenizer.json"),
        (["--backend", "http://10.0.0.1:8001", "--model-tokenizer", "m={broken}"],
         "--model-tokenizer m: cannot load tokenizer '{broken}': "),
    ],
    ids=["v1-url", "empty-tokenizer-dir", "broken-tokenizer"],
)
def test_start_up_errors_are_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    import subprocess

    empty, broken = tmp_path / "empty", tmp_path / "broken"
    empty.mkdir()
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{not json")
    (broken / "tokenizer_config.json").write_text("{}")
    fill = {"empty": str(empty), "broken": str(broken)}
    args = [a.format(**fill) for a in args]
    proc = subprocess.run([sys.executable, "-m", "kvrouter.cli", "serve", *args],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert "\n" not in err and len(err) < 300, err
    assert err.startswith("kvrouter serve: config error: " + message.format(**fill)), err


def test_the_start_up_heap_is_frozen_out_of_full_collections() -> None:
    # In a fresh interpreter with the router and a tokenizer loaded, as `serve` has them
    # before it listens: freezing leaves the collector almost nothing to scan.
    code = (
        "import gc, router.app\n"
        "from router.cli import freeze_startup_heap\n"
        "from router.prompt.tokenize import ModelTokenizer, load_tokenizer\n"
        "from simulator.tiny_tokenizer import default_path\n"
        "tok = ModelTokenizer(load_tokenizer(default_path()))\n"
        "before = len(gc.get_objects())\n"
        "frozen = freeze_startup_heap()\n"
        "print(before, frozen, len(gc.get_objects()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120, env={**os.environ, "TRANSFORMERS_OFFLINE": "1"})
    before, frozen, after = (int(x) for x in out.stdout.split())
    assert before > 10_000 and frozen >= before // 2
    assert after < before // 20
