"""OpenAI response bodies and server-sent events, built from engine `Delta`s.

`chat_completion` / `completion` turn whole choices (one merged `Delta` each, see `merge_deltas`)
into the JSON object of a non-streamed answer. `sse_stream` turns batches of `(choice index, Delta)`
into `data: {chunk}\\n\\n` events ending with `data: [DONE]\\n\\n`; `sse_error` is the event for an
error after the response headers were sent. `models_list` / `model_card` answer `/v1/models`.

A request with tools (`tool_names`) has each answer read for calls (`serving.engines.tools`):
they become `message.tool_calls` (streamed: one `delta.tool_calls` entry per whole call) with finish reason
`tool_calls`; text beside them stays `content`.

Usage counts the prompt once (the `n` choices share it) and sums completion tokens over choices.
Logprobs that JSON cannot carry (-inf, NaN) become -9999.0, OpenAI's "very unlikely". A
label-constrained choice asked with logprobs also carries `label_probs` (`{label: probability}`,
an extension field; streamed, on the choice's last chunk).

Pure: no clock, no ids (the caller passes `ResponseMeta`), no I/O beyond the iterator it is given.
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

from core.errors import OpenAIError
from serving.engines.base import Delta, TokenLogprob
from serving.engines.tools import CallStream, ToolCall, read_calls

DONE = b"data: [DONE]\n\n"
VERY_UNLIKELY = -9999.0

_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def dumps(obj: Any) -> bytes:
    """Compact UTF-8 JSON, the encoding of every body and event here (lone surrogates -> '?')."""
    return _encode(obj).encode("utf-8", "replace")


@dataclass(frozen=True, slots=True)
class ResponseMeta:
    id: str  # "chatcmpl-<hex>" or "cmpl-<hex>"
    created: int  # unix seconds
    model: str  # what the client asked for (the route name)
    system_fingerprint: str | None = None  # e.g. the student version; omitted when None


def _head(meta: ResponseMeta, obj: str) -> dict[str, Any]:
    head: dict[str, Any] = {
        "id": meta.id,
        "object": obj,
        "created": meta.created,
        "model": meta.model,
    }
    if meta.system_fingerprint is not None:
        head["system_fingerprint"] = meta.system_fingerprint
    return head


def _lp(x: float) -> float:
    x = float(x)
    return x if math.isfinite(x) and x >= VERY_UNLIKELY else VERY_UNLIKELY


def _utf8(token: str) -> list[int]:
    return list(token.encode("utf-8", "surrogatepass"))


def chat_logprobs(logprobs: Iterable[TokenLogprob] | None) -> dict[str, Any] | None:
    """Chat format: `{"content": [{token, logprob, bytes, top_logprobs}], "refusal": null}`."""
    if logprobs is None:
        return None
    content = [
        {
            "token": t.token,
            "logprob": _lp(t.logprob),
            "bytes": _utf8(t.token),
            "top_logprobs": [
                {"token": tok, "logprob": _lp(lp), "bytes": _utf8(tok)} for tok, lp in t.top
            ],
        }
        for t in logprobs
    ]
    return {"content": content, "refusal": None}


def completion_logprobs(
    logprobs: Iterable[TokenLogprob] | None, offset: int = 0
) -> dict[str, Any] | None:
    """Legacy format: `{tokens, token_logprobs, top_logprobs, text_offset}`.

    Each `top_logprobs` entry maps the sampled token and the alternatives to their logprobs.
    `offset` is where the first token starts in the choice's text (for stream chunks).
    """
    if logprobs is None:
        return None
    tokens, values, tops, offsets = [], [], [], []
    for t in logprobs:
        tokens.append(t.token)
        values.append(_lp(t.logprob))
        top = {t.token: _lp(t.logprob)}
        for tok, lp in t.top:
            top.setdefault(tok, _lp(lp))
        tops.append(top)
        offsets.append(offset)
        offset += len(t.token)
    return {
        "tokens": tokens,
        "token_logprobs": values,
        "top_logprobs": tops,
        "text_offset": offsets,
    }


def usage(prompt_tokens: int | None, completion_tokens: Iterable[int]) -> dict[str, int]:
    prompt = prompt_tokens or 0
    completion = sum(completion_tokens)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _completion_tokens(d: Delta) -> int:
    return d.completion_tokens if d.completion_tokens is not None else len(d.token_ids)


def _prompt_tokens(choices: Iterable[Delta]) -> int | None:
    return next((d.prompt_tokens for d in choices if d.prompt_tokens is not None), None)


def _message(meta: ResponseMeta, i: int, d: Delta, tool_names: tuple[str, ...] | None
             ) -> tuple[dict[str, Any], str]:
    """A whole choice's message and finish reason."""
    finish = d.finish_reason or "stop"
    if tool_names is None:
        return {"role": "assistant", "content": d.text, "refusal": None}, finish
    content, calls = read_calls(d.text, tool_names, meta.id, i)
    message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
    if calls:
        message["tool_calls"] = [c.openai() for c in calls]
    return message, "tool_calls" if calls and finish == "stop" else finish


