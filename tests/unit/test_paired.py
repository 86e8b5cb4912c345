"""distill/paired: McNemar's exact test, the paired bootstrap, compare() decisions and verdict()."""

from __future__ import annotations

import math

import numpy as np
import pytest

from distill.paired import (
    compare,
    mcnemar,
    mcnemar_p_value,
    paired_bootstrap,
    paired_bootstrap_by_index,
    verdict,
)


def _outcomes(both: int, neither: int, challenger_only: int, champion_only: int):
    """Paired pass/fail lists with the given 2x2 counts."""
    shared = [True] * both + [False] * neither
    champion = shared + [False] * challenger_only + [True] * champion_only
    challenger = shared + [True] * challenger_only + [False] * champion_only
    return champion, challenger


def test_mcnemar_counts_and_exact_p_values():
    result = mcnemar(*_outcomes(both=5, neither=2, challenger_only=10, champion_only=0))
    assert result == {
        "n": 17, "both": 5, "neither": 2, "challenger_only": 10, "champion_only": 0,
        "p_value": pytest.approx(2 * 0.5**10),
    }
    assert mcnemar(*_outcomes(4, 4, 3, 3))["p_value"] == 1.0
    assert mcnemar(*_outcomes(4, 4, 0, 0))["p_value"] == 1.0  # no discordant pairs
    expected = 2 * sum(math.comb(15, i) for i in range(4)) / 2**15
    assert mcnemar(*_outcomes(1, 1, 12, 3))["p_value"] == pytest.approx(expected, rel=1e-12)
    assert mcnemar(*_outcomes(1, 1, 3, 12))["p_value"] == pytest.approx(expected, rel=1e-12)


def test_mcnemar_large_counts_stay_exact_and_finite():
    assert mcnemar_p_value(5000, 5000) == 1.0
    assert 0 < mcnemar_p_value(400, 600) < 1e-9
    assert mcnemar_p_value(0, 3000) == 0.0  # underflows cleanly, no OverflowError
    assert mcnemar([1, 0, 1], [1, 1, 1])["challenger_only"] == 1  # 0/1 accepted


def test_bootstrap_is_deterministic_per_seed():
    rng = np.random.default_rng(1)
    champion, challenger = rng.normal(size=50), rng.normal(size=50)
    first = paired_bootstrap(champion, challenger, seed=7)
    assert paired_bootstrap(champion, challenger, seed=7) == first
    assert paired_bootstrap(champion, challenger, seed=8)["low"] != first["low"]


def test_bootstrap_interval_for_a_clear_gain_and_for_identical_inputs():
    rng = np.random.default_rng(2)
    champion = rng.normal(size=200)
    challenger = champion + 1.0 + rng.normal(scale=0.3, size=200)
    result = paired_bootstrap(champion, challenger)
    assert result["difference"] == pytest.approx(np.mean(challenger) - np.mean(champion))
    assert result["low"] <= result["difference"] <= result["high"]
    assert result["low"] > 0.5
    same = paired_bootstrap(champion, champion)
    assert same["difference"] == 0 and same["low"] == 0 and same["high"] == 0
    booleans = paired_bootstrap([True, False, True, False], [True, True, True, False])
    assert booleans["champion"] == 0.5 and booleans["challenger"] == 0.75


def test_bootstrap_by_index_with_a_p95_latency():
    rng = np.random.default_rng(3)
    champion = rng.lognormal(mean=5, sigma=0.5, size=300)
    challenger = champion * 0.5  # twice as fast on every case

    def p95(values):
        return lambda indices: float(np.percentile(values[indices], 95))

    result = paired_bootstrap_by_index(300, p95(champion), p95(challenger), n_resamples=500)
    assert result["champion"] == pytest.approx(np.percentile(champion, 95))
    assert result["difference"] == pytest.approx(-0.5 * np.percentile(champion, 95))
    assert result["low"] <= result["difference"] <= result["high"] < 0


def test_bootstrap_by_index_drops_nan_resamples():
    nan = paired_bootstrap_by_index(5, lambda i: math.nan, lambda i: 1.0, n_resamples=50)
    assert nan["low"] is None and nan["high"] is None

    def nan_unless_case_0(indices):
        return 1.0 if 0 in indices else math.nan

    some = paired_bootstrap_by_index(3, lambda i: 0.0, nan_unless_case_0, n_resamples=200)
    assert some["low"] == some["high"] == 1.0


def test_a_clearly_better_challenger_passes_a_primary_binary_metric():
    row = compare("tasks.pass_rate", *_outcomes(50, 20, 30, 0), margin=0.03, primary=True)
    assert row["mcnemar"]["challenger_only"] == 30 and row["mcnemar"]["p_value"] < 1e-6
    assert row["gain"] == pytest.approx(0.3) and row["gain_low"] > 0
    assert row["decision"] == "better" and row["superior"] and row["passed"]


