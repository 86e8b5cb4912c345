"""The packaged SmolLM2 student through llama.cpp behind the gateway, with examples/default.yaml."""

from __future__ import annotations

import pytest
import yaml

from tests.integration.conftest import REPO, Gateway

pytestmark = pytest.mark.e2e

STUDENT = REPO / "models" / "student" / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    if not STUDENT.exists():
        pytest.fail(f"{STUDENT} is missing: run `make models` (make test does it)")
    config = yaml.safe_load((REPO / "examples" / "default.yaml").read_text())
    gw = Gateway(config, tmp_path_factory.mktemp("e2e"), startup_s=300)
    yield gw
    gw.stop()


def test_student_answers_a_real_question(gateway):
    client = gateway.client()
    question = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    r = client.chat.completions.create(model="student", messages=question, temperature=0,
                                       max_tokens=40)
    answer = r.choices[0].message.content
    assert "Paris" in answer, answer  # greedy: "The capital of France is Paris."
    assert r.usage.prompt_tokens > 5 and 0 < r.usage.completion_tokens <= 40
    stream = client.chat.completions.create(model="student", messages=question, temperature=0,
                                            max_tokens=40, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == answer


def test_teacher_route_serves_too(gateway):
    r = gateway.client().chat.completions.create(
        model="teacher", messages=[{"role": "user", "content": "Write the word hello."}],
        temperature=0, max_tokens=16)
    assert r.choices[0].message.content.strip()