def chat_completion(meta: ResponseMeta, choices: list[Delta],
                    tool_names: tuple[str, ...] | None = None) -> dict[str, Any]:
    """`CreateChatCompletionResponse` from whole choices, choice i at `choices[i]`."""
    body = _head(meta, "chat.completion")
    body["choices"] = []
    for i, d in enumerate(choices):
        message, finish = _message(meta, i, d, tool_names)
        body["choices"].append({"index": i, "message": message,
                                "logprobs": chat_logprobs(d.logprobs), "finish_reason": finish,
                                **_label_probs(d)})
    body["usage"] = usage(_prompt_tokens(choices), map(_completion_tokens, choices))
    return body


def completion(meta: ResponseMeta, choices: list[Delta]) -> dict[str, Any]:
    """`CreateCompletionResponse` (object "text_completion") from whole choices."""
    body = _head(meta, "text_completion")
    body["choices"] = [
        {
            "text": d.text,
            "index": i,
            "logprobs": completion_logprobs(d.logprobs),
            "finish_reason": d.finish_reason or "stop",
            **_label_probs(d),
        }
        for i, d in enumerate(choices)
    ]
    body["usage"] = usage(_prompt_tokens(choices), map(_completion_tokens, choices))
    return body


def _label_probs(d: Delta | None) -> dict[str, Any]:
    """A label-constrained choice's `label_probs` field, when the engine gave them."""
    return {"label_probs": d.label_probs} if d is not None and d.label_probs else {}


def sse_error(err: OpenAIError) -> bytes:
    """The event for an error once streaming has begun; the stream ends after it (no [DONE])."""
    return b"data: " + dumps(err.body()) + b"\n\n"


class _Choice:
    """What the stream remembers about one choice."""

    __slots__ = ("started", "finished", "tokens", "final_tokens", "offset", "calls")

    def __init__(self, calls: CallStream | None = None) -> None:
        self.calls = calls  # reads tool calls out of the text (requests with tools)
        self.started = False
        self.finished = False
        self.tokens = 0  # token ids seen so far
        self.final_tokens: int | None = None  # the count the last delta reported
        self.offset = 0  # characters sent so far (legacy logprobs text_offset)

    @property
    def completion_tokens(self) -> int:
        return self.final_tokens if self.final_tokens is not None else self.tokens


