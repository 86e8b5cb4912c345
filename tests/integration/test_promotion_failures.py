"""Promotions that must not take: a promoted version whose stored file no longer matches its
registry manifest (sha256), or whose file is not a GGUF, leaves the running gateway serving the
version it served (real Ray Serve, a tiny llama.cpp student built in code), logging
`serving.promotion.failed`; a replica that starts while such a version is promoted serves the
configured model; neither does a version whose manifest points outside its folder; a good
promotion afterwards still swaps in. Each test makes the versions it
needs; they share one gateway."""

from __future__ import annotations

import json

import httpx
import pytest
import yaml

from distill.gguf import convert_to_gguf
from distill.registry import Registry
from ops.gateway import Gateway, wait_until
from tests.unit.test_gguf import bpe_tokenizer, save, tiny_model

pytestmark = pytest.mark.integration

FAILED = "serving.promotion.failed"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("promotion-failures")
    tokenizer = bpe_tokenizer()
    student = save(tmp / "student", tiny_model("llama", tokenizer), tokenizer)
    good = convert_to_gguf(student, tmp / "tiny.gguf", qtype="Q8_0")
    config = {
        "variants": {"tiny": {
            "engine": {"engine": "llamacpp", "path": str(good), "n_ctx": 256, "n_threads": 1},
            "version": "base", "num_cpus": 0, "promotable": True}},
        "routes": {"tiny": {"variant": "tiny"}},
        "registry": {"root": str(tmp / "registry"), "poll_s": 0.3},
    }
    gw = Gateway(config, tmp, startup_s=300)
    yield gw, Registry(tmp / "registry"), good
    gw.stop()


def register(registry: Registry, path) -> str:
    return registry.register(path, teacher={"name": "tiny"},
                             gate={"passed": True, "failures": []})["version"]


def versions(gw: Gateway, n: int = 4) -> list[str]:
    """The version each of `n` chats (stream and not) was answered by; every one must succeed."""
    out = []
    with httpx.Client(base_url=gw.base, timeout=60) as http:
        for i in range(n):
            body = {"model": "tiny", "max_tokens": 3, "stream": bool(i % 2),
                    "messages": [{"role": "user", "content": f"hello {i}"}]}
            r = http.post("/v1/chat/completions", json=body)
            assert r.status_code == 200 and (not body["stream"] or "data: [DONE]" in r.text), \
                r.text[:300]
            out.append(r.headers["x-protege-version"])
    return out


def events(gw: Gateway, name: str) -> list[dict]:
    """The gateway's JSON log records named `name` (Ray prefixes each replica's lines)."""
    out = []
    for line in gw.log_path.read_text(errors="replace").splitlines():
        if f'"event": "{name}"' in line:
            try:
                out.append(json.loads(line[line.index("{"):]))
            except ValueError:
                pass
    return out


def failures(gw: Gateway, mark: str) -> list[dict]:
    """`serving.promotion.failed` records whose error mentions `mark`."""
    return [e for e in events(gw, FAILED) if mark in e.get("error", "")]


def wait_for(check, what: str, gw: Gateway, timeout_s: float = 120):
    """`check()`'s first truthy value, the gateway's log when it does not come."""
    return wait_until(check, what, timeout_s, 0.3, gw.logs)


def refused(gw: Gateway, mark: str, served: str) -> None:
    """Until the replica has logged the failed promotion twice (it retries every few polls),
    answering from `served` all along."""
    def check():
        assert versions(gw, 1) == [served]
        return len(failures(gw, mark)) >= 2

    wait_for(check, f"{FAILED} twice for {mark!r}", gw)


def test_a_version_whose_file_fails_verification_is_not_swapped_in(setup, monkeypatch):
    gw, registry, good = setup
    v1 = register(registry, good)
    registry.promote("tiny", v1)
    wait_for(lambda: versions(gw, 2) == [v1, v1], f"answers from {v1}", gw)

    v2 = register(registry, good)
    manifest = registry.manifest(v2)
    stored = registry.path + f"/versions/{v2}/files/{manifest['entry']}"
    with open(stored, "ab") as f:  # still a loadable GGUF: only the sha256 check can refuse it
        f.write(b"\0" * 64)
    # The file went bad after registration; promote it anyway (the registry would refuse here).
    monkeypatch.setattr(registry, "verify", registry.manifest)
    registry.promote("tiny", v2)
    mark = f"{v2}: stored files do not match the manifest"
    refused(gw, mark, v1)
    assert versions(gw) == [v1] * 4
    assert {e["serving"] for e in failures(gw, mark)} == {v1}
    assert v2 not in {e["version"] for e in events(gw, "serving.variant.promoted")}


def test_a_version_that_is_not_a_gguf_is_not_swapped_in(setup, tmp_path):
    gw, registry, _ = setup
    served = versions(gw, 1)[0]  # v1: v2 never took
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"this is not a GGUF file\n" * 200)
    v3 = register(registry, broken)
    registry.promote("tiny", v3)
    mark = f"cannot load {registry.path}/versions/{v3}/files/broken.gguf"
    refused(gw, mark, served)
    assert versions(gw) == [served] * 4
    assert {e["serving"] for e in failures(gw, mark)} == {served}
    assert v3 not in {e["version"] for e in events(gw, "serving.variant.promoted")}


def test_a_replica_starting_while_the_promoted_version_is_broken_serves_the_configured_model(
        setup, tmp_path):
    gw, registry, _ = setup
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "broken.gguf").write_bytes(b"not a GGUF file\n" * 200)
    broken = register(registry, tmp_path / "bad" / "broken.gguf")
    registry.promote("tiny", broken)
    config = yaml.safe_load(gw.config_path.read_text())
    fresh = Gateway(config, tmp_path, startup_s=300)
    try:
        assert versions(fresh) == ["base"] * 4
        at_start = [e for e in failures(fresh, f"versions/{broken}/files")
                    if e.get("version") == broken]  # the start's try, before the follower's
        assert at_start and at_start[0]["serving"] == "base", fresh.logs()
        loaded = events(fresh, "serving.variant.loaded")
        assert [e["version"] for e in loaded] == ["base"], fresh.logs()
    finally:
        fresh.stop()


OUTSIDE = "/".join([".."] * 4 + ["etc", "hostname"])  # as an attacker writes it; never opened


def test_a_manifest_that_points_outside_its_version_is_not_swapped_in(setup):
    """Someone with write access to the registry rewrites a promoted version's manifest so
    that its entry names a file outside the version's folder: the replicas refuse it."""
    gw, registry, good = setup
    served = versions(gw, 1)[0]
    v = register(registry, good)
    registry.promote("tiny", v)
    path = registry.path + f"/versions/{v}/manifest.json"
    manifest = json.loads(open(path).read())
    with open(path, "w") as f:
        json.dump({**manifest, "entry": OUTSIDE}, f)
    refused(gw, f"entry {OUTSIDE!r} refused", served)
    assert versions(gw) == [served] * 4
    assert v not in {e["version"] for e in events(gw, "serving.variant.promoted")}


def test_a_good_promotion_after_failed_ones_still_swaps_in(setup):
    gw, registry, good = setup
    served = versions(gw, 1)[0]
    v4 = register(registry, good)
    registry.promote("tiny", v4)
    wait_for(lambda: versions(gw, 2) == [v4, v4], f"answers from {v4}", gw)
    assert versions(gw) == [v4] * 4
    promoted = [(e["version"], e["previous"]) for e in events(gw, "serving.variant.promoted")]
    assert promoted[-1] == (v4, served), promoted
