"""The ingress's SSE path when the stream fails after the headers were sent."""

from __future__ import annotations

import time
from types import SimpleNamespace

from serving.engines.base import Delta
from serving.ingress import Ingress
from serving.responses import ResponseMeta


class Stream:
    """A model's batches that break after the first one with an error that is no engine's."""

    def __init__(self):
        self.cancelled = False

    def __aiter__(self):
        return self

    async def __anext__(self):
        raise RuntimeError("replica lost")

    def cancel(self):
        self.cancelled = True


class Call:
    request_id = "chatcmpl-1"

    def __init__(self):
        self.statuses = []


class Log:
    def __init__(self):
        self.errors = []

    def error(self, event, **fields):
        self.errors.append(event)

    warning = error


async def test_a_failure_mid_stream_is_an_error_event_and_a_500_not_a_200():
    call, stream = Call(), Stream()
    calls = SimpleNamespace(delta=lambda call, index, delta: None,
                            finish=lambda call, status: call.statuses.append(status))
    ingress = SimpleNamespace(log=Log(), p=SimpleNamespace(server=None), calls=calls)
    req = SimpleNamespace(n=1, include_usage=False)
    first = [(0, Delta("Hello"))]
    chunks = [c async for c in Ingress._sse(ingress, "chat", ResponseMeta("chatcmpl-1", 0, "m"),
                                            req, call, first, stream, time.monotonic() + 30)]
    body = b"".join(chunks)
    assert b"Hello" in body and b'"code":"internal_error"' in body
    assert not body.endswith(b"data: [DONE]\n\n")  # the client sees a cut stream, said so
    assert call.statuses == [500]  # counted as a 5xx; finish(500) mirrors no pair
    assert stream.cancelled and ingress.log.errors == ["serving.request.failed"]
