"""Real gateways for integration tests (`ops.gateway.Gateway`: `protege serve` in a subprocess
on 127.0.0.1), the shared fake-engine gateway, and reading its metrics."""

from __future__ import annotations

import pytest

from ops.gateway import Gateway, wait_until
from tests import REPO_ROOT

REPO = REPO_ROOT
API_KEY = "test-key-1"


FAKE_CONFIG = {
    "server": {
        "max_body_bytes": 64 * 1024,
        "request_timeout_s": 4,
        "drain_timeout_s": 20,
        "ingress": {"replicas": 2, "num_cpus": 0},
    },
    "logging": {"level": "info"},
    "variants": {
        "fake": {"engine": {"engine": "fake", "completion_tokens": 12, "context_window": 256},
                 "version": "f1", "num_cpus": 0},
        "counted": {"engine": {"engine": "fake", "completion_tokens": 5}, "num_cpus": 0,
                    "replicas": 2, "version": "c1"},
        "slow": {"engine": {"engine": "fake", "completion_tokens": 2000, "token_delay_s": 0.05},
                 "num_cpus": 0},
        "narrow": {"engine": {"engine": "fake", "completion_tokens": 30, "token_delay_s": 0.1,
                              "max_concurrency": 1},
                   "num_cpus": 0, "max_ongoing_requests": 1, "max_queued_requests": 1},
        "hang": {"engine": {"engine": "fake", "ttft_s": 60}, "num_cpus": 0},
        "paced": {"engine": {"engine": "fake", "completion_tokens": 40, "token_delay_s": 0.01},
                  "num_cpus": 0, "stream_interval_s": 0.1},
        "greedy": {"engine": {"engine": "fake", "completion_tokens": 12},
                   "sampling": {"temperature": 0}, "num_cpus": 0},
        # served inside each ingress replica, not by a deployment of their own
        "inline": {"engine": {"engine": "fake", "completion_tokens": 12, "context_window": 256},
                   "version": "i1", "in_ingress": True},
        "inline-slow": {"engine": {"engine": "fake", "completion_tokens": 2000,
                                   "token_delay_s": 0.05},
                        "in_ingress": True, "max_ongoing_requests": 1, "max_queued_requests": 0},
    },
    "routes": {
        "fake": {"variant": "fake"},
        "counted": {"variant": "counted"},
        "slow": {"variant": "slow"},
        "narrow": {"variant": "narrow"},
        "hang": {"variant": "hang"},
        "paced": {"variant": "paced"},
        "greedy": {"variant": "greedy"},
        "inline": {"variant": "inline"},
        "inline-slow": {"variant": "inline-slow"},
    },
}


@pytest.fixture(scope="session")
def gateway(tmp_path_factory) -> Gateway:
    gw = Gateway(FAKE_CONFIG, tmp_path_factory.mktemp("gw"), env={"PROTEGE_API_KEYS": API_KEY})
    yield gw
    gw.stop()


# -- reading /metrics ----------------------------------------------------------------------


def scrape(gateway, name, **labels) -> float:
    return gateway.metric(name, **labels)


def settled(gateway, keys) -> dict:
    """Values once every replica has pushed what earlier tests did (pushes come each second)."""
    seen = [None]

    def check() -> bool:
        seen.append({k: scrape(gateway, k[0], **dict(k[1])) for k in keys})
        return seen[-1] == seen[-2]

    wait_until(check, "settled metrics", 50, 2.5, lambda: f"last seen {seen[-1]}")
    return seen[-1]


def wait_for_metric(gateway, name, expected, timeout_s=20, **labels) -> float:
    seen = []

    def check():
        seen.append(gateway.metric(name, **labels))
        return seen[-1] == expected

    wait_until(check, f"{name}{labels} = {expected}", timeout_s, 0.5,
               lambda: f"last seen {seen[-1] if seen else None}")
    return expected
