"""Live replay against in-process emulated pods: open loop, streaming, client-side TTFT/ITL,
engine-reported hits, the shared report format; and hash-only prompts built deterministically."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from simulator.emulator.fleet import EmulatedCluster
from simulator.replay import ReplayConfig, TokenBlocks, error_message, grouped_errors, replay
from simulator.report import write_report
from simulator.traces import TraceRequest, load_jsonl


def _trace(tmp_path: Path) -> Path:
    # Block size 16; requests 0, 2 and 3 share a 3-block prefix; request 1 shares nothing.
    rows = [
        {
            "arrival_s": 0.00,
            "hash_ids": [1, 2, 3, 4],
            "input_tokens": 60,
            "block_size": 16,
            "output_tokens": 6,
            "session_id": "a",
        },
        {
            "arrival_s": 0.05,
            "hash_ids": [9, 10],
            "input_tokens": 30,
            "block_size": 16,
            "output_tokens": 4,
        },
        {
            "arrival_s": 0.30,
            "hash_ids": [1, 2, 3, 5],
            "input_tokens": 64,
            "block_size": 16,
            "output_tokens": 5,
            "session_id": "a",
        },
        {
            "arrival_s": 0.60,
            "hash_ids": [1, 2, 3, 6, 7],
            "input_tokens": 70,
            "block_size": 16,
            "output_tokens": 3,
        },
    ]
    path = tmp_path / "live.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_token_blocks_share_exactly_the_shared_keys() -> None:
    blocks = TokenBlocks(vocab_size=2048, first_id=5, seed=0)
    a = blocks.tokens(TraceRequest("a", 0.0, 40, 1, (1, 2, 3), 16))
    b = blocks.tokens(TraceRequest("b", 0.0, 48, 1, (1, 2, 4), 16))
    assert len(a) == 40 and len(b) == 48
    assert a[:32] == b[:32] and a[32:40] != b[32:40]
    assert all(5 <= t < 2048 for t in a)
    assert TokenBlocks(2048, 5, seed=0).tokens(TraceRequest("c", 0.0, 40, 1, (1, 2, 3), 16)) == a


async def test_replay_against_emulated_pods(tmp_path: Path) -> None:
    async with EmulatedCluster(count=1, time_scale=1.0, kv_events_endpoint=None) as cluster:
        config = ReplayConfig(target=cluster.urls[0], model="tiny-llama", speedup=1.0, timeout_s=60)
        result = await replay(load_jsonl(_trace(tmp_path)), config, TokenBlocks(2048, 5, 0))
    assert result["requests"] == 4 and result["failed"] == 0 and result["arrived"] == 4
    assert result["input_tokens"] == 60 + 30 + 64 + 70
    # The pod's own cached_tokens: requests 2 and 3 reuse the 48-token shared prefix at least.
    assert result["hit_tokens"] >= 96
    assert 0 < result["hit_rate"] <= result["oracle_hit_rate"] + 1e-9
    assert result["oracle_hit_rate"] == pytest.approx(96 / 224)
    assert 0 < result["ttft_p50_s"] <= result["e2e_p50_s"]
    assert result["itl_p50_s"] > 0  # gaps between streamed tokens were measured
    assert result["wall_s"] >= 0.6  # open loop: the last request was sent at its arrival time
    html = write_report(tmp_path / "out", [result], "replay")
    stored = json.loads((tmp_path / "out" / "results.json").read_text())
    assert stored[0]["requests"] == 4 and html.read_text().count("<svg ") == 2
    assert stored[0]["prefill_gpu_s"] is None  # a client cannot see engine time: not 0.0


async def test_replay_counts_failures_without_stopping(tmp_path: Path) -> None:
    async with EmulatedCluster(count=1, time_scale=1.0, kv_events_endpoint=None) as cluster:
        config = ReplayConfig(target=cluster.urls[0], model="no-such-model", timeout_s=30)
        result = await replay(load_jsonl(_trace(tmp_path)), config, TokenBlocks(2048, 5, 0))
    assert result["requests"] == 0 and result["failed"] == 4
    assert sum(result["errors"].values()) == 4 and all(
        k.startswith("HTTP 4") for k in result["errors"]
    )


async def test_replay_groups_server_messages_and_oracle_counts_accepted_only(
    tmp_path: Path,
) -> None:
    """Prompts over the pod's context limit get vLLM's 400; the summary keeps the server's
    message, grouped, and the oracle sees only the prompts the pod accepted (before, it
    counted the refused ones too and could sit below the measured hit rate)."""
    rows = []
    for i in range(6):
        long = i % 2 == 1  # 29, 31, 33 blocks of 16 tokens: over max_model_len 256
        blocks = list(range(1000 * i, 1000 * i + 28 + i)) if long else [1, 2, 3, 4 + i]
        rows.append({"arrival_s": 0.05 * i, "hash_ids": blocks, "input_tokens": 16 * len(blocks),
                     "block_size": 16, "output_tokens": 2})
    trace = tmp_path / "mixed.jsonl"
    trace.write_text("".join(json.dumps(r) + "\n" for r in rows))
    async with EmulatedCluster(count=1, time_scale=1.0, kv_events_endpoint=None,
                               max_model_len=256, block_size=16) as cluster:
        config = ReplayConfig(target=cluster.urls[0], model="tiny-llama", timeout_s=30)
        result = await replay(load_jsonl(trace), config, TokenBlocks(2048, 5, 0))
    assert result["requests"] == 3 and result["failed"] == 3
    ((reason, count),) = result["errors"].items()
    assert count == 3 and reason.startswith("HTTP 400: ")
    # One group although each refused prompt had its own length.
    assert reason == "HTTP 400: This model's maximum context length is 256 tokens."
    assert grouped_errors(result["errors"]) == [reason.replace("HTTP 400: ", "HTTP 400 x3: ")]
    # Accepted: three 64-token prompts sharing blocks 1-3: 48 + 48 cached of 192.
    assert result["oracle_hit_rate"] == pytest.approx(96 / 192)
    assert result["hit_rate"] <= result["oracle_hit_rate"] + 1e-9


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('{"error": {"message": "bad  thing\\n here", "type": "x"}}', "bad thing here"),
        ('{"error": {"message": "This model\'s maximum context length is 256 tokens. However, '
         'you requested 480 tokens (478 in the messages, 2 in the completion)."}}',
         "This model's maximum context length is 256 tokens."),
        ('{"detail": "Not Found"}', "Not Found"),
        ("upstream connect error", "upstream connect error"),
        ("", "(empty body)"),
    ],
    ids=["openai", "first-sentence", "fastapi", "text", "empty"],
)
def test_error_message_is_one_line(body: str, message: str) -> None:
    assert error_message(body) == message