async def sse_stream(
    kind: Literal["chat", "completion"],
    meta: ResponseMeta,
    batches: AsyncIterator[list[tuple[int, Delta]]],
    n: int,
    include_usage: bool,
    on_delta: Callable[[int, Delta], None] | None = None,
    tool_names: tuple[str, ...] | None = None,
) -> AsyncIterator[bytes]:
    """SSE bytes for a streamed answer; one `bytes` per batch (one event per choice in it).

    Chat: each choice opens with `delta: {"role": "assistant", "content": ""}`. Deltas with no
    text, logprobs or finish_reason are not sent. Each choice gets exactly one finish_reason, on
    its last chunk (a choice the batches never finished gets "stop" when they end). With
    `include_usage`, every chunk has `"usage": null` and a last chunk with `choices: []` carries
    the usage. Then `data: [DONE]`.

    Nothing is yielded before the first batch arrives, so an exception raised by `batches` before
    that reaches the caller from the first `__anext__` (it can still answer with a JSON error). An
    `OpenAIError` raised later becomes an `sse_error` event and ends the stream; any other exception
    propagates. `batches` is closed when the stream stops early, so the engine aborts at once.
    `on_delta(index, delta)` sees every delta as it arrives (for metrics). With `tool_names`,
    text that may open a call is held until the call closes; each call is then one chunk, and
    the choice ends with an empty delta and finish reason `tool_calls`.
    """
    chat = kind == "chat"
    head = dumps(_head(meta, "chat.completion.chunk" if chat else "text_completion"))[:-1]
    prefix = b"data: " + head + b',"choices":['
    suffix = b'],"usage":null}\n\n' if include_usage else b"]}\n\n"
    state = [_Choice(CallStream(tool_names, meta.id, i) if chat and tool_names is not None
                     else None) for i in range(n)]
    prompt_tokens: int | None = None

    def event(choice: dict[str, Any]) -> bytes:
        return prefix + dumps(choice) + suffix

    def chunk(i: int, d: Delta | None, finish: str | None) -> bytes:
        """One choice's chunk; `d` None: the empty closing delta."""
        c = state[i]
        text = d.text if d is not None else ""
        lps = d.logprobs if d is not None else None
        if chat:
            body: dict[str, Any] = {
                "index": i,
                "delta": {"content": text} if text else {},
                "logprobs": chat_logprobs(lps),
                "finish_reason": finish,
                **_label_probs(d),
            }
        else:
            body = {
                "text": text,
                "index": i,
                "logprobs": completion_logprobs(lps, c.offset),
                "finish_reason": finish,
                **_label_probs(d),
            }
        c.offset += len(text)
        return event(body)

    def call_chunk(i: int, k: int, call: ToolCall) -> bytes:
        entry = {"index": k, **call.openai()}
        return event({"index": i, "delta": {"tool_calls": [entry]}, "logprobs": None,
                      "finish_reason": None})

    def with_calls(i: int, piece: Delta, finish: str | None) -> bytes:
        """A tool-use choice's chunks: content and calls in order, then the finish."""
        c, out = state[i], bytearray()
        made = c.calls.calls
        items = c.calls.push(piece.text) + (c.calls.flush() if finish is not None else [])
        lps = piece.logprobs
        for item in items:
            if isinstance(item, str):
                out += chunk(i, Delta(item, logprobs=lps), None)
            else:
                out += call_chunk(i, made, item)
                made += 1
            lps = None
        if lps:
            out += chunk(i, Delta("", logprobs=lps), None)
        if finish is not None:
            out += chunk(i, None, "tool_calls" if made and finish == "stop" else finish)
        return bytes(out)

    def opening(i: int) -> bytes:
        state[i].started = True
        if not chat:
            return b""
        return event(
            {
                "index": i,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
        )

    def render(batch: list[tuple[int, Delta]]) -> bytes:
        nonlocal prompt_tokens
        merged: dict[int, list[Delta]] = {}
        for i, d in batch:
            if on_delta is not None:
                on_delta(i, d)
            if 0 <= i < n and not state[i].finished:
                merged.setdefault(i, []).append(d)
        out = bytearray()
        for i, ds in merged.items():
            c, last = state[i], ds[-1]
            text = "".join(d.text for d in ds)
            lps = [t for d in ds if d.logprobs is not None for t in d.logprobs]
            c.tokens += sum(len(d.token_ids) for d in ds)
            if last.completion_tokens is not None:
                c.final_tokens = last.completion_tokens
            if prompt_tokens is None:
                prompt_tokens = _prompt_tokens(ds)
            piece = Delta(text, logprobs=tuple(lps) if lps else None,
                          label_probs=last.label_probs)
            if not c.started:
                out += opening(i)
            if c.calls is not None:
                c.finished = last.finish_reason is not None
                out += with_calls(i, piece, last.finish_reason)
            elif last.finish_reason is not None:
                c.finished = True
                out += chunk(i, piece, last.finish_reason)
            elif text or lps:
                out += chunk(i, piece, None)
        return bytes(out)

    yielded = False
    try:
        async for batch in batches:
            out = render(batch)
            if out:
                yielded = True
                yield out
    except OpenAIError as err:
        if not yielded:
            raise
        yield sse_error(err)
        return
    finally:  # stopped early (client gone, error): let the engine abort now, not at GC
        aclose = getattr(batches, "aclose", None)
        if aclose is not None:
            await aclose()

    tail = bytearray()
    for i, c in enumerate(state):
        if not c.started:
            tail += opening(i)
        if not c.finished:
            c.finished = True
            if c.calls is not None:
                tail += with_calls(i, Delta(""), "stop")
            else:
                tail += chunk(i, None, "stop")
    if include_usage:
        totals = usage(prompt_tokens, (c.completion_tokens for c in state))
        tail += b"data: " + head + b',"choices":[],"usage":' + dumps(totals) + b"}\n\n"
    tail += DONE
    yield bytes(tail)


def model_card(id: str, created: int, owned_by: str = "protege",
               extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """`Model` for `/v1/models/{id}`, with `extra` fields after OpenAI's."""
    return {"id": id, "object": "model", "created": created, "owned_by": owned_by,
            **(extra or {})}


def models_list(routes: list[tuple[str, int, dict[str, Any]]],
                owned_by: str = "protege") -> dict[str, Any]:
    """`ListModelsResponse` for `/v1/models` from `(route name, created, extra)` triples."""
    return {"object": "list", "data": [model_card(r, t, owned_by, x) for r, t, x in routes]}
