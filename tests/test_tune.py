"""kvrouter tune: seeded trials, defaults first, the best by objective, a pasteable block."""

from __future__ import annotations

import math

import pytest
import yaml

from kvrouter.cli import main
from policies.registry import build_policy
from simulator.tune import best_trial, draw_trials, params_yaml


def test_trials_are_seeded_and_start_with_the_defaults() -> None:
    trials = draw_trials(5, seed=3)
    assert trials[0] == {} and len(trials) == 5
    assert trials == draw_trials(5, seed=3)
    assert trials != draw_trials(5, seed=4)
    assert all(t for t in trials[1:])


def test_best_trial_by_objective_and_ties_keep_the_defaults() -> None:
    results = [
        {"ttft_p99_s": 1.0, "hit_rate": 0.5},
        {"ttft_p99_s": 0.5, "hit_rate": 0.4},
        {"ttft_p99_s": math.nan, "hit_rate": 0.9},
        {"ttft_p99_s": 1.0, "hit_rate": 0.5},
    ]
    assert best_trial(results, "ttft_p99_s") == 1
    assert best_trial(results, "hit_rate") == 2
    assert best_trial([results[0], results[3]], "ttft_p99_s") == 0


def test_yaml_block_builds_the_policy() -> None:
    block = yaml.safe_load(params_yaml("kv_aware", draw_trials(2, seed=1)[1]))
    assert block["policy"]["name"] == "kv_aware"
    import random

    build_policy("kv_aware", block["policy"]["params"], random.Random(0))


def test_tune_cli_prints_a_config_block(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "tune",
            "--trace",
            "synthetic:multi_tenant,requests=80,rate=6,tenants=12",
            "--backends",
            "3",
            "--trials",
            "3",
            "--seed",
            "2",
            "--jobs",
            "1",
            "--quiet",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    block = yaml.safe_load(out)
    assert block["policy"]["name"] == "kv_aware" and block["policy"]["params"]
    assert "kv_aware (defaults)" in err and "best: trial" in err


def test_tune_cli_rejects_a_bad_objective(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["tune", "--trace", "synthetic:chat", "--objective", "speed", "--quiet"])
    assert code == 2
    assert "--objective" in capsys.readouterr().err
