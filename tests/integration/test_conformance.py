"""Schemathesis against the OpenAI spec subset in tests/data/openai, positive and negative.

    .venv/bin/python -m pytest -q tests/integration/test_conformance.py

Every generated request goes to the real gateway (session `gateway`: fake engines, API key auth)
and its answer is checked: no 5xx, a documented status code, content type and headers, a body that
matches the spec, schema-invalid requests rejected, schema-valid ones accepted, auth not ignored,
405 on other methods. The run is bounded and deterministic (derandomized, no example database);
a summary of requests by operation, mode and status is printed at the end.

Steering: the spec's `model` is any string, so most bodies are pointed at the route `fake` (about
one in eight keeps its generated name and must get a 404), and `stream` is forced off, since
schemathesis cannot validate `text/event-stream` (streaming has its own tests in
test_openai_api.py). Positive cases only: most `/models/{model}` lookups, non-string completion
prompts, `max_tokens: 0`, `best_of` other than `n` and tool-calling turns are mended, so that
more of them reach a 200 whose body is checked. Most declared tools get `tool_choice: "none"`
and most `response_format`s are dropped: the fake engine refuses both (structured outputs and
tool calls have their own tests in test_structured_outputs.py).

Exclusions, per case and per check, with the reason counted in the summary:
- `positive_data_acceptance`, where a schema-valid request is rejected on purpose (DELIBERATE:
  decisions pinned in tests/unit/test_protocol.py, or rejections OpenAI makes too; checked against
  the `param` of the 400 and the value sent), or is over the body size limit (413);
- `negative_data_rejection`, where a schema-invalid body was broken only in places the gateway
  does not read (READ), which it accepts and ignores by design.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import re
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hypothesis.configuration
import pytest
import schemathesis
from schemathesis.core.parameters import ParameterLocation
from schemathesis.specs.openapi.checks import negative_data_rejection, positive_data_acceptance

from tests.integration.conftest import API_KEY, REPO

pytestmark = pytest.mark.integration

# Hypothesis caches what it learns (constants, unicode tables) under ./.hypothesis: not in the repo.
if not os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY"):
    hypothesis.configuration.set_hypothesis_home_dir(
        Path(tempfile.gettempdir()) / "protege-hypothesis"
    )

SPEC = REPO / "tests" / "data" / "openai" / "openai-chat-subset.yaml"
MAX_EXAMPLES = 100  # fuzzed per operation, on top of the examples and coverage phases' cases
MAX_TOKENS_LIMIT = 2**31 - 1

CONFIG = {
    "seed": 20240611,  # for what derandomize does not fix
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
    "auth": {"openapi": {"ApiKeyAuth": {"bearer": API_KEY}}},  # negated by some negative cases
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
    (r"messages\[\d+\]\.role", lambda v, b: v == "function",
     "legacy function turns are rejected: tool turns replace them"),
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
    (r"seed", lambda v, b: isinstance(v, int) and not -(2**63) <= v < 2**63,
     "a seed beyond int64, the spec's `format: int64`, which schemathesis does not enforce"),
    (r"best_of", lambda v, b: v not in (None, b.get("n") or 1),
     "no ranking of candidates: best_of must equal n"),
    (r"tools", lambda v, b: isinstance(v, list) and v,
     "the fake engine has no vocabulary to constrain: it refuses tools (tool_choice 'none' "
     "answers in text)"),
    (r"tools\[\d+\]\.(type|function\.parameters|function\.name)",
     lambda v, b: v is not None,
     "a generated tool that is not a function, or whose parameters are no JSON Schema that "
     "decoding can enforce, or a name declared twice"),
    (r"messages\[\d+\]\.tool_calls\[\d+\]\.type", lambda v, b: v != "function",
     "only function tool calls: custom (free-form) calls in the history are a 400"),
    (r"functions", lambda v, b: isinstance(v, list) and v,
     "the legacy functions are refused, not ignored: tools replace them"),
    (r"tool_choice|function_call", lambda v, b: v not in (None, "none"),
     "a tool_choice with nothing declared to call, or naming an undeclared function, as at "
     "OpenAI"),
    (r"response_format", lambda v, b: isinstance(v, dict) and v.get("type") != "text",
     "the fake engine has no vocabulary to constrain: it refuses a response_format"),
    (r"response_format\.json_schema\.name",
     lambda v, b: not (isinstance(v, str) and re.fullmatch(r"[a-zA-Z0-9_-]{1,64}", v)),
     "a schema name that OpenAI refuses too: 1 to 64 of a-z, A-Z, 0-9, '_' and '-'"),
    (r"response_format\.json_schema\.schema", lambda v, b: isinstance(v, dict),
     "a generated schema that is no JSON Schema, or uses a keyword decoding cannot enforce"),
]

# What the gateway reads and validates, as schemathesis names body paths (no array indices).
# Everything else (the ignored fields: audio, modalities, ...; keys of a message or a
# content part other than these) is accepted with a loose type, so a body broken only there is
# answered, not rejected (serving/protocol.py: "unknown fields are accepted and ignored").
_READ = """model n seed stop stream stream_options stream_options.include_usage
    stream_options.include_obfuscation temperature top_p user logprobs max_tokens
    frequency_penalty presence_penalty""".split()  # logit_bias, metadata: only "an object"
READ = {
    "/chat/completions": frozenset(_READ + """messages messages.role messages.name messages.content
        messages.content.type messages.content.text messages.content.refusal
        max_completion_tokens top_logprobs parallel_tool_calls store response_format
        tool_choice function_call functions
        tools tools.type tools.function tools.function.name tools.function.description
        tools.function.strict tools.function.parameters
        messages.tool_calls messages.tool_calls.id messages.tool_calls.type
        messages.tool_calls.function messages.tool_calls.function.name
        messages.tool_calls.function.arguments messages.tool_call_id
        response_format.type response_format.json_schema response_format.json_schema.name
        response_format.json_schema.schema response_format.json_schema.strict
        response_format.json_schema.description""".split()),
    "/completions": frozenset(_READ + "prompt best_of echo suffix".split()),
}

TOOLS = ("tool", "function")  # roles of tool-calling turns (function: rejected)

COUNTS: collections.Counter[tuple[str, str, int]] = collections.Counter()
EXCUSED: collections.Counter[str] = collections.Counter()


def _mostly(value: Any) -> bool:
    """Deterministically true for about seven values in eight."""
    return zlib.crc32(repr(value).encode("utf-8", "replace")) % 8 != 0


def _steer(case) -> None:
    """Point requests at a real route and off the SSE path, without mending a negative case."""
    positive = case.meta is not None and case.meta.generation.mode.value == "positive"
    path_model = (case.path_parameters or {}).get("model")
    if positive and isinstance(path_model, str) and _mostly(path_model):
        case.path_parameters["model"] = "fake"  # GET /models/{model}: mostly a 200 to check
    body = case.body
    if not isinstance(body, dict):
        return
    model = body.get("model")
    if isinstance(model, str) and (model == "" or _mostly(model)):  # any string is schema-valid
        body["model"] = "fake"
    if body.get("stream") is None or isinstance(body["stream"], bool):  # so is either boolean
        body["stream"] = False
        if positive:
            body.pop("stream_options", None)  # only allowed with stream=true
    if not positive:
        return
    # Mend most of what DELIBERATE would excuse, so that more positive cases reach a 200.
    prompt = body.get("prompt")
    if case.operation.path == "/completions" and not _is_text(prompt) and _mostly(prompt):
        body["prompt"] = "Once upon a time"  # most generated ones are batches or token ids
    for name in ("max_tokens", "max_completion_tokens"):
        if body.get(name) == 0 and _mostly(body):
            body[name] = 1  # schemathesis likes the schema's minimum, 0
    if body.get("best_of") not in (None, body.get("n") or 1) and _mostly(body):
        del body["best_of"]  # 0..20 in the spec; we take only best_of == n
    for name, choice in (("tools", "tool_choice"), ("functions", "function_call")):
        if body.get(name) and _mostly(body[name]):
            body[choice] = "none"  # calls are refused: ask for the answer in text
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") != "text" and _mostly(fmt):
        del body["response_format"]  # the fake engine refuses one (test_structured_outputs.py)
    messages = body.get("messages")
    if isinstance(messages, list) and _mostly(messages):
        kept = [m for m in messages if not (isinstance(m, dict) and m.get("role") in TOOLS)]
        body["messages"] = kept or messages


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
    """Why a schema-valid body got its 400 or 413, when that rejection is on purpose."""
    if response.status_code == 413:
        return "a body over the gateway's limit (server.max_body_bytes, 64 KiB here)"
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


def _only_unread_broken(case) -> str | None:
    """Why a schema-invalid body was answered, when only parts we do not read were broken."""
    mutations = getattr(case.meta.phase.data, "mutations", ()) if case.meta else ()
    if not mutations or any(m.parameter_location != ParameterLocation.BODY for m in mutations):
        return None
    # A field broken inside an `allOf` branch also breaks that branch: not a mutation of its own.
    paths = {".".join(map(str, m.path)) for m in mutations if m.path or m.keywords != ("allOf",)}
    if not paths or "" in paths or paths & READ.get(case.operation.path, frozenset()):
        return None
    return "a body broken only where we do not read it (accepted, ignored)"


def _test(case, gateway) -> None:
    _steer(case)
    base_url = gateway.base + "/v1"
    response = case.call(base_url=base_url)
    mode = case.meta.generation.mode.value if case.meta is not None else "explicit"
    COUNTS[(case.operation.label, mode, response.status_code)] += 1
    excluded = []
    if mode == "positive" and (reason := _deliberate(case, response)) is not None:
        EXCUSED[reason] += 1
        excluded.append(positive_data_acceptance)
    if mode == "negative" and response.status_code == 200:
        if (reason := _only_unread_broken(case)) is not None:
            EXCUSED[reason] += 1
            excluded.append(negative_data_rejection)
    case.validate_response(
        response, excluded_checks=excluded, transport_kwargs={"base_url": base_url}
    )


# Rich answers (n > 1, logprobs, a length cut, content parts) that random bodies seldom reach.
EXPLICIT = [
    ("/chat/completions", {
        "model": "fake", "n": 3, "logprobs": True, "top_logprobs": 2, "seed": 1, "stop": ["zzz"],
        "max_completion_tokens": 5, "temperature": 0.5, "user": "u-1",
        "messages": [{"role": "developer", "content": "Be brief."},
                     {"role": "user", "content": [{"type": "text", "text": "hi"}], "name": "ann"},
                     {"role": "assistant", "content": None, "tool_calls": []},
                     {"role": "user", "content": "again"}],
    }),
    ("/chat/completions", {"model": "counted", "messages": [{"role": "user", "content": "x"}],
                           "max_tokens": 100, "stream": False, "temperature": 0}),
    ("/completions", {"model": "fake", "prompt": "Once", "n": 2, "best_of": 2, "logprobs": 3,
                      "max_tokens": 4, "echo": False, "suffix": None}),
    ("/completions", {"model": "fake", "prompt": ["one"], "stop": "x", "seed": -5,
                      "max_tokens": 16.0}),
]


def _summary(config) -> None:
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or not COUNTS:
        return
    total = sum(COUNTS.values())
    lines = [f"conformance: {total} requests (schemathesis {schemathesis.__version__})"]
    lines += [f"  {op:24} {mode:9} {code}: {n}" for (op, mode, code), n in sorted(COUNTS.items())]
    lines += [f"  excused x{n}: {reason}" for reason, n in EXCUSED.most_common()]
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        reporter.write_line("")
        for line in lines:
            reporter.write_line(line)


@pytest.fixture(scope="module", autouse=True)
def _report(request):
    yield
    _summary(request.config)


if not SPEC.is_file():  # a missing spec fails collection, loudly, instead of skipping
    raise FileNotFoundError(f"OpenAI spec subset missing: {SPEC} (it ships in the repository)")
schema = schemathesis.openapi.from_path(SPEC, config=schemathesis.Config.from_dict(CONFIG))
test_openai_conformance = schema.parametrize()(_test)


@pytest.mark.parametrize(("path", "body"), EXPLICIT)
def test_rich_answers_match_the_spec(gateway, path, body):
    case = schema[path]["POST"].Case(body=body, media_type="application/json")
    response = case.call_and_validate(
        base_url=gateway.base + "/v1", headers={"Authorization": f"Bearer {API_KEY}"}
    )
    COUNTS[(case.operation.label, "explicit", response.status_code)] += 1
    assert response.status_code == 200, response.text
    assert len(response.json()["choices"]) == body.get("n", 1)
