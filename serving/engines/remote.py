"""An engine that forwards to any OpenAI-compatible server over HTTP (cloud reference, teacher).

Chat requests go to `/chat/completions`, prompts to `/completions`, always streamed with usage
(`stream_options.include_usage`). Server-sent events become deltas: text, logprobs when the
upstream returns them (no token ids: the upstream does not give them), and a last delta with the
finish reason and the upstream's token counts. Closing the iterator closes the HTTP stream.
A request's tools are passed through; the upstream's `tool_calls` come back as the call text
every engine writes (`serving.engines.tools`), on the last delta, so the gateway reads them like
any other.

Errors: an upstream HTTP error becomes `UpstreamError` (an `EngineError` with the status and a
bounded message), or `PromptTooLong` when it is a 400 about the context length whose numbers can
be read; network failures and timeouts become `EngineError`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import AsyncIterator, Mapping
from typing import Any

import httpx

from serving.engines.base import (
    Delta,
    Engine,
    EngineError,
    EngineInfo,
    GenerationRequest,
    Message,
    PromptTooLong,
    TokenLogprob,
)
from serving.engines.config import RemoteEngine as RemoteEngineConfig
from serving.engines.tools import call_text

MAX_ERROR_CHARS = 500
_CONTEXT = re.compile(
    r"maximum context length is (\d+) tokens.*?requested (\d+) tokens \((\d+) in the", re.S
)


class UpstreamError(EngineError):
    """The upstream server answered with an HTTP error status."""

    def __init__(self, status: int, message: str):
        self.status, self.detail = status, message
        super().__init__(f"upstream returned HTTP {status}: {message}")

    def __reduce__(self):  # crosses process boundaries (Ray) intact
        return (UpstreamError, (self.status, self.detail))


class RemoteEngine(Engine):
    def __init__(
        self,
        config: RemoteEngineConfig,
        client: httpx.AsyncClient | None = None,
        env: Mapping[str, str] | None = None,
    ):
        """`client` is used as given (its base_url must point at the API root); `env` defaults
        to `os.environ` and is read at `start` for `api_key_env`."""
        self.config = config
        self._client = client
        self._owns_client = client is None
        self._env = os.environ if env is None else env
        self._headers: dict[str, str] = {}
        self.info = EngineInfo(
            model=config.model,
            context_window=config.context_window,
            supports_logprobs=True,
            max_concurrency=config.max_connections,
        )

    async def start(self) -> None:
        name = self.config.api_key_env
        if name is not None:
            key = self._env.get(name)
            if not key:
                raise EngineError(
                    f"remote engine for {self.config.base_url}: environment variable {name} "
                    "(api_key_env) is not set; export it or remove api_key_env"
                )
            self._headers = {"Authorization": f"Bearer {key}"}
        if self._client is None:
            timeout_s = self.config.timeout_s
            self._client = httpx.AsyncClient(
                base_url=self.config.base_url.rstrip("/") + "/",
                timeout=httpx.Timeout(timeout_s, connect=min(10.0, timeout_s)),
                limits=httpx.Limits(
                    max_connections=self.config.max_connections,
                    max_keepalive_connections=self.config.max_connections,
                ),
            )

    async def close(self) -> None:
        if self._owns_client and self._client is not None:
            await self._client.aclose()
            self._client = None

    def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        if self._client is None:
            raise EngineError("remote engine: call start() before generate()")
        if (request.messages is None) == (request.prompt is None):
            raise ValueError("GenerationRequest needs exactly one of `messages` or `prompt`")
        return self._stream(request)

    def _body(self, request: GenerationRequest) -> tuple[str, dict[str, Any]]:
        p = request.params
        body: dict[str, Any] = {
            "model": self.config.model,
            "stream": True,
            "stream_options": {"include_usage": True},
            "temperature": p.temperature,
            "top_p": p.top_p,
        }
        if p.max_tokens is not None:
            body["max_tokens"] = p.max_tokens
        if p.stop:
            body["stop"] = list(p.stop)
        if p.seed is not None:
            body["seed"] = p.seed
        if request.messages is not None:
            body["messages"] = [_message(m) for m in request.messages]
            if request.tools is not None:  # passed through; calls come back as text (below)
                body.update(request.tools.openai())
            upstream_format = p.response_format and p.response_format.openai()
            if upstream_format:  # passed through; the gateway checks the answer
                body["response_format"] = upstream_format
            if p.logprobs is not None:
                body["logprobs"] = True
                body["top_logprobs"] = p.logprobs
            return "chat/completions", body
        body["prompt"] = request.prompt
        if p.logprobs is not None:
            body["logprobs"] = p.logprobs
        return "completions", body

    async def _stream(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        path, body = self._body(request)
        chat = request.messages is not None
        finish, usage, pieces, done = None, None, 0, False
        calls: dict[int, dict[str, str]] = {}  # streamed tool calls by index: name, arguments
        try:
            async with self._client.stream("POST", path, json=body, headers=self._headers) as resp:
                if resp.status_code >= 400:
                    raise await _error(resp)
                async for event in _sse_events(resp):
                    if event is DONE:
                        done = True
                        break
                    if "error" in event:
                        raise EngineError(f"upstream stream error: {_bounded(event['error'])}")
                    if event.get("usage"):
                        usage = event["usage"]
                    for choice in event.get("choices") or ():
                        _gather_calls(choice, calls)
                        text, logprobs = _choice_delta(choice, chat)
                        if text or logprobs:
                            pieces += 1
                            yield Delta(text, (), logprobs)
                        if choice.get("finish_reason"):
                            finish = choice["finish_reason"]
        except httpx.TimeoutException as e:
            url = self.config.base_url
            raise EngineError(f"upstream {url} timed out: {type(e).__name__}") from e
        except httpx.HTTPError as e:
            url = self.config.base_url
            raise EngineError(f"upstream {url} failed: {type(e).__name__}: {e}") from e
        if finish is None and not done:
            raise EngineError("upstream stream ended without [DONE] or a finish_reason: cut")
        usage = usage or {}
        yield Delta(
            "\n".join(call_text(c["name"], c["arguments"]) for _, c in sorted(calls.items())),
            finish_reason="length" if finish == "length" else "stop",
            prompt_tokens=usage.get("prompt_tokens"),
            completion_tokens=usage.get("completion_tokens", pieces),
            finish_assumed=finish is None,  # [DONE] with no finish_reason: taken as "stop"
        )


def _message(m: Message) -> dict[str, Any]:
    """A history message as OpenAI's API takes it."""
    out: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.tool_calls:
        out["tool_calls"] = [c.openai() for c in m.tool_calls]
        out["content"] = m.content or None
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    return out


