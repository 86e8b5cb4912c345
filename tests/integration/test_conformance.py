"""Schemathesis against the OpenAI spec subset in ../shared/conformance: positive and negative cases.

Every generated request goes to the real gateway (session `gateway`, fake engines, API key auth)
and its answer is checked: no 5xx, a documented status code and content type, a body that matches
the spec, schema-invalid requests rejected, schema-valid ones accepted. The run is bounded and
deterministic (derandomized, no example database).

Steering, positive and negative cases alike: the spec's `model` is any string, so most bodies are
pointed at the route `fake` (about one in eight keeps its generated name and must get a 404), and
`stream` is forced off because schemathesis cannot validate `text/event-stream` (streaming has its
own tests in test_openai_api.py).

Where a schema-valid request is rejected on purpose (see DELIBERATE: each a decision pinned in
tests/unit/test_protocol.py, or a rejection OpenAI makes too), only `positive_data_acceptance` is
skipped for that case, and only after checking that the 400 names that field for that reason.
"""

from __future__ import annotations

import collections
import json
import re
import zlib
from collections.abc import Callable
from typing import Any

import pytest
import schemathesis
from schemathesis.specs.openapi.checks import positive_data_acceptance

from tests.integration.conftest import API_KEY, REPO

pytestmark = pytest.mark.integration

SPEC = REPO.parent / "shared" / "conformance" / "openai-chat-subset.yaml"
MAX_EXAMPLES = 40  # per operation and generation mode, on top of the examples and coverage phases
MAX_TOKENS_LIMIT = 2**31 - 1

CONFIG = {
    "seed": 20240611,
    "generation": {
        "mode": "all",  # positive and negative
        "max-examples": MAX_EXAMPLES,
        "deterministic": True,  # derandomized: the same cases every run
        "database": "none",  # no .hypothesis/ written into the repo
    },
    "phases": {"stateful": {"enabled": False}},  # no links between these operations
    "checks": {
        "not_a_server_error": {"enabled": True},
        "status_code_conformance": {"enabled": True},
        "content_type_conformance": {"enabled": True},
        "response_schema_conformance": {"enabled": True},
        "response_headers_conformance": {"enabled": True},
        "negative_data_rejection": {"enabled": True},
        "positive_data_acceptance": {"enabled": True},
        "missing_required_header": {"enabled": True},
        "ignored_auth": {"enabled": True},
        "unsupported_method": {"enabled": True},
    },
    "request-timeout": 15,
}


def _is_text(v: Any) -> bool:
    return isinstance(v, str) or (isinstance(v, list) and len(v) == 1 and isinstance(v[0], str))


def _out_of_range(v: Any) -> bool:
    return isinstance(v, (int, float)) and not 1 <= v <= MAX_TOKENS_LIMIT


# (param pattern, is the sent value really of the rejected kind?, why we reject it)
DELIBERATE: list[tuple[str, Callable[[Any, dict], bool], str]] = [
    (r"model", lambda v, b: v == "",
     "an empty model name is a 400, as OpenAI's 'you must provide a model parameter'"),
    (r"messages\[\d+\]\.role", lambda v, b: v in ("tool", "function"),
     "no tool calling here: tool and function turns are rejected"),
    (r"messages\[\d+\]\.content\[\d+\]\.type", lambda v, b: v != "text",
     "a text-only server: other content parts (image, audio, file) are a 400"),
    (r"top_logprobs", lambda v, b: b.get("logprobs") is not True,
     "top_logprobs without logprobs=true, a 400 at OpenAI too"),
    (r"stream_options", lambda v, b: b.get("stream") is not True,
     "stream_options without stream=true, a 400 at OpenAI too"),
    (r"max_tokens|max_completion_tokens", lambda v, b: _out_of_range(v),
     "an answer of 0 tokens or of more than 2^31-1 is not something to generate"),
    (r"prompt", lambda v, b: not _is_text(v),
     "one string prompt per request: no batches, token ids or null (<|endoftext|>)"),
    (r"echo", lambda v, b: v is True, "echoing the prompt is not supported"),
    (r"best_of", lambda v, b: v not in (None, b.get("n") or 1),
     "no ranking of candidates: best_of must equal n"),
]

