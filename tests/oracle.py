"""An OpenAI-compatible endpoint that knows the task suite: model "oracle" answers each case
with its reference, "dunce" with a shrug. A real HTTP server (uvicorn in a thread), so
`protege eval` and the gate score it through the remote engine like any endpoint."""

from __future__ import annotations

import json
import re
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from distill.evaluate import DEFAULT_SUITE
from distill.tasks import load_suite
from ops.gateway import wait_until


class Oracle:
    """Answers each suite case with its reference (model "oracle") or a shrug ("dunce"). A
    request with tools gets a streamed call: the reference's for "oracle", else one to the
    first tool with `{"city": "Rome"}`."""

    def __init__(self):
        cases = load_suite(DEFAULT_SUITE)
        self.reference = {c.messages[-1]["content"]: c.reference for c in cases}
        self.bodies: list[dict] = []  # every chat request, as received
        self.app = Starlette(routes=[Route("/v1/models", self.models),
                                     Route("/v1/chat/completions", self.chat, methods=["POST"])])

    async def models(self, request: Request):
        return JSONResponse({"object": "list", "data": [{"id": "oracle", "object": "model"},
                                                        {"id": "dunce", "object": "model"}]})

    async def chat(self, request: Request):
        body = await request.json()
        self.bodies.append(body)
        known = self.reference.get(body["messages"][-1]["content"], "Hello.")
        text = known if body["model"] == "oracle" else "Sorry, no idea."

        async def events():
            if body.get("tools"):  # a call, its arguments streamed in pieces
                name, arguments = _call(text) if text.startswith("<tool_call>") else (
                    body["tools"][0]["function"]["name"], {"city": "Rome"})
                first = {"index": 0, "id": "call_up", "type": "function",
                         "function": {"name": name, "arguments": ""}}
                args = json.dumps(arguments)
                pieces = [first, *({"index": 0, "function": {"arguments": a}}
                                   for a in (args[:5], args[5:]))]
                for piece in pieces:
                    chunk = {"choices": [{"index": 0, "delta": {"tool_calls": [piece]}}]}
                    yield f"data: {json.dumps(chunk)}\n\n"
                end = {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}
                yield f"data: {json.dumps(end)}\n\n"
                yield "data: [DONE]\n\n"
                return
            for piece in re.findall(r"\s*\S+", text):
                chunk = {"choices": [{"index": 0, "delta": {"content": piece}}]}
                yield f"data: {json.dumps(chunk)}\n\n"
            end = {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
            yield f"data: {json.dumps(end)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")


def _call(reference: str) -> tuple[str, dict]:
    """The function and arguments of a reference answer that is a tool call."""
    call = json.loads(reference.removeprefix("<tool_call>").removesuffix("</tool_call>"))
    return call["name"], call["arguments"]


@contextmanager
def serve_app(app) -> Iterator[str]:
    """An ASGI `app` on 127.0.0.1 (an ephemeral port) in a thread; yields its /v1 base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_until(lambda: server.started, "test server start", timeout_s=10, interval_s=0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=5)
        sock.close()


def serve_oracle(oracle: Oracle | None = None):
    """An `Oracle` served by `serve_app`."""
    return serve_app((oracle or Oracle()).app)
