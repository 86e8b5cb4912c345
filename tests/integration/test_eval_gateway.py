"""`protege eval` against the running gateway (real Ray Serve, fake engines): it scores what
the gateway answers, names the model by `#MODEL` or the first one `/v1/models` lists, and a
missing key is an error, not a zero score."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from distill.evaluate import DEFAULT_SUITE
from distill.tasks import load_suite
from tests.integration.conftest import API_KEY, REPO

pytestmark = pytest.mark.integration


def protege_eval(*args: str, key: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PROTEGE_REMOTE_API_KEY"}
    if key is not None:
        env["PROTEGE_REMOTE_API_KEY"] = key
    return subprocess.run([sys.executable, "-m", "ops.cli", "eval", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300, check=False)


def test_eval_scores_the_gateways_answers(gateway):
    out = protege_eval(f"{gateway.base}/v1#fake", "--limit", "2", "--json", "--quiet",
                       key=API_KEY)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout)
    cases = load_suite(DEFAULT_SUITE, splits=["gate"], limit=2)
    assert report["model"] == f"{gateway.base}/v1#fake" and report["cases"] == 12
    assert [r["id"] for r in report["rows"]] == [c.id for c in cases]
    structured = [r for r in report["rows"] if r["family"] == "structured"]
    assert structured and all(not r["passed"] and r["finish_reason"].startswith("refused: ")
                              for r in structured)  # the fake engine cannot constrain
    client = gateway.client()
    for row, case in list(zip(report["rows"], cases))[:3]:
        direct = client.chat.completions.create(model="fake", messages=case.messages,
                                                max_tokens=case.max_tokens, temperature=0)
        assert row["answer"] == direct.choices[0].message.content
    passed = sum(r["passed"] for r in report["rows"])
    assert report["summary"]["overall"]["passed"] == passed


def test_eval_picks_the_first_listed_model_and_needs_the_key(gateway):
    listed = gateway.client().models.list().data[0].id
    out = protege_eval(f"{gateway.base}/v1", "--limit", "1", "--family", "qa", "--json",
                       "--quiet", key=API_KEY)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout)["model"] == f"{gateway.base}/v1#{listed}"
    refused = protege_eval(f"{gateway.base}/v1#fake", "--limit", "1", key=None)
    assert refused.returncode == 1 and "failed to answer" in refused.stderr
    assert "401" in refused.stderr or "API key" in refused.stderr
