"""A/B arms on real Ray Serve: sticky per user or session, split by weight, counted per variant."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from ops.gateway import Gateway, wait_until
from serving.router import choose_arm
from tests.integration.conftest import API_KEY, REPO

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

MSG = [{"role": "user", "content": "hi"}]
ARMS = [("a", 3.0), ("b", 1.0)]
VERSIONS = {"a": "a1", "b": "b1"}
AB_CONFIG = {
    "server": {"request_timeout_s": 10, "drain_timeout_s": 5,
               "ingress": {"replicas": 1, "num_cpus": 0}},
    "variants": {
        name: {"engine": {"engine": "fake", "completion_tokens": 3}, "version": version,
               "num_cpus": 0}
        for name, version in VERSIONS.items()
    },
    "routes": {
        "ab": {"variant": "a", "arms": [{"variant": v, "weight": w} for v, w in ARMS]},
    },
}


def fingerprint(user: str) -> str:
    """What the gateway must answer for `user` on route `ab`: the router's choice."""
    arm = choose_arm(ARMS, user, "ab")
    return f"{arm}:{VERSIONS[arm]}"


@pytest.fixture(scope="module")
def ab_gateway(tmp_path_factory) -> Gateway:
    gw = Gateway(AB_CONFIG, tmp_path_factory.mktemp("ab"), env={"PROTEGE_API_KEYS": API_KEY})
    yield gw
    gw.stop()


def requests_by_variant(gateway) -> dict[str, float]:
    counts: Counter[str] = Counter()
    text = httpx.get(gateway.base + "/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "protege_requests_total" and s.labels.get("route") == "ab":
                counts[s.labels["variant"]] += s.value
    return dict(counts)


def test_one_user_stays_in_one_arm_and_split_follows_weights(ab_gateway):
    client = ab_gateway.client(timeout=15)
    sent: Counter[str] = Counter()
    # (a) the same user, ten times, always lands in the same arm; users differ by the router.
    users = ["alice", "bob", "carol", "grace"]
    assert {fingerprint(u) for u in users} == {"a:a1", "b:b1"}  # both arms among them
    for user in users:
        seen = set()
        for _ in range(10):
            r = client.chat.completions.create(model="ab", messages=MSG, user=user)
            seen.add(r.system_fingerprint)
            sent[r.system_fingerprint.split(":")[0]] += 1
        assert seen == {fingerprint(user)}, user
    # A streamed answer carries its arm in every chunk.
    chunks = list(client.chat.completions.create(model="ab", messages=MSG, user="grace",
                                                 stream=True))
    assert {c.system_fingerprint for c in chunks} == {fingerprint("grace")}
    sent[fingerprint("grace").split(":")[0]] += 1

    # (b) distinct users split near 3:1, each exactly where the router puts them.
    got = []
    for i in range(200):
        user = f"user-{i}"
        r = client.chat.completions.create(model="ab", messages=MSG, user=user)
        assert r.system_fingerprint == fingerprint(user), user
        got.append(r.system_fingerprint.split(":")[0])
    sent.update(got)
    share_a = got.count("a") / len(got)
    assert 0.6 <= share_a <= 0.9, share_a

    # (c) /metrics counts requests per arm's variant under route "ab".
    wait_until(lambda: requests_by_variant(ab_gateway) == sent, "requests per arm in /metrics",
               20, 0.5, lambda: f"counted {requests_by_variant(ab_gateway)}, sent {dict(sent)}")


def test_session_header_beats_user_and_headers_name_the_arm(ab_gateway):
    users = [f"someone-{i}" for i in range(5)]
    session = "session-1"
    with ab_gateway.http() as http:
        ids, variants = [], set()
        for user in users:
            r = http.post("/v1/chat/completions", headers={"x-session-id": session},
                          json={"model": "ab", "messages": MSG, "user": user})
            assert r.status_code == 200
            body = r.json()
            assert body["system_fingerprint"] == fingerprint(session)
            assert f"{r.headers['x-protege-variant']}:{r.headers['x-protege-version']}" == (
                fingerprint(session))
            variants.add(r.headers["x-protege-variant"])
            ids.append(body["id"])
        assert len(variants) == 1
        r = http.post("/v1/chat/completions", json={"model": "ab", "messages": MSG, "user": "bob"})
        ids.append(r.json()["id"])
        r = http.get("/v1/models")
        assert [m["id"] for m in r.json()["data"]] == ["ab"]  # routes only, not arms
    # The canonical log line names the arm's variant and what picked it.
    lines = {}

    def logged() -> bool:
        for line in ab_gateway.log_path.read_text(errors="replace").splitlines():
            if '"serving.request.completed"' in line and any(i in line for i in ids):
                record = json.JSONDecoder().raw_decode(line[line.index("{"):])[0]
                lines[record["request_id"]] = record
        return len(lines) >= len(ids)

    wait_until(logged, "a completed log line per request", 20, 0.5)
    assert [lines[i]["arm_key"] for i in ids] == ["session"] * len(users) + ["user"]
    assert lines[ids[-1]]["variant"] == fingerprint("bob").split(":")[0]


def test_arm_naming_an_unknown_variant_fails_at_start(tmp_path):
    config = json.loads(json.dumps(AB_CONFIG))
    config["routes"]["ab"]["arms"].append({"variant": "c", "weight": 1})
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    done = subprocess.run([sys.executable, "-m", "ops.cli", "serve", "--config", str(path)],
                          cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"invalid config {path}:",
        "  routes.ab.arms.2.variant: 'c' is not a variant (allowed: a, b)",
    ]
