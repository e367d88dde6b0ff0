"""kvrouter tune: seeded trials, defaults first, the best by objective, a pasteable block."""

from __future__ import annotations

import math

import pytest
import yaml

from kvrouter.cli import main
from policies.registry import build_policy
from simulator.tune import best_trial, draw_trials, params_yaml, verdict


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


@pytest.mark.parametrize(
    ("base", "best", "base2", "best2", "improved"),
    [
        (1.0, 0.9997, 1.0, 1.004, False),  # 0.03% then worse: noise
        (1.0, 0.9, 1.1, 0.99, True),  # 10% on both seeds
        (1.0, 0.9, 1.0, 0.99, False),  # 10% then 1%: the gain moves more than it is
        (1.0, 0.995, 1.0, 0.995, False),  # steady but below --min-gain
    ],
    ids=["noise", "real", "unsteady", "too-small"],
)
def test_verdict_needs_a_gain_beyond_seed_noise(
    base: float, best: float, base2: float, best2: float, improved: bool
) -> None:
    def r(v: float) -> dict[str, float]:
        return {"ttft_p99_s": v}

    judged = verdict("ttft_p99_s", r(base), r(best), r(base2), r(best2), 0.01)
    assert judged.improved is improved
    text = judged.describe("ttft_p99_s")
    assert text.startswith("improvement" if improved else "no improvement over defaults")


def test_tune_cli_keeps_the_defaults_when_the_best_is_noise(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # An unreachable --min-gain makes any winner noise: the block printed is the defaults'.
    code = main(["tune", "--trace", "synthetic:multi_tenant,requests=60,rate=6,tenants=8",
                 "--backends", "3", "--trials", "3", "--seed", "2", "--jobs", "1", "--quiet",
                 "--min-gain", "10"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "no improvement over defaults" in err
    assert yaml.safe_load(out) == yaml.safe_load(params_yaml("kv_aware", {}))


def test_every_searched_weight_is_a_kv_aware_param_and_every_draw_builds() -> None:
    # A renamed parameter would otherwise drop out of the search silently (the search skips
    # names the policy does not have, for older/newer params).
    import dataclasses
    import random

    from policies.kv_aware import KvAwareParams
    from simulator.tune import SEARCH_SPACE

    fields = {f.name for f in dataclasses.fields(KvAwareParams)}
    assert set(SEARCH_SPACE) <= fields
    for trial in draw_trials(20, seed=7)[1:]:
        assert set(trial) == set(SEARCH_SPACE)
        build_policy("kv_aware", trial, random.Random(0))
