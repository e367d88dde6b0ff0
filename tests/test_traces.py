"""Trace loaders and synthetic workloads: formats, timestamp spreading, errors naming the line,
determinism, prefix structure, and constant memory on long synthetic streams."""

from __future__ import annotations

import gzip
import itertools
import json
import tracemalloc
from pathlib import Path

import pytest

from policies.kv.hashing import BlockHasher, Namespace
from simulator.sweep import open_trace
from simulator.traces import (
    SIM_MODEL,
    TraceError,
    chain_block_keys,
    load_azure_csv,
    load_jsonl,
    load_mooncake,
    open_trace_file,
    sniff_format,
)
from simulator.workloads import WORKLOADS, parse_synthetic, synthetic


def _mooncake_rows() -> list[dict[str, object]]:
    return [
        {"timestamp": 0, "input_length": 1000, "output_length": 5, "hash_ids": [0, 1]},
        {"timestamp": 0, "input_length": 1024, "output_length": 6, "hash_ids": [0, 2]},
        {"timestamp": 0, "input_length": 513, "output_length": 7, "hash_ids": [3, 4]},
        {"timestamp": 3000, "input_length": 512, "output_length": 8, "hash_ids": [0]},
        {"timestamp": 6000, "input_length": 100, "output_length": 9, "hash_ids": [5]},
        {"timestamp": 6000, "input_length": 100, "output_length": 9, "hash_ids": [6]},
    ]


def test_mooncake_spreads_equal_timestamps_over_the_step(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in _mooncake_rows())
    assert sniff_format(path) == "mooncake"
    reqs = list(open_trace_file(path))
    assert [r.arrival_s for r in reqs] == [0.0, 1.0, 2.0, 3.0, 6.0, 7.5]
    assert [r.output_tokens for r in reqs] == [5, 6, 7, 8, 9, 9]
    assert reqs[1].full_blocks == (0, 2)  # 1024 tokens = two full 512-token blocks
    assert reqs[0].full_blocks == (0,)  # 1000 tokens: the second block is partial
    assert reqs[2].full_blocks == (3,)
    assert all(r.block_size == 512 for r in reqs)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"timestamp": 0, "input_length": 1000, "output_length": 5, "hash_ids": [0]}, "1 hash_ids"),
        (
            {"timestamp": 0, "input_length": "x", "output_length": 5, "hash_ids": [0]},
            "input_length",
        ),
        ({"timestamp": 0, "output_length": 5, "hash_ids": [0]}, "missing field 'input_length'"),
    ],
    ids=["wrong-block-count", "wrong-type", "missing-field"],
)
def test_mooncake_errors_name_line_and_field(
    tmp_path: Path, row: dict[str, object], message: str
) -> None:
    path = tmp_path / "bad.jsonl"
    good = {"timestamp": 0, "input_length": 10, "output_length": 5, "hash_ids": [9]}
    path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(TraceError, match=rf"bad.jsonl:2: .*{message}"):
        list(load_mooncake(path))


