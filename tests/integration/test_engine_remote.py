"""RemoteEngine against a real OpenAI-compatible SSE server on 127.0.0.1 (uvicorn in a thread).

The server's behaviour is picked by the `model` name in the request body.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import asyncio
import json
import socket
import threading

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from serving.engines import (
    EngineError,
    GenerationRequest,
    Message,
    PromptTooLong,
    SamplingParams,
    build_engine,
    merge_deltas,
)
from serving.engines.config import RemoteEngine as RemoteConfig
from serving.engines.remote import MAX_ERROR_CHARS, RemoteEngine, UpstreamError
from tests.oracle import serve_app

pytestmark = pytest.mark.integration

WORDS = ["Hello", " there", ",", " friend", "!"]


class Upstream:
    """A tiny OpenAI-compatible server that records what it received and what it streamed."""

    def __init__(self):
        self.requests: list[tuple[dict, dict]] = []
        self.sent = 0
        self.stream_closed = threading.Event()
        self.app = Starlette(
            routes=[
                Route("/v1/chat/completions", self.chat, methods=["POST"]),
                Route("/v1/completions", self.completions, methods=["POST"]),
            ]
        )

    async def chat(self, request: Request):
        body = await request.json()
        self.requests.append((dict(request.headers), body))
        mode = body["model"]
        if mode == "boom":
            return JSONResponse({"error": {"message": "x" * 5000, "type": "server_error"}}, 500)
        if mode == "ctx":
            msg = (
                "This model's maximum context length is 4096 tokens. However, you requested "
                "5000 tokens (4000 in the messages, 1000 in the completion)."
            )
            return JSONResponse({"error": {"message": msg, "type": "invalid_request_error"}}, 400)
        if mode == "endless":
            return StreamingResponse(self._endless(), media_type="text/event-stream")
        return StreamingResponse(self._chat_events(body), media_type="text/event-stream")

    async def _chat_events(self, body):
        want_lp = body.get("logprobs")
        base = {"id": "c1", "object": "chat.completion.chunk", "model": body["model"]}
        yield ": keep-alive comment\n\n"
        first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
        yield f"data: {json.dumps({**base, 'choices': [first]})}\n\n"
        for w in WORDS:
            choice = {"index": 0, "delta": {"content": w}, "finish_reason": None}
            if want_lp:
                top = [{"token": w, "logprob": -0.1}, {"token": "zz", "logprob": -2.5}]
                top = top[: body["top_logprobs"]]
                content = [{"token": w, "logprob": -0.1, "top_logprobs": top}]
                choice["logprobs"] = {"content": content}
            yield f"data: {json.dumps({**base, 'choices': [choice]})}\n\n"
        if body["model"] == "garbled":
            yield 'data: {"choices": [{"delta": {"content": "mail ann@example.com"\n\n'
            return
        if body["model"] == "cut":
            return  # the connection ends mid-answer: no finish_reason, no [DONE]
        if body["model"] != "nofinish":
            end = {"index": 0, "delta": {}, "finish_reason": "length"}
            yield f"data: {json.dumps({**base, 'choices': [end]})}\n\n"
        if body.get("stream_options", {}).get("include_usage") and body["model"] != "nousage":
            usage = {"prompt_tokens": 11, "completion_tokens": 5, "total_tokens": 16}
            yield f"data: {json.dumps({**base, 'choices': [], 'usage': usage})}\n\n"
        yield "data: [DONE]\n\n"

    async def _endless(self):
        try:
            for i in range(10_000):
                chunk = {"choices": [{"index": 0, "delta": {"content": f" w{i}"}}]}
                self.sent += 1
                yield f"data: {json.dumps(chunk)}\n\n"
                await asyncio.sleep(0.01)
        finally:
            self.stream_closed.set()

    async def completions(self, request: Request):
        body = await request.json()
        self.requests.append((dict(request.headers), body))

        async def events():
            for w in WORDS:
                choice = {"index": 0, "text": w, "finish_reason": None}
                if body.get("logprobs") is not None:
                    choice["logprobs"] = {
                        "tokens": [w],
                        "token_logprobs": [-0.2],
                        "top_logprobs": [{"zz": -3.0, w: -0.2}],
                    }
                yield f"data: {json.dumps({'choices': [choice]})}\n\n"
            end = {"index": 0, "text": "", "finish_reason": "stop"}
            yield f"data: {json.dumps({'choices': [end]})}\n\n"
            usage = {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
            yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")


@pytest.fixture(scope="module")
def upstream():
    up = Upstream()
    with serve_app(up.app) as base_url:
        up.base_url = base_url
        yield up


async def started(upstream, model="ok", env=None, **kw):
    cfg = RemoteConfig(base_url=upstream.base_url, model=model, **kw)
    engine = RemoteEngine(cfg, env=env if env is not None else {})
    await engine.start()
    return engine


def chat(max_tokens=None, **params):
    messages = (Message("system", "be kind"), Message("user", "hi"))
    return GenerationRequest("r1", SamplingParams(max_tokens, **params), messages=messages)


async def collect(engine, request):
    return [d async for d in engine.generate(request)]


async def test_chat_stream_is_parsed_with_usage_and_finish(upstream):
    engine = await started(upstream)
    try:
        deltas = await collect(engine, chat(7, temperature=0.5, top_p=0.9, stop=("END",), seed=3))
    finally:
        await engine.close()
    out = merge_deltas(deltas)
    assert out.text == "".join(WORDS)
    assert [d.text for d in deltas[:-1]] == WORDS
    assert out.finish_reason == "length"
    assert (out.prompt_tokens, out.completion_tokens) == (11, 5)
    assert out.logprobs is None and out.token_ids == ()
    assert all(d.finish_reason is None for d in deltas[:-1])
    _, body = upstream.requests[-1]
    assert body["messages"] == [
        {"role": "system", "content": "be kind"},
        {"role": "user", "content": "hi"},
    ]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert (body["max_tokens"], body["temperature"], body["top_p"]) == (7, 0.5, 0.9)
    assert body["stop"] == ["END"] and body["seed"] == 3 and "logprobs" not in body


async def test_chat_logprobs(upstream):
    engine = await started(upstream)
    out = merge_deltas(await collect(engine, chat(logprobs=2)))
    await engine.close()
    _, body = upstream.requests[-1]
    assert body["logprobs"] is True and body["top_logprobs"] == 2 and "max_tokens" not in body
    assert [lp.token for lp in out.logprobs] == WORDS
    assert out.logprobs[0].logprob == -0.1
    assert out.logprobs[0].top == (("Hello", -0.1), ("zz", -2.5))


async def test_completion_with_logprobs(upstream):
    engine = await started(upstream)
    request = GenerationRequest("r2", SamplingParams(5, logprobs=1), prompt="Say hi")
    out = merge_deltas(await collect(engine, request))
    await engine.close()
    headers, body = upstream.requests[-1]
    assert body["prompt"] == "Say hi" and body["logprobs"] == 1
    assert out.text == "".join(WORDS) and out.finish_reason == "stop"
    assert (out.prompt_tokens, out.completion_tokens) == (3, 5)
    assert out.logprobs[1].top == ((" there", -0.2), ("zz", -3.0))  # sorted, best first


async def test_missing_usage_falls_back_to_piece_count(upstream):
    engine = await started(upstream, model="nousage")
    out = merge_deltas(await collect(engine, chat()))
    await engine.close()
    assert out.prompt_tokens is None and out.completion_tokens == len(WORDS)


async def test_done_without_a_finish_reason_is_a_stop_said_so(upstream):
    engine, cut = await started(upstream, model="nofinish"), await started(upstream, model="cut")
    try:
        deltas = await collect(engine, chat())
        with pytest.raises(EngineError, match="without \\[DONE\\] or a finish_reason"):
            await collect(cut, chat())
    finally:
        await engine.close()
        await cut.close()
    assert merge_deltas(deltas).text == "".join(WORDS)
    assert deltas[-1].finish_reason == "stop" and deltas[-1].finish_assumed
    assert not any(d.finish_assumed for d in deltas[:-1])


async def test_an_event_that_is_not_json_is_an_error_that_quotes_no_text(upstream):
    engine = await started(upstream, model="garbled")
    try:
        with pytest.raises(EngineError, match="invalid JSON in an event") as e:
            await collect(engine, chat())
    finally:
        await engine.close()
    assert "ann@example.com" not in str(e.value)


async def test_auth_header_from_env(upstream):
    engine = await started(upstream, api_key_env="TEST_KEY", env={"TEST_KEY": "sekret"})
    await collect(engine, chat())
    await engine.close()
    headers, _ = upstream.requests[-1]
    assert headers["authorization"] == "Bearer sekret"


async def test_no_auth_header_without_api_key_env(upstream):
    engine = await started(upstream)
    await collect(engine, chat())
    await engine.close()
    headers, _ = upstream.requests[-1]
    assert "authorization" not in headers


async def test_missing_env_var_fails_at_start(upstream):
    cfg = RemoteConfig(base_url=upstream.base_url, model="ok", api_key_env="ABSENT_KEY_XYZ")
    engine = RemoteEngine(cfg, env={})
    with pytest.raises(EngineError, match="ABSENT_KEY_XYZ"):
        await engine.start()


async def test_upstream_error_status_is_engine_error_with_bounded_message(upstream):
    engine = await started(upstream, model="boom")
    with pytest.raises(UpstreamError) as info:
        await collect(engine, chat())
    await engine.close()
    assert info.value.status == 500
    assert "HTTP 500" in str(info.value)
    assert len(str(info.value)) < MAX_ERROR_CHARS + 100


async def test_context_length_400_is_prompt_too_long(upstream):
    engine = await started(upstream, model="ctx")
    with pytest.raises(PromptTooLong) as info:
        await collect(engine, chat())
    await engine.close()
    assert (info.value.prompt_tokens, info.value.max_tokens, info.value.context_window) == (
        4000,
        1000,
        4096,
    )


async def test_unreachable_upstream_is_engine_error():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    cfg = RemoteConfig(base_url=f"http://127.0.0.1:{port}/v1", model="ok")
    engine = build_engine(cfg, resolve_path=lambda p: p)
    await engine.start()
    with pytest.raises(EngineError, match="failed"):
        await collect(engine, chat())
    await engine.close()


async def test_injected_client_is_used_and_not_closed(upstream):
    client = httpx.AsyncClient(base_url=upstream.base_url + "/")
    engine = RemoteEngine(RemoteConfig(base_url=upstream.base_url, model="ok"), client=client)
    await engine.start()
    out = merge_deltas(await collect(engine, chat()))
    await engine.close()
    assert out.text == "".join(WORDS)
    assert not client.is_closed
    await client.aclose()


async def test_closing_the_iterator_closes_the_upstream_stream(upstream):
    upstream.stream_closed.clear()
    engine = await started(upstream, model="endless")
    stream = engine.generate(chat())
    first = [await anext(stream) for _ in range(3)]
    assert [d.text for d in first] == [" w0", " w1", " w2"]
    await stream.aclose()
    closed = await asyncio.to_thread(upstream.stream_closed.wait, 5)
    await engine.close()
    assert closed, "the server kept streaming after the client closed"
    assert upstream.sent < 1000
