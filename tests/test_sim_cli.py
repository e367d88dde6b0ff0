"""kvrouter simulate end to end: results.json fields, SVG charts, the self-contained HTML,
sweeps, config files, clear errors, and reports without any plotting library installed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kvrouter.cli import main

TRACE = "synthetic:multi_tenant,requests=60,rate=6,tenants=8"


def test_simulate_writes_results_plots_and_html(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sim"
    config = tmp_path / "sim.yaml"
    config.write_text(
        "simulation:\n  num_gpu_blocks: 2000\n  scrape_interval_s: 0.5\n"
        "policy:\n  name: kv_aware\n  params:\n    temperature_s: 0.004\n"
    )
    code = main(
        [
            "simulate",
            "--trace",
            TRACE,
            "--backends",
            "2,3",
            "--policies",
            "round_robin,kv_aware",
            "--out",
            str(out),
            "--seed",
            "1",
            "--config",
            str(config),
            "--jobs",
            "2",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "simulate [" in captured.err  # the progress bar
    assert "round_robin" in captured.out and "report:" in captured.out
    results = json.loads((out / "results.json").read_text())
    assert [(r["policy"], r["backends"]) for r in results] == [
        ("round_robin", 2),
        ("kv_aware", 2),
        ("round_robin", 3),
        ("kv_aware", 3),
    ]
    for r in results:
        for key in ("hit_rate", "oracle_hit_rate", "ttft_p50_s", "ttft_p99_s", "imbalance"):
            assert isinstance(r[key], float), key
        assert r["requests"] == 60 and r["num_gpu_blocks"] == 2000
        assert 0.0 <= r["hit_rate"] <= 1.0 and r["imbalance"] >= 1.0
    assert results[1]["policy_params"] == {"temperature_s": 0.004}
    html = (out / "report.html").read_text()
    assert html.count("<svg ") == 4  # CDF, hit rate, load, capacity: inline, self-contained
    for name in ("ttft_cdf.svg", "hit_rate.svg", "load.svg", "capacity.svg"):
        assert (out / name).read_text().startswith("<svg xmlns='http://www.w3.org/2000/svg'")
    # The H1 is the trace's short name; headings are words; columns carry units.
    assert "<h1>kvrouter simulate: synthetic:multi_tenant</h1>" in html
    assert "ttft cdf" not in html and "TTFT p50<br><small>s</small>" in html
    assert "What the columns mean" in html
    assert "simulated in " in captured.err and " s wall time (" in captured.err
    assert "backends hold TTFT p99" in captured.out or "SLO not held" in captured.out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--policies", "nope"], "unknown policy 'nope'"),
        (["--backends", "0"], "--backends"),
        (["--trace", "/nonexistent.jsonl"], "no such file"),
        (["--trace", "synthetic:multi_tenant,bogus=1"], "trace.bogus"),
        (["--slow-backend", "99=4"], "--slow-backend '99=4': expected INDEX=FACTOR"),
        (["--slow-backend", "0=fast"], "--slow-backend '0=fast'"),
    ],
    ids=["policy", "backends", "file", "synthetic-key", "slow-index", "slow-factor"],
)
def test_simulate_errors_are_one_clear_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    base = {"--trace": TRACE, "--out": str(tmp_path / "x"), "--policies": "round_robin"}
    for flag, value in zip(args[::2], args[1::2], strict=True):
        base[flag] = value
    argv = ["simulate", "--quiet"] + [x for kv in base.items() for x in kv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.startswith("kvrouter simulate:") and "\n" not in err


def test_simulate_config_unknown_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("simulation:\n  engines: 4\n")
    code = main(
        [
            "simulate",
            "--trace",
            TRACE,
            "--out",
            str(tmp_path / "o"),
            "--config",
            str(config),
            "--quiet",
        ]
    )
    assert code == 2
    assert "simulation.engines: unknown key" in capsys.readouterr().err


def test_simulate_a_text_and_chat_trace(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    system = "You are a helpful assistant for the cache team. " * 20
    rows = []
    for i in range(12):
        if i % 2:
            rows.append(
                {"arrival_s": i * 0.5, "text": system + f"question {i}?", "output_tokens": 4}
            )
        else:
            messages = [{"role": "system", "content": system}, {"role": "user", "content": f"q{i}"}]
            rows.append(
                {
                    "arrival_s": i * 0.5,
                    "messages": messages,
                    "output_tokens": 4,
                    "session_id": f"s{i % 3}",
                }
            )
    trace = tmp_path / "text.jsonl"
    trace.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "o"
    code = main(
        [
            "simulate",
            "--trace",
            str(trace),
            "--backends",
            "2",
            "--out",
            str(out),
            "--quiet",
            "--policies",
            "sglang_cache_aware,kv_aware",
            "--jobs",
            "1",
        ]
    )
    assert code == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    # Tokenized with the tiny tokenizer and hashed with the router's scheme: the shared system
    # prompt is reused by both policies.
    for r in results:
        assert r["requests"] == 12 and r["block_size"] == 16
        assert r["hit_rate"] > 0.3


def test_same_seed_gives_a_byte_identical_results_json(tmp_path: Path) -> None:
    files = []
    for run in ("a", "b"):
        out = tmp_path / run
        argv = [
            "simulate",
            "--trace",
            TRACE,
            "--backends",
            "2",
            "--out",
            str(out),
            "--quiet",
            "--policies",
            "kv_aware,sglang_cache_aware",
            "--seed",
            "4",
            "--jobs",
            "1",
        ]
        assert main(argv) == 0
        files.append((out / "results.json").read_bytes())
    assert files[0] == files[1]
    assert b'"wall_s"' not in files[0]  # the one non-deterministic number lives in the report


def test_simulate_reports_without_matplotlib(tmp_path: Path) -> None:
    """A plain `pip install .` has no plotting library: the report must still be written (it
    once crashed at the very end with ModuleNotFoundError: matplotlib)."""
    out = tmp_path / "sim"
    # Mooncake's shape: hash ids, no session ids.
    trace = tmp_path / "mooncake_like.jsonl"
    trace.write_text("".join(
        json.dumps({"timestamp": 250 * i, "input_length": 512 * (1 + i % 3), "output_length": 4,
                    "hash_ids": [i % 4, 100 + i % 3, 200 + i][: 1 + i % 3]}) + "\n"
        for i in range(24)))
    code = (
        "import sys; sys.modules['matplotlib'] = None\n"  # any import of it now fails
        "from kvrouter.cli import main\n"
        f"raise SystemExit(main(['simulate', '--trace', {str(trace)!r}, '--backends', '2', "
        f"'--policies', 'round_robin,session_affinity', '--out', {str(out)!r}, '--quiet', "
        "'--jobs', '1']))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    html = (out / "report.html").read_text()
    assert html.count("<svg ") == 3  # CDF, hit rate, load
    # The trace carries no session ids: the report says what session_affinity then does.
    assert "carries no session ids" in html
    assert "<h1>kvrouter simulate: mooncake_like.jsonl</h1>" in html  # not the absolute path
