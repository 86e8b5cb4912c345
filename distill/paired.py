"""Paired statistics for a champion-vs-challenger gate: is the challenger better, or no worse?

    row = compare("tasks.pass_rate", champion_passed, challenger_passed, margin=0.03, primary=True)
    row["decision"]                   # "better" | "not worse" | "worse"
    passed, reasons = verdict([row, ...])

Owns the numbers only: McNemar's exact test on paired pass/fail outcomes (`mcnemar`), a paired
bootstrap interval of a difference (`paired_bootstrap`, `paired_bootstrap_by_index`), the
non-inferiority / superiority decision for one metric (`compare`, `compare_by_index`) and the overall verdict with
readable reasons (`verdict`). Both sides are measured on the same cases, in the same order; no
I/O, no models, no clock. Results are JSON-ready dicts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

IndexStatistic = Callable[[np.ndarray], float]


# --- McNemar --------------------------------------------------------------------------------------


def _as_outcomes(values: Sequence[bool], side: str) -> np.ndarray:
    """Pass/fail outcomes as a bool array; only booleans or 0/1 are accepted."""
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{side}: expected a flat sequence of outcomes, got shape {array.shape}")
    if array.dtype != bool and not np.isin(array, (0, 1)).all():
        raise ValueError(f"{side}: binary outcomes must be booleans or 0/1")
    return array.astype(bool)


def _check_paired(champion: np.ndarray, challenger: np.ndarray) -> None:
    if len(champion) != len(challenger):
        raise ValueError(
            f"champion and challenger must be paired: lengths differ "
            f"({len(champion)} vs {len(challenger)})"
        )
    if len(champion) == 0:
        raise ValueError("empty input: no paired cases to compare")


def binomial_lower_tail_count(k: int, n: int) -> int:
    """sum(comb(n, i) for i <= k), exactly, in O(k) integer steps."""
    total, term = 0, 1
    for i in range(k + 1):
        total += term
        term = term * (n - i) // (i + 1)
    return total


def mcnemar_p_value(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value for b and c discordant pairs: min(1, 2·P[X ≤ min(b, c)])."""
    discordant = b + c
    if discordant == 0:
        return 1.0
    tail = binomial_lower_tail_count(min(b, c), discordant)
    return min(1.0, tail / 2 ** (discordant - 1))  # 2 * tail / 2**n, exact big-int division


def mcnemar(champion: Sequence[bool], challenger: Sequence[bool]) -> dict:
    """Paired pass/fail outcomes on the same cases: the 2x2 counts and McNemar's exact p-value."""
    champ = _as_outcomes(champion, "champion")
    chall = _as_outcomes(challenger, "challenger")
    _check_paired(champ, chall)
    challenger_only = int(np.sum(chall & ~champ))
    champion_only = int(np.sum(champ & ~chall))
    return {
        "n": len(champ),
        "both": int(np.sum(champ & chall)),
        "neither": int(np.sum(~champ & ~chall)),
        "challenger_only": challenger_only,
        "champion_only": champion_only,
        "p_value": mcnemar_p_value(champion_only, challenger_only),
    }


# --- paired bootstrap -----------------------------------------------------------------------------


def _check_bootstrap_args(n: int, confidence: float, n_resamples: int) -> None:
    if n < 1:
        raise ValueError(f"empty input: n must be >= 1, got {n}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")


