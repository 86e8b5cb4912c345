"""Schemathesis against the OpenAI spec subset in ../shared/conformance (positive and negative).

Every generated request goes to the real gateway (session `gateway`, fake engines). Positive cases
are steered to the route `fake` (the spec's `model` is a free string) and to `stream: false`
(schemathesis cannot validate `text/event-stream`; streaming has its own tests). Negative cases
keep whatever schemathesis broke; they must be rejected with a declared 4xx, never a 5xx.
"""

from __future__ import annotations

import collections
import zlib

import pytest
import schemathesis

from tests.integration.conftest import API_KEY, REPO

pytestmark = pytest.mark.integration

SPEC = REPO.parent / "shared" / "conformance" / "openai-chat-subset.yaml"
MAX_EXAMPLES = 40  # per operation and mode (positive, negative)
SEED = 20240611

CONFIG = {
    "seed": SEED,
    "generation": {
        "mode": "all",
        "max-examples": MAX_EXAMPLES,
        "deterministic": True,  # derandomized: the same cases every run
        "database": "none",  # no .hypothesis/ in the repo
        "no-shrink": False,
    },
    "phases": {"stateful": {"enabled": False}},
    "checks": {
        "not_a_server_error": {"enabled": True},
        "status_code_conformance": {"enabled": True},
        "content_type_conformance": {"enabled": True},
        "response_schema_conformance": {"enabled": True},
        "negative_data_rejection": {"enabled": True},
        "positive_data_acceptance": {"enabled": True},
    },
    "request-timeout": 15,
}

COUNTS: collections.Counter[tuple[str, str, int]] = collections.Counter()


@pytest.fixture(scope="module", autouse=True)
def _report(request):
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None or not COUNTS:
        return
    reporter.write_line(f"\nconformance: {sum(COUNTS.values())} cases")
    for (op, mode, status), n in sorted(COUNTS.items()):
        reporter.write_line(f"  {op:32} {mode:8} {status}: {n}")


def _steer(case) -> None:
    """Point generated bodies at a real route, and keep them off the SSE path."""
    body = case.body
    if not isinstance(body, dict):
        return
    model = body.get("model")
    # Most cases use the route `fake`; about one in eight keeps its random name (must get 404).
    if isinstance(model, str) and zlib.crc32(model.encode("utf-8", "replace")) % 8 != 0:
        body["model"] = "fake"
    if isinstance(body.get("stream"), bool) or "stream" in body and body["stream"] is None:
        body["stream"] = False
        body.pop("stream_options", None)


def _test(case, gateway) -> None:
    _steer(case)
    response = case.call_and_validate(
        base_url=gateway.base + "/v1",
        headers={"Authorization": f"Bearer {API_KEY}"},
    )
    mode = case.meta.generation.mode.value if case.meta is not None else "?"
    COUNTS[(case.operation.label, mode, response.status_code)] += 1


if SPEC.is_file():
    schema = schemathesis.openapi.from_path(SPEC, config=schemathesis.Config.from_dict(CONFIG))
    test_openai_conformance = schema.parametrize()(_test)
else:

    def test_openai_conformance():
        pytest.fail(
            f"conformance spec not found at {SPEC}: check out the shared/ folder beside the "
            "repository (CI does); it holds conformance/openai-chat-subset.yaml"
        )