def test_identical_outcomes_are_not_worse_but_not_better():
    champion, _ = _outcomes(50, 50, 0, 0)
    primary = compare("tasks.pass_rate", champion, champion, margin=0.03, primary=True)
    assert primary["decision"] == "not worse" and primary["non_inferior"]
    assert not primary["superior"] and not primary["passed"]
    assert compare("tasks.pass_rate", champion, champion, margin=0.03)["passed"]


def test_a_clearly_worse_challenger_fails_non_inferiority():
    row = compare("tasks.pass_rate", *_outcomes(50, 20, 0, 30), margin=0.03)
    assert row["gain"] == pytest.approx(-0.3) and row["gain_high"] < 0
    assert row["decision"] == "worse" and not row["non_inferior"] and not row["passed"]


def test_binary_superiority_also_needs_mcnemar():
    champion, challenger = [False] * 4, [True] * 4  # every resample gains 1, but p = 0.125
    as_floats = compare("m", [0.0] * 4, [1.0] * 4, margin=0.0)
    assert as_floats["mcnemar"] is None and as_floats["superior"]
    as_booleans = compare("m", champion, challenger, margin=0.0)
    assert as_booleans["gain_low"] == 1.0 and as_booleans["mcnemar"]["p_value"] == 0.125
    assert not as_booleans["superior"] and as_booleans["decision"] == "not worse"
    assert compare("m", [0.0] * 4, [1.0] * 4, margin=0.0, binary=True)["mcnemar"] is not None


def test_lower_is_better_orients_the_gain():
    rng = np.random.default_rng(4)
    champion = rng.normal(100, 5, size=100)
    challenger = champion - 20 + rng.normal(0, 2, size=100)  # faster
    row = compare("latency.ms", champion, challenger, margin=5, higher_is_better=False)
    assert row["difference"] < 0 < row["gain"] == pytest.approx(-row["difference"])
    assert (row["gain_low"], row["gain_high"]) == (-row["high"], -row["low"])
    assert row["decision"] == "better"
    slower = compare("latency.ms", challenger, champion, margin=5, higher_is_better=False)
    assert slower["decision"] == "worse"


def test_margin_decides_a_small_drop():
    champion = np.linspace(0.2, 0.9, 100)
    challenger = champion - 0.01
    assert compare("fidelity", champion, challenger, margin=0.03)["decision"] == "not worse"
    assert compare("fidelity", champion, challenger, margin=0.005)["decision"] == "worse"


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="lengths differ"):
        compare("m", [1.0, 2.0], [1.0], margin=0.1)
    with pytest.raises(ValueError, match="empty"):
        paired_bootstrap([], [])
    with pytest.raises(ValueError, match="empty"):
        mcnemar([], [])
    with pytest.raises(ValueError, match="empty"):
        paired_bootstrap_by_index(0, np.mean, np.mean)
    with pytest.raises(ValueError, match="margin"):
        compare("m", [1.0], [1.0], margin=-0.01)
    with pytest.raises(ValueError, match="binary"):
        mcnemar([0.5, 1.0], [1.0, 1.0])


def _row(**overrides):
    row = {
        "metric": "tasks.pass_rate", "champion": 0.45, "challenger": 0.41, "gain": -0.04,
        "gain_low": -0.085, "gain_high": 0.005, "margin": 0.03, "primary": True,
        "non_inferior": False, "superior": False, "mcnemar": None,
    }
    return {**row, **overrides}


def test_verdict_reasons_read_like_sentences():
    passed, reasons = verdict([_row()])
    assert not passed
    assert reasons == [
        "tasks.pass_rate: challenger 0.410 vs champion 0.450, gain -0.040 [-0.085, 0.005] "
        "is below the margin -0.030"
    ]
    weak = _row(gain=0.02, gain_low=-0.01, gain_high=0.05, non_inferior=True,
                mcnemar={"p_value": 0.21})
    assert verdict([weak])[1] == [
        "tasks.pass_rate: gain +0.020 [-0.010, 0.050] is not a significant improvement "
        "(McNemar p=0.210)"
    ]


def test_verdict_over_compare_rows():
    better = compare("tasks.pass_rate", *_outcomes(50, 20, 30, 0), margin=0.03, primary=True)
    same = compare("fidelity", [0.5] * 10, [0.5] * 10, margin=0.01)
    assert verdict([better, same]) == (True, [])
    passed, reasons = verdict([same])
    assert not passed and len(reasons) == 1 and reasons[0].startswith("no primary metric")
    worse = compare("fidelity", [0.9] * 10, [0.5] * 10, margin=0.01)
    passed, reasons = verdict([better, worse])
    assert not passed and len(reasons) == 1 and reasons[0].startswith("fidelity: challenger 0.500")
