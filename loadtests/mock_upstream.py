"""An instant OpenAI-compatible upstream for the benchmarks: every chat completion answers at
once with the same 16 words, as one JSON body or as SSE chunks (a word a chunk, then usage and
`[DONE]`), whatever was asked. GET /v1/models lists the one model.

    python -m loadtests.mock_upstream --port 9100     # serves http://127.0.0.1:9100/v1

Listens on 127.0.0.1 only, in a process of its own (uvicorn), so that it does not share a
Python thread with the client or the system measured in front of it.
"""

from __future__ import annotations

import argparse
import json
import time

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

WORDS = ("Rivers carry stones downhill, and the stones, in turn, shape where the rivers "
         "run next year.").split()
MODEL = "student"


def completion(model: str) -> bytes:
    return json.dumps({
        "id": "chatcmpl-mock", "object": "chat.completion", "created": int(time.time()),
        "model": model, "system_fingerprint": "mock",
        "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                     "message": {"role": "assistant", "content": " ".join(WORDS)}}],
        "usage": {"prompt_tokens": 12, "completion_tokens": len(WORDS),
                  "total_tokens": 12 + len(WORDS)}}).encode()


def chunks(model: str) -> list[bytes]:
    def event(delta: dict, finish: str | None = None, usage: dict | None = None) -> bytes:
        body = {"id": "chatcmpl-mock", "object": "chat.completion.chunk",
                "created": int(time.time()), "model": model, "system_fingerprint": "mock",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish,
                             "logprobs": None}]}
        if usage is not None:
            body["usage"] = usage
        return b"data: " + json.dumps(body).encode() + b"\n\n"

    words = [event({"content": w if i == 0 else " " + w}) for i, w in enumerate(WORDS)]
    usage = {"prompt_tokens": 12, "completion_tokens": len(WORDS),
             "total_tokens": 12 + len(WORDS)}
    return [event({"role": "assistant", "content": ""}), *words, event({}, "stop", usage),
            b"data: [DONE]\n\n"]


async def chat(request: Request) -> Response:
    body = await request.json()
    model = body.get("model") or MODEL
    if not body.get("stream"):
        return Response(completion(model), media_type="application/json")
    parts = chunks(model)

    async def stream():
        for part in parts:
            yield part

    return StreamingResponse(stream(), media_type="text/event-stream")


async def models(_request: Request) -> Response:
    return JSONResponse({"object": "list", "data": [{"id": MODEL, "object": "model",
                                                     "created": 0, "owned_by": "mock"}]})


app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"]),
                        Route("/v1/models", models, methods=["GET"])])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args()
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
