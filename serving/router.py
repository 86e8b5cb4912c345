"""The routing decision: which A/B arm serves a request, and whether it is sampled.

`RouteTarget` is a route as the ingress sees it (its weighted `Arm`s, what keeps a user in one
arm, a label constraint); `ShadowPlan` is how its traffic is mirrored. Pure functions of their
arguments: no clock, environment, network or process state. Both hash
`salt` and `key` with BLAKE2b (never Python's `hash()`, which changes per process), so a key gets
the same answer in every replica, process and release: a user stays in their arm. The salt (the
route name, say) keeps decisions of different routes or purposes independent of each other.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

from serving.defaults import SamplingDefaults
from serving.engines.structured import ResponseFormat

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


@dataclass(frozen=True)
class Arm:
    variant: str
    version: str
    weight: float
    sampling: SamplingDefaults = SamplingDefaults()  # for requests that omit temperature/top_p


@dataclass(frozen=True)
class RouteTarget:
    route: str
    arms: tuple[Arm, ...]  # in config order: the order is part of the split
    sticky_key: str = "user"
    choice: ResponseFormat | None = None  # a label-constrained route: one label per answer

    def choose(self, key: str) -> Arm:
        """The arm for `key` (a session, user or request id): the same key, the same arm."""
        if len(self.arms) == 1:
            return self.arms[0]
        variant = choose_arm([(a.variant, a.weight) for a in self.arms], key, self.route)
        return next(a for a in self.arms if a.variant == variant)


@dataclass(frozen=True)
class ShadowPlan:
    target: str  # a variant name or "remote:<model>"
    rate: float
    sample_key: str  # "request" or "user"
    store_prompt: bool = True
    labels: tuple[str, ...] = ()  # the route's label set (classification routes)


def user_key(session: str | None, user: str | None) -> tuple[str, str] | None:
    """Who is asking, and how we know: the x-session-id header, else the `user` field."""
    if session:
        return session, "session"
    return (user, "user") if user else None


def sticky_key(user: tuple[str, str] | None, target: RouteTarget,
               request_id: str) -> tuple[str, str]:
    """What picks the arm, and which kind it is: the user key, or the request id."""
    if target.sticky_key == "user" and user is not None:
        return user
    return request_id, "request"