def _gather_calls(choice: dict[str, Any], calls: dict[int, dict[str, str]]) -> None:
    """Accumulate a streamed choice's `delta.tool_calls` pieces, as the OpenAI SDK does."""
    for piece in (choice.get("delta") or {}).get("tool_calls") or ():
        fn = piece.get("function", {}) if isinstance(piece, dict) else None
        if not isinstance(fn, dict):
            raise EngineError("upstream sent a malformed tool call: `function` is "
                              f"{type(fn).__name__ if piece is not None else 'missing'}, not "
                              "an object")  # no arguments: they may be an answer
        call = calls.setdefault(piece.get("index", len(calls)), {"name": "", "arguments": ""})
        call["name"] += fn.get("name") or ""
        call["arguments"] += fn.get("arguments") or ""


DONE: dict[str, Any] = {}  # `_sse_events` yields this very object for `data: [DONE]`


async def _sse_events(resp: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    """The JSON payloads of `data:` lines, then `DONE` for `[DONE]` (events are one line each
    here)."""
    async for line in resp.aiter_lines():
        if not line.startswith("data:"):
            continue  # blank separators, comments (": ping"), `event:` and `id:` fields
        data = line[5:].strip()
        if data == "[DONE]":
            yield DONE
            return
        if not data:
            continue
        try:
            yield json.loads(data)
        except json.JSONDecodeError as e:
            raise EngineError(f"upstream sent invalid JSON in an event ({len(data)} characters; "
                              f"{e.msg} at {e.pos})") from e  # no text: it may be an answer


def _choice_delta(
    choice: dict[str, Any], chat: bool
) -> tuple[str, tuple[TokenLogprob, ...] | None]:
    """The text and logprobs of one streamed choice, chat or completion shape."""
    if chat:
        text = (choice.get("delta") or {}).get("content") or ""
        content = (choice.get("logprobs") or {}).get("content")
        if content is None:
            return text, None
        return text, tuple(
            TokenLogprob(
                c["token"],
                float(c["logprob"]),
                tuple((t["token"], float(t["logprob"])) for t in c.get("top_logprobs") or ()),
            )
            for c in content
        )
    text = choice.get("text") or ""
    lp = choice.get("logprobs")
    if not lp or not lp.get("tokens"):
        return text, None
    tops = lp.get("top_logprobs") or [None] * len(lp["tokens"])
    return text, tuple(
        TokenLogprob(
            tok,
            float(value if value is not None else 0.0),
            tuple(sorted(((t, float(v)) for t, v in (top or {}).items()), key=lambda x: -x[1])),
        )
        for tok, value, top in zip(lp["tokens"], lp["token_logprobs"], tops, strict=False)
    )


async def _error(resp: httpx.Response) -> Exception:
    raw = b""
    async for chunk in resp.aiter_bytes():
        raw += chunk
        if len(raw) > 16_384:
            break
    text = raw.decode("utf-8", "replace")
    try:
        message = json.loads(text)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = text
    message = str(message)
    if resp.status_code == 400 and (m := _CONTEXT.search(message)):
        window, total, prompt = map(int, m.groups())
        return PromptTooLong(prompt, total - prompt, window)
    return UpstreamError(resp.status_code, _bounded(message))


def _bounded(value: object) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= MAX_ERROR_CHARS else text[:MAX_ERROR_CHARS] + "…"
