"""kvrouter replay end to end: the CLI against an in-process emulated pod, hash-only Mooncake
rows turned into token prompts, the model read from /v1/models, the shared report written."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from kvrouter.cli import main
from simulator.emulator.fleet import EmulatedCluster


def _mooncake(tmp_path: Path) -> Path:
    # Mooncake rows (512-token blocks), shortened to fit the pod: a shared first block.
    rows = [
        {"timestamp": 0, "input_length": 600, "output_length": 4, "hash_ids": [0, 1]},
        {"timestamp": 0, "input_length": 700, "output_length": 3, "hash_ids": [0, 2]},
        {"timestamp": 1000, "input_length": 530, "output_length": 5, "hash_ids": [0, 3]},
    ]
    path = tmp_path / "mooncake.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


async def test_replay_cli_against_an_emulated_pod(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "live"
    async with EmulatedCluster(count=1, kv_events_endpoint=None, max_model_len=4096) as cluster:
        argv = [
            "replay",
            "--trace",
            str(_mooncake(tmp_path)),
            "--target",
            cluster.urls[0],
            "--out",
            str(out),
            "--speedup",
            "4",
            "--quiet",
        ]
        code = await asyncio.to_thread(main, argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "replay" in captured.out and "report:" in captured.out
    (result,) = json.loads((out / "results.json").read_text())
    assert result["requests"] == 3 and result["failed"] == 0
    assert result["input_tokens"] == 600 + 700 + 530
    # Equal leading hash ids became equal leading tokens: later requests hit the first block.
    assert result["hit_tokens"] >= 2 * 512
    assert result["ttft_p99_s"] > 0 and (out / "report.html").is_file()


def test_replay_cli_unreachable_target(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "replay",
            "--trace",
            str(_mooncake(tmp_path)),
            "--target",
            "http://127.0.0.1:9",
            "--out",
            str(tmp_path / "o"),
            "--quiet",
        ]
    )
    assert code == 2
    assert capsys.readouterr().err.strip().startswith("kvrouter replay:")


def test_replay_cli_refuses_a_v1_target(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["replay", "--trace", str(_mooncake(tmp_path)), "--target",
            "http://127.0.0.1:9/v1", "--out", str(tmp_path / "o"), "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("kvrouter replay: --target 'http://127.0.0.1:9/v1' includes /v1: give the "
                   "server's root (http://127.0.0.1:9)")
