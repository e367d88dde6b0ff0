"""`kvrouter serve --policy kv_aware --backend ... --model-tokenizer NAME=DIR` end to end, as a
real process in front of emulated pods: KV events flow in and hits are predicted."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time

import aiohttp
from ports import free_port

from simulator.emulator.fleet import EmulatedCluster
from simulator.tiny_tokenizer import default_path

MODEL = "tiny-llama"


async def _metric_lines(session, url, prefix):
    async with session.get(f"{url}/metrics") as r:
        text = await r.text()
    return [line for line in text.splitlines() if line.startswith(prefix)]


async def test_serve_with_model_tokenizer_predicts_hits():
    async with EmulatedCluster(count=2, model=MODEL, block_size=16, time_scale=20.0,
                               tokenizer=default_path()) as cluster:
        port = free_port()
        cmd = [sys.executable, "-m", "kvrouter.cli", "serve", "--policy", "kv_aware",
               "--port", str(port), "--loop", "asyncio", "--log-level", "warning",
               "--model-tokenizer", f"{MODEL}={default_path()}"]
        for url in cluster.urls:
            cmd += ["--backend", url]
        proc = await asyncio.create_subprocess_exec(
            *cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"},
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        router = f"http://127.0.0.1:{port}"
        try:
            async with aiohttp.ClientSession() as session:
                deadline = time.monotonic() + 60
                while True:  # up, and both pods' event sources replayed
                    assert proc.returncode is None, await proc.stderr.read()
                    assert time.monotonic() < deadline, "router never came up with KV events"
                    try:
                        ok = await _metric_lines(session, router,
                                                 "kvrouter_kv_event_replays_total")
                        if sum('outcome="ok"' in line for line in ok) >= 2:
                            break
                    except aiohttp.ClientError:
                        pass
                    await asyncio.sleep(0.2)
                body = {"model": MODEL, "max_tokens": 2, "messages": [
                    {"role": "system", "content": "shared instructions " * 80},
                    {"role": "user", "content": "first question"}]}
                url = f"{router}/v1/chat/completions"
                async with session.post(url, json=body) as r:
                    assert r.status == 200
                    first = r.headers["x-kvrouter-backend"]
                body["messages"][1]["content"] = "second question"
                deadline = time.monotonic() + 30
                while True:  # the first request's blocks reach the index through events
                    async with session.post(url, json=body) as r:
                        assert r.status == 200
                        hits = int(r.headers["x-kvrouter-predicted-hit-tokens"])
                        backend = r.headers["x-kvrouter-backend"]
                    if hits > 0:
                        break
                    assert time.monotonic() < deadline, "no hit was ever predicted"
                    await asyncio.sleep(0.1)
                assert backend == first and hits >= 16 * 10
                # /debug/route explains the same decision without sending the request.
                async with session.post(f"{router}/debug/route", json=body) as r:
                    assert r.status == 200
                    explained = await r.json()
                assert explained["request"]["tokens_exact"] is True
                assert explained["request"]["block_hashes_count"] >= 10
                assert explained["decision"]["backend_id"] == first
                # (at least the hits predicted before: that request's own blocks are now cached)
                assert explained["decision"]["predicted_hit_tokens"] >= hits
                stored = await _metric_lines(session, router, "kvrouter_kv_events_total")
                assert any('type="BlockStored"' in line for line in stored)
                assert await _metric_lines(session, router, "kvrouter_index_entries")
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 20)
            except TimeoutError:
                proc.kill()
                await proc.wait()


def test_serve_config_errors_are_one_line(capsys, tmp_path):
    from kvrouter.cli import main

    cases = [
        (["--model-tokenizer", f"m={tmp_path / 'missing'}"], "--model-tokenizer m"),
        (["--model-tokenizer", "no-equals-sign"], "--model-tokenizer"),
    ]
    config = tmp_path / "c.yaml"
    config.write_text("kv_events:\n  sources:\n    - {backend: 5}\n")
    cases.append((["--config", str(config), "--policy", "kv_aware"], "kv_events.sources[0]"))
    config2 = tmp_path / "c2.yaml"
    config2.write_text("kv_events:\n  replay_timeout: 3\n")
    cases.append((["--config", str(config2)], "kv_events.replay_timeout"))
    for flags, path in cases:
        assert main(["serve", "--backend", "http://127.0.0.1:9", *flags]) == 2
        # (transformers may print its own notice first; the router's error is one line)
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("kvrouter serve: config error: ") and path in err, err