def test_jsonl_formats_text_tokens_and_hashes(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    rows = [
        {"arrival_s": 0.0, "token_ids": list(range(40)), "output_tokens": 3, "session_id": "s1"},
        {"arrival_s": 0.5, "text": "hello world", "output_tokens": 2},
        {
            "arrival_s": 1.0,
            "hash_ids": [7, 8, 9],
            "input_tokens": 40,
            "block_size": 16,
            "output_tokens": 1,
        },
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert sniff_format(path) == "jsonl"
    reqs = list(load_jsonl(path, tokenize=lambda text: [ord(c) for c in text]))
    tokens, text, hashed = reqs
    # Full blocks carry the router's own hashes, so simulated and live indexes agree.
    router = BlockHasher(Namespace(model=SIM_MODEL), 16).hash_tokens(list(range(40)))
    assert tokens.full_blocks == router and len(tokens.hash_ids) == 3
    assert tokens.session_id == "s1" and tokens.input_tokens == 40
    assert text.input_tokens == 11 and text.text == "hello world"
    assert hashed.full_blocks == (7, 8) and hashed.request_id == "r2"


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"arrival_s": 0.0, "output_tokens": 1}, "exactly one of"),
        ({"arrival_s": 0.0, "output_tokens": 1, "text": "a", "token_ids": [1]}, "exactly one of"),
        ({"arrival_s": -1.0, "output_tokens": 1, "token_ids": [1]}, "arrival_s"),
        ({"output_tokens": 1, "token_ids": [1]}, "missing field 'arrival_s'"),
        ({"arrival_s": 0, "output_tokens": 1, "text": "a"}, "needs a tokenizer"),
    ],
    ids=["no-prompt", "two-prompts", "negative-time", "no-time", "no-tokenizer"],
)
def test_jsonl_errors(tmp_path: Path, row: dict[str, object], message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(TraceError, match=message):
        list(load_jsonl(path))


def test_jsonl_rejects_time_going_back(tmp_path: Path) -> None:
    path = tmp_path / "back.jsonl"
    rows = [
        {"arrival_s": 2.0, "token_ids": [1], "output_tokens": 1},
        {"arrival_s": 1.0, "token_ids": [1], "output_tokens": 1},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(TraceError, match=r"back\.jsonl:2: arrival_s"):
        list(load_jsonl(path))


def test_azure_csv_arrivals_and_unshared_prompts(tmp_path: Path) -> None:
    path = tmp_path / "azure.csv"
    path.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:15:46.6805900,374,44\n"
        "2023-11-16 18:15:50.9951690,33,109\n"
    )
    assert sniff_format(path) == "azure"
    a, b = list(load_azure_csv(path))
    assert a.arrival_s == 0.0 and b.arrival_s == pytest.approx(4.314579, abs=1e-6)
    assert (a.input_tokens, a.output_tokens, b.input_tokens) == (374, 44, 33)
    assert len(a.hash_ids) == 24 and not set(a.hash_ids) & set(b.hash_ids)


def test_chain_block_keys_share_exactly_the_common_prefix() -> None:
    a = chain_block_keys(list(range(50)), 16)
    b = chain_block_keys([*range(32), 99, *range(33, 50)], 16)
    assert len(a) == 4 and a[:2] == b[:2] and a[2] != b[2] and a[3] != b[3]


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_synthetic_workloads_are_deterministic_ordered_and_chained(name: str) -> None:
    _, params = parse_synthetic(f"synthetic:{name},requests=300")
    first = list(synthetic(name, params, 5))
    assert first == list(synthetic(name, params, 5))
    assert first != list(synthetic(name, params, 6))
    assert len(first) >= 290  # mixed rounds each part's share
    assert all(a.arrival_s <= b.arrival_s for a, b in itertools.pairwise(first))
    assert len({r.request_id for r in first}) == len(first)
    seen: dict[int, tuple[int, ...]] = {}
    for r in first:
        assert len(r.hash_ids) == -(-r.input_tokens // r.block_size)
        for i, key in enumerate(r.hash_ids):
            # Chained: a key always stands for the same whole prefix.
            prefix = r.hash_ids[: i + 1]
            assert seen.setdefault(key, prefix) == prefix
    heads = {r.full_blocks[0] for r in first[:50] if r.full_blocks}
    assert any(r.full_blocks and r.full_blocks[0] in heads for r in first[50:])  # shared prefixes


def test_synthetic_spec_errors_name_the_key() -> None:
    with pytest.raises(TraceError, match="unknown synthetic workload"):
        parse_synthetic("synthetic:nope")
    with pytest.raises(TraceError, match=r"trace\.tenantz: unknown"):
        parse_synthetic("synthetic:multi_tenant,tenantz=3")
    with pytest.raises(TraceError, match=r"trace\.rate: expected a number"):
        parse_synthetic("synthetic:multi_tenant,rate=fast")


def test_synthetic_stream_memory_is_bounded() -> None:
    def peak_for(requests: int) -> int:
        spec = f"synthetic:multi_tenant,requests={requests},rate=100,think_s=2"
        stream = open_trace(spec, seed=1)
        tracemalloc.start()
        for _ in stream:
            pass
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return peak

    small, large = peak_for(3_000), peak_for(15_000)
    # Five times the requests, about the same peak: only active sessions are held.
    assert large < 1.5 * small