def paired_bootstrap_by_index(
    n: int,
    champion_stat: IndexStatistic,
    challenger_stat: IndexStatistic,
    *,
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> dict:
    """Percentile interval of challenger_stat - champion_stat over resampled case indices.

    Each resample draws n case indices with replacement and hands the same index array to both
    statistics, so the pairing is kept (useful for statistics that are not per-case means: ECE
    over tokens grouped by case, a p95 latency). Resamples whose difference is NaN are dropped;
    if every one is, `low` and `high` are None.
    """
    _check_bootstrap_args(n, confidence, n_resamples)
    everything = np.arange(n)
    champion_value = float(champion_stat(everything))
    challenger_value = float(challenger_stat(everything))
    rng = np.random.default_rng(seed)
    differences = np.empty(n_resamples)
    for r in range(n_resamples):
        indices = rng.integers(0, n, size=n)
        differences[r] = float(challenger_stat(indices)) - float(champion_stat(indices))
    differences = differences[~np.isnan(differences)]
    low = high = None
    if differences.size:
        tail = (1 - confidence) / 2
        low, high = (float(q) for q in np.quantile(differences, [tail, 1 - tail]))
    return {
        "champion": champion_value,
        "challenger": challenger_value,
        "difference": challenger_value - champion_value,
        "low": low,
        "high": high,
    }


def _as_values(values: Sequence[float], side: str) -> np.ndarray:
    array = np.asarray(values, dtype=float)  # booleans become 0/1
    if array.ndim != 1:
        raise ValueError(f"{side}: expected a flat sequence of values, got shape {array.shape}")
    return array


def paired_bootstrap(
    champion: Sequence[float],
    challenger: Sequence[float],
    statistic: Callable[[np.ndarray], float] = np.mean,
    *,
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> dict:
    """`statistic` of each side and a paired bootstrap interval of their difference."""
    champ = _as_values(champion, "champion")
    chall = _as_values(challenger, "challenger")
    _check_paired(champ, chall)
    return paired_bootstrap_by_index(
        len(champ),
        lambda indices: statistic(champ[indices]),
        lambda indices: statistic(chall[indices]),
        confidence=confidence,
        n_resamples=n_resamples,
        seed=seed,
    )


# --- the decision ---------------------------------------------------------------------------------


def _is_binary(values: Sequence) -> bool:
    return all(isinstance(value, bool | np.bool_) for value in values)


def _oriented(
    low: float | None, high: float | None, higher_is_better: bool
) -> tuple[float | None, float | None]:
    """The interval of the gain (better is positive) from the interval of the difference."""
    if low is None or high is None:
        return None, None
    return (low, high) if higher_is_better else (-high, -low)


def compare(
    name: str,
    champion: Sequence[float] | Sequence[bool],
    challenger: Sequence[float] | Sequence[bool],
    *,
    margin: float,
    higher_is_better: bool = True,
    primary: bool = False,
    binary: bool | None = None,
    confidence: float = 0.95,
    statistic: Callable[[np.ndarray], float] | None = None,
    n_resamples: int = 2000,
    seed: int = 0,
) -> dict:
    """The decision for one metric: "better", "not worse" (within `margin`) or "worse".

    non_inferior: the interval's worst end of the gain is >= -margin. superior: that end is > 0
    and, for binary outcomes, McNemar's p < 1 - confidence. A primary metric must be superior.
    """
    _check_margin(name, margin)
    if binary is None:
        binary = _is_binary(champion) and _is_binary(challenger)
    boot = paired_bootstrap(
        champion,
        challenger,
        np.mean if statistic is None else statistic,
        confidence=confidence,
        n_resamples=n_resamples,
        seed=seed,
    )
    paired_outcomes = mcnemar(champion, challenger) if binary else None
    return _decide(name, len(champion), boot, paired_outcomes, margin=margin,
                   higher_is_better=higher_is_better, primary=primary, confidence=confidence)


def compare_by_index(
    name: str,
    n: int,
    champion_stat: IndexStatistic,
    challenger_stat: IndexStatistic,
    *,
    margin: float,
    higher_is_better: bool = True,
    primary: bool = False,
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> dict:
    """`compare` for a statistic that is not a mean of per-case values (an ECE over the tokens
    of the chosen cases, a p95 latency): each side's statistic receives the case indices."""
    _check_margin(name, margin)
    boot = paired_bootstrap_by_index(n, champion_stat, challenger_stat, confidence=confidence,
                                     n_resamples=n_resamples, seed=seed)
    return _decide(name, n, boot, None, margin=margin, higher_is_better=higher_is_better,
                   primary=primary, confidence=confidence)


def _check_margin(name: str, margin: float) -> None:
    if not (margin >= 0 and math.isfinite(margin)):
        raise ValueError(f"{name}: margin must be a finite number >= 0, got {margin}")


def _decide(name: str, n: int, boot: dict, paired_outcomes: dict | None, *, margin: float,
            higher_is_better: bool, primary: bool, confidence: float) -> dict:
    difference = boot["difference"]
    gain = difference if higher_is_better else -difference
    gain_low, gain_high = _oriented(boot["low"], boot["high"], higher_is_better)
    non_inferior = gain_low is not None and gain_low >= -margin
    superior = gain_low is not None and gain_low > 0
    if paired_outcomes is not None:
        superior = superior and paired_outcomes["p_value"] < 1 - confidence
    decision = "better" if superior else "not worse" if non_inferior else "worse"
    return {
        "metric": name,
        "n": n,
        "champion": boot["champion"],
        "challenger": boot["challenger"],
        "difference": difference,
        "low": boot["low"],
        "high": boot["high"],
        "gain": gain,
        "gain_low": gain_low,
        "gain_high": gain_high,
        "margin": float(margin),
        "higher_is_better": higher_is_better,
        "primary": primary,
        "non_inferior": non_inferior,
        "superior": superior,
        "mcnemar": paired_outcomes,
        "decision": decision,
        "passed": non_inferior and (superior if primary else True),
    }


# --- the verdict ----------------------------------------------------------------------------------


def _gain_text(row: dict) -> str:
    if row["gain_low"] is None:
        return f"gain {row['gain']:+.3f} [no interval: undefined in every resample]"
    return f"gain {row['gain']:+.3f} [{row['gain_low']:.3f}, {row['gain_high']:.3f}]"


def _inferiority_reason(row: dict) -> str:
    worst_allowed = -row["margin"] if row["margin"] else 0.0
    return (
        f"{row['metric']}: challenger {row['challenger']:.3f} vs champion {row['champion']:.3f}, "
        f"{_gain_text(row)} is below the margin {worst_allowed:.3f}"
    )


def _not_superior_reason(row: dict) -> str:
    if row["mcnemar"] is not None:
        why = f"McNemar p={row['mcnemar']['p_value']:.3f}"
    else:
        why = "the interval reaches 0"
    return f"{row['metric']}: {_gain_text(row)} is not a significant improvement ({why})"


def verdict(rows: Sequence[dict]) -> tuple[bool, list[str]]:
    """(passed, reasons) over `compare` rows: all non-inferior, every primary one superior."""
    reasons = []
    for row in rows:
        if not row["non_inferior"]:
            reasons.append(_inferiority_reason(row))
        elif row["primary"] and not row["superior"]:
            reasons.append(_not_superior_reason(row))
    if not any(row["primary"] for row in rows):
        reasons.append("no primary metric: the challenger must be shown better on at least one")
    return not reasons, reasons