COUNTS: collections.Counter[tuple[str, str, int]] = collections.Counter()
EXCUSED: collections.Counter[str] = collections.Counter()


def _mostly(value: Any) -> bool:
    """Deterministically true for about seven values in eight."""
    return zlib.crc32(repr(value).encode("utf-8", "replace")) % 8 != 0


def _steer(case) -> None:
    """Point generated bodies at a real route, and keep them off the SSE path."""
    body = case.body
    if not isinstance(body, dict):
        return
    model = body.get("model")
    if isinstance(model, str) and (model == "" or _mostly(model)):
        body["model"] = "fake"
    if body.get("stream") is None or isinstance(body["stream"], bool):  # not a negative case's
        body["stream"] = False
        body.pop("stream_options", None)


def _at(body: Any, param: str) -> Any:
    """The value `param` (OpenAI's `messages[0].content[1].type`) names in `body`."""
    value = body
    for name, index in re.findall(r"([^.\[\]]+)|\[(\d+)\]", param):
        try:
            value = value[int(index)] if index else value[name]
        except (KeyError, IndexError, TypeError):
            return None
    return value


def _deliberate(case, response) -> str | None:
    """Why a schema-valid body got its 400, when that rejection is on purpose."""
    if response.status_code != 400 or not isinstance(case.body, dict):
        return None
    error = json.loads(response.content)["error"]
    if error.get("code") == "context_length_exceeded":
        return "the prompt is longer than the fake engine's 256-token window (as OpenAI: 400)"
    param = error.get("param") or ""
    for pattern, applies, reason in DELIBERATE:
        if re.fullmatch(pattern, param) and applies(_at(case.body, param), case.body):
            return reason
    return None


def _test(case, gateway) -> None:
    _steer(case)
    base_url = gateway.base + "/v1"
    headers = {"Authorization": f"Bearer {API_KEY}"}
    response = case.call(base_url=base_url, headers=headers)
    mode = case.meta.generation.mode.value if case.meta is not None else "explicit"
    COUNTS[(case.operation.label, mode, response.status_code)] += 1
    import os
    if os.environ.get("CONF_DEBUG") and ((mode == "negative" and response.status_code == 200) or (mode=="positive" and response.status_code==200)):
        with open("/tmp/conf/debug.txt", "a") as f:
            f.write(f"{mode} {case.operation.label} {response.status_code} {case.meta.components if case.meta else ''}\n  q={case.query} h={case.headers} p={case.path_parameters} b={json.dumps(case.body)[:400] if not hasattr(case.body,'__class__') or case.body.__class__.__name__!='NotSet' else 'NOTSET'}\n  r={response.content[:300]!r}\n")
    excluded = []
    if mode == "positive" and (reason := _deliberate(case, response)) is not None:
        EXCUSED[reason] += 1
        excluded.append(positive_data_acceptance)
    case.validate_response(
        response, headers=headers, excluded_checks=excluded,
        transport_kwargs={"base_url": base_url, "headers": headers},
    )


@pytest.fixture(scope="module", autouse=True)
def _summary(request):
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None or not COUNTS:
        return
    reporter.write_line(f"\nconformance: {sum(COUNTS.values())} cases")
    for (op, mode, status), n in sorted(COUNTS.items()):
        reporter.write_line(f"  {op:24} {mode:9} {status}: {n}")
    for reason, n in EXCUSED.most_common():
        reporter.write_line(f"  excused positive 400 x{n}: {reason}")


if SPEC.is_file():
    schema = schemathesis.openapi.from_path(SPEC, config=schemathesis.Config.from_dict(CONFIG))
    test_openai_conformance = schema.parametrize()(_test)
else:

    def test_openai_conformance():
        pytest.fail(
            f"conformance spec not found at {SPEC}: check out the shared/ folder beside the "
            "repository (CI does); it holds conformance/openai-chat-subset.yaml"
        )
