"""The routing decision: which A/B arm serves a request, and whether it is sampled.

Pure functions of their arguments: no clock, environment, network or process state. Both hash
`salt` and `key` with BLAKE2b (never Python's `hash()`, which changes per process), so a key gets
the same answer in every replica, process and release: a user stays in their arm. The salt (the
route name, say) keeps decisions of different routes or purposes independent of each other.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

_SCALE = 2.0**-53


def unit_hash(key: str, salt: str) -> float:
    """A stable, uniformly spread number in [0, 1) for `key` under `salt`."""
    s, k = salt.encode("utf-8", "surrogatepass"), key.encode("utf-8", "surrogatepass")
    digest = hashlib.blake2b(len(s).to_bytes(4, "big") + s + k, digest_size=8).digest()
    return (int.from_bytes(digest, "big") >> 11) * _SCALE  # 53 bits: exact in a float, below 1


def choose_arm(arms: Sequence[tuple[str, float]], key: str, salt: str) -> str:
    """The arm `key` belongs to: each arm's share of keys is its weight over the total.

    Arms with weight 0 are never chosen. Arms own consecutive slices of [0, 1) in the given
    order, so a weight change moves only the keys between old and new slice boundaries (raising
    the last arm's weight only moves keys into it); reordering arms reshuffles them.
    """
    total = 0.0
    for name, weight in arms:
        if not (weight >= 0 and math.isfinite(weight)):
            raise ValueError(f"arm {name!r}: weight {weight!r} (must be finite and >= 0)")
        total += weight
    if total <= 0:
        raise ValueError("no arm has a weight above 0")
    if len(arms) == 1:
        return arms[0][0]
    point = unit_hash(key, salt) * total
    last = ""
    for name, weight in arms:
        if weight > 0:
            last = name
            point -= weight
            if point < 0:
                return name
    return last  # rounding left `point` at the very top: the last arm with weight


def sample(rate: float, key: str, salt: str) -> bool:
    """Whether `key` is in the sampled share `rate` (0: never, 1: always)."""
    if not 0 <= rate <= 1:
        raise ValueError(f"rate {rate!r} (must be between 0 and 1)")
    return unit_hash(key, salt) < rate
