"""The HTTP front door of the gateway: OpenAI protocol, auth, limits, metrics and logs.

`Ingress` reads a request, picks its route's A/B arm (`serving.router`), forwards it to that
variant's replicas (`serving.variant`), or to the variant it serves itself (`in_ingress`),
and answers, whole or streamed. Each request is a `Call` reported once when it ends
(`serving.reporting`: metrics, the canonical log line, its feedback row and mirrored pair,
which leave through `serving.outbox`). `/review` is `serving.review`'s;
`/v1/feedback` goes to the shadow worker.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from core.errors import OpenAIError, clip
from core.logging import configure_logging, get_logger
from core.metrics import GatewayMetrics, MetricsReporter
from serving import protocol, responses
from serving.accounting import RequestTally
from serving.auth import bearer_key_ok, checked_hosts, host_allowed, host_error
from serving.config import ServerConfig, VariantConfig
from serving.engines.base import Delta, EngineError, PromptTooLong, Unsupported
from serving.outbox import ShadowOutbox
from serving.reporting import Call, CallReporter
from serving.review import ReviewSite
from serving.router import RouteTarget, ShadowPlan, sample, sticky_key, user_key
from serving.variant import InIngress
from shadow.config import FeedbackMetric, ShadowSettings
from shadow.feedback import parse_feedback
from shadow.ledger import Ledger
from shadow.store import open_store


@dataclass(frozen=True)
class IngressParams:
    server: ServerConfig
    api_keys: tuple[str, ...]
    routes: dict[str, RouteTarget]
    shadows: dict[str, ShadowPlan]  # by route; routes without a shadow are absent
    feedback: dict[str, FeedbackMetric]  # metrics clients may post; empty: no feedback
    mirror_budget: int  # mirrors unfinished by the teacher per replica; more are dropped
    ledger_dir: str  # where sampled and dropped pairs are noted (`shadow.ledger`)
    run: str  # this gateway run's id
    log_level: str
    json_logs: bool
    log_prompts: bool
    created: int
    store: ShadowSettings  # where the review page reads pairs and writes labels
    repo_root: str  # what a relative store path is relative to
    in_ingress: dict[str, VariantConfig]  # variants served in this process, not by a handle


class Ingress:
    """The HTTP front door: OpenAI protocol, auth, limits, metrics and logs."""

    async def __init__(self, params: IngressParams, variants: dict[str, DeploymentHandle],
                       shadow: DeploymentHandle | None = None):
        configure_logging(params.log_level, params.json_logs)
        self.p = params
        self.variants = variants
        self.local = {name: await InIngress.start(name, config, params.log_level,
                                                  params.json_logs, params.repo_root)
                      for name, config in params.in_ingress.items()}
        self.shadow = shadow
        self.log = get_logger("serving.ingress")
        self.metrics = GatewayMetrics()
        self.reporter = MetricsReporter(
            self.metrics.registry, f"ingress:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        )
        self.reporter.start()
        self._keys = tuple(k.encode() for k in params.api_keys)
        # Key-less on loopback: only loopback or allowed Host names (`serving.auth`).
        self._hosts = checked_hosts(params.server.host, bool(params.api_keys),
                                    params.server.allowed_hosts)
        self._unknown_logged: set[str] = set()
        self.ledger = (Ledger(params.ledger_dir, params.run, f"ingress-{os.getpid()}-"
                              f"{uuid.uuid4().hex[:6]}", on_error=self._ledger_failed)
                       if params.shadows else None)
        self.outbox = (ShadowOutbox(shadow, self.metrics, self.ledger, self.log,
                                    params.mirror_budget, flush_responses=bool(params.feedback))
                       if shadow is not None else None)
        self.calls = CallReporter(self.metrics, self.log, self.outbox, bool(params.feedback))
        self.review = None
        if params.server.review:
            self.review = ReviewSite(
                lambda: open_store(params.store, Path(params.repo_root)), params.api_keys,
                params.store.redaction.redactor(),
                secure_cookie=params.server.review_secure_cookie)

    async def __call__(self, request: Request) -> Response:
        path, method = request.url.path.rstrip("/") or "/", request.method
        try:
            if self._hosts is not None and not host_allowed(request.headers.get("host"),
                                                            self._hosts):
                raise host_error(request.headers.get("host"))
            if path == "/health":
                return JSONResponse({"status": "ok"})
            if path == "/metrics":
                if self.p.server.metrics_require_key:
                    self._authorize(request)
                text = await self.reporter.render()
                return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")
            if self.review is not None and (path == "/review" or path.startswith("/review/")):
                return await self.review.handle(request)  # its own auth: a key or its cookie
            self._authorize(request)
            if path in ("/v1/chat/completions", "/v1/completions"):
                _require_method(method, "POST")
                kind = "chat" if path.endswith("chat/completions") else "completion"
                return await self._generate(request, kind)
            if path == "/v1/feedback":
                _require_method(method, "POST")
                return await self._feedback(request)
            if path == "/v1/models":
                _require_method(method, "GET")
                return JSONResponse(responses.models_list(
                    [(r, self.p.created, self._card(r)) for r in self.p.routes]))
            if path.startswith("/v1/models/"):
                _require_method(method, "GET")
                name = path.removeprefix("/v1/models/")
                if name not in self.p.routes:
                    raise OpenAIError.not_found_model(name)
                return JSONResponse(responses.model_card(name, self.p.created,
                                                         extra=self._card(name)))
            raise OpenAIError(
                404, f"Unknown path {path!r}.", type="invalid_request_error",
                code="unknown_url",
            )
        except OpenAIError as e:
            self.metrics.rejections.labels(reason=str(e.status)).inc()
            return _error_response(e)

    def _card(self, route: str) -> dict:
        """What `/v1/models` adds to OpenAI's fields: each arm's sampling defaults."""
        arms = self.p.routes[route].arms
        return {"sampling_defaults": {a.variant: a.sampling.card() for a in arms}}

    # -- requests ---------------------------------------------------------------------------

    def _authorize(self, request: Request) -> None:
        if not self._keys:
            return
        if not bearer_key_ok(request.headers.get("authorization", ""), self._keys):
            raise OpenAIError.unauthorized()

    async def _read_body(self, request: Request) -> bytes:
        ctype = request.headers.get("content-type", "")
        is_json = ctype.split(";")[0].strip().lower() == "application/json"
        if ctype and not is_json:
            raise OpenAIError.unsupported_media_type(ctype)
        limit = self.p.server.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise OpenAIError.body_too_large(limit)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise OpenAIError.body_too_large(limit)
        if not is_json:  # no Content-Type: no body is a 400 (like OpenAI), an untyped one 415
            if body:
                raise OpenAIError.unsupported_media_type(ctype)
            raise OpenAIError.invalid_json("the body is empty")
        return bytes(body)

    async def _generate(self, request: Request, kind: str) -> Response:
        started = time.monotonic()
        try:
            body = await self._read_body(request)
            req = protocol.parse_request(kind, body)
            self._log_unknown_fields(req)
            target = self.p.routes.get(req.model)
            if target is None:
                raise OpenAIError.not_found_model(req.model)
            for field in ("response_format", "tool_use"):
                if target.choice is not None and getattr(req, field, None) is not None:
                    param = "tools" if field == "tool_use" else field
                    raise OpenAIError.invalid_value(param, (
                        f"Invalid '{param}': the route {target.route!r} answers with exactly "
                        f"one of its labels; omit '{param}'."))
        except OpenAIError as e:  # refused before a route was known: counted under route "-"
            self.metrics.requests.labels(route="-", variant="-", status=str(e.status)).inc()
            self.log.info(
                "serving.request.completed", route="-", variant="-", status=e.status,
                code=e.code, param=e.param,
                latency_ms=round((time.monotonic() - started) * 1000, 2),
            )
            raise
        request_id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        user = user_key(request.headers.get("x-session-id"), req.user)
        key, key_kind = sticky_key(user, target, request_id)
        arm = target.choose(key)
        meta = responses.ResponseMeta(
            id=request_id, created=int(time.time()), model=req.model,
            system_fingerprint=f"{arm.variant}:{arm.version}",
        )
        gen_requests = req.to_generation_requests(request_id, arm.sampling, target.choice)
        call = Call(target, arm, key_kind, request_id, req.stream,
                    gen_requests[0].params.response_format, RequestTally(started, arm.version))
        plan = self.p.shadows.get(target.route)
        if plan is not None and self.outbox is not None:
            sample_by = user[0] if plan.sample_key == "user" and user else request_id
            if sample(plan.rate, sample_by, f"{target.route}:shadow"):
                call.mirror = (plan, gen_requests[0])
                call.created_at = datetime.now(UTC).isoformat()
        if self.p.log_prompts:
            call.prompt = gen_requests[0].prompt or [
                {"role": m.role, "content": m.content} for m in gen_requests[0].messages or ()]
        call.tally.keep_text = bool(call.mirror or call.prompt is not None or call.format)
        self.metrics.in_flight.labels(**call.labels).inc()
        local, handle = self.local.get(arm.variant), self.variants.get(arm.variant)
        timeout = self.p.server.request_timeout_s
        headers = {"x-request-id": request_id, "x-protege-variant": arm.variant,
                   "x-protege-version": arm.version}
        try:
            if not req.stream:
                pending = (local.complete(gen_requests) if local is not None
                           else handle.complete.remote(gen_requests))
                try:
                    choices = await asyncio.wait_for(_await(pending), timeout)
                except TimeoutError:
                    pending.cancel()
                    raise OpenAIError.timeout(timeout) from None
                except asyncio.CancelledError:
                    pending.cancel()  # the client went away: stop its generation
                    raise
                version = call.tally.served_by(c.model_version for c in choices)
                meta = replace(meta, system_fingerprint=f"{arm.variant}:{version}")
                headers["x-protege-version"] = version
                if kind == "chat":
                    body_out = responses.chat_completion(meta, choices, _tool_names(req))
                else:
                    body_out = responses.completion(meta, choices)
                self.calls.finish(call, 200, choices)
                if call.format is not None:  # does every choice conform? (a remote may not)
                    headers["x-protege-format-valid"] = str(call.format_valid).lower()
                return JSONResponse(body_out, headers=headers)
            stream = (local.stream(gen_requests) if local is not None
                      else handle.options(stream=True).stream.remote(gen_requests))
            try:
                first = await asyncio.wait_for(stream.__anext__(), timeout)
            except TimeoutError:
                stream.cancel()
                raise OpenAIError.timeout(timeout) from None
            except StopAsyncIteration:
                first = []
            version = call.tally.served_by(d.model_version for _, d in first)
            meta = replace(meta, system_fingerprint=f"{arm.variant}:{version}")
            headers["x-protege-version"] = version
            events = self._sse(kind, meta, req, call, first, stream, started + timeout)
            return StreamingResponse(
                events, media_type="text/event-stream",
                headers={**headers, "cache-control": "no-cache", "x-accel-buffering": "no"},
            )
        except OpenAIError as e:
            self.calls.finish(call, e.status)
            raise
        except PromptTooLong as e:
            self.calls.finish(call, 400)
            # from the fields: a replica's error, re-raised by Ray, also carries its traceback
            message = PromptTooLong(e.prompt_tokens, e.max_tokens, e.context_window).args[0]
            raise OpenAIError.context_length_exceeded(message, req.PROMPT_PARAM) from None
        except Unsupported as e:
            self.calls.finish(call, 400)
            raise OpenAIError.invalid_value(e.param, e.message) from None
        except BackPressureError:
            self.calls.finish(call, 503)
            raise OpenAIError.busy(self.p.server.retry_after_s) from None
        except EngineError as e:
            self.calls.finish(call, 502)
            self.log.warning("serving.backend.failed", request_id=request_id, error=str(e))
            raise _backend_error() from None
        except asyncio.CancelledError:
            self.calls.finish(call, 499)
            raise
        except Exception as e:
            self.calls.finish(call, 500)
            self.log.exception("serving.request.failed", request_id=request_id)
            raise OpenAIError(500, f"Internal error: {type(e).__name__}", type="server_error",
                              code="internal_error") from None

    async def _sse(self, kind, meta, req, call, first, stream, deadline) -> AsyncIterator[bytes]:
        async def batches() -> AsyncIterator[list[tuple[int, Delta]]]:
            if first:
                yield first
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                try:
                    batch = await asyncio.wait_for(stream.__anext__(), left)
                except StopAsyncIteration:
                    return
                yield batch

        status = 200
        try:
            async for chunk in responses.sse_stream(
                kind, meta, batches(), req.n, req.include_usage,
                on_delta=lambda index, delta: self.calls.delta(call, index, delta),
                tool_names=_tool_names(req),
            ):
                yield chunk
        except TimeoutError:
            status = 408
            yield responses.sse_error(OpenAIError.timeout(self.p.server.request_timeout_s))
        except EngineError as e:
            status = 502
            self.log.warning("serving.backend.failed", request_id=call.request_id, error=str(e))
            yield responses.sse_error(_backend_error())
        except asyncio.CancelledError:
            status = 499
            raise
        except Exception as e:  # noqa: BLE001 - after the headers: an error event, a 500
            status = 500  # counted as one, and the cut answer is not mirrored as a pair
            self.log.error("serving.request.failed", request_id=call.request_id,
                           error=repr(e)[:300])
            yield responses.sse_error(OpenAIError(500, f"Internal error: {type(e).__name__}",
                                                  type="server_error", code="internal_error"))
        finally:
            stream.cancel()
            self.calls.finish(call, status)

    def _ledger_failed(self, error: OSError) -> None:
        self.metrics.ledger_errors.inc()
        self.log.warning("shadow.ledger.write_failed", error=repr(error)[:300])

    # -- feedback ---------------------------------------------------------------------------

    async def _feedback(self, request: Request) -> Response:
        post = parse_feedback(await self._read_body(request), self.p.feedback)
        await self.outbox.flush_responses()  # a response this replica answered is known first
        try:
            async with asyncio.timeout(30):
                result = await self.shadow.feedback.remote(post, datetime.now(UTC).isoformat())
        except Exception as e:  # noqa: BLE001 - the worker is busy or down: the client retries
            self.log.warning("feedback.worker_unavailable", error=str(e)[:300])
            result = {"error": "worker_unavailable"}
        if result.get("error") == "unknown_response":
            raise OpenAIError(
                404, f"No response with id {clip(post.response_id, 100)!r} was answered by this "
                "gateway on a route with feedback.", "not_found_error", "response_id",
                "response_not_found")
        if "error" in result:
            raise OpenAIError.busy(self.p.server.retry_after_s)
        return JSONResponse({"id": result["id"], "object": "feedback",
                             "response_id": post.response_id, "metric": post.metric,
                             "created": int(time.time())})

    def _log_unknown_fields(self, req) -> None:
        for name in protocol.unknown_fields(req):
            if name not in self._unknown_logged and len(self._unknown_logged) < 1000:
                self._unknown_logged.add(name)
                self.log.info("serving.request.field_ignored", field=name)

    async def __del__(self) -> None:
        if self.outbox is not None:
            await self.outbox.close()  # what waited for a batch goes now (or is counted)
        if self.ledger is not None:
            self.ledger.close()
        for local in self.local.values():
            await local.close()
        await self.reporter.stop()


def _tool_names(req) -> tuple[str, ...] | None:
    """The functions a chat request lets the model call; None when it may call none."""
    use = getattr(req, "tool_use", None)
    return None if use is None else tuple(t.name for t in use.tools)


async def _await(response):
    return await response


def _backend_error() -> OpenAIError:
    return OpenAIError(502, "The model backend failed; see the gateway log.",
                       type="server_error", code="backend_error")


def _require_method(method: str, allowed: str) -> None:
    if method != allowed:
        raise OpenAIError(405, f"Method {method} is not allowed here; use {allowed}.",
                          type="invalid_request_error", code="method_not_allowed",
                          headers={"Allow": allowed})  # RFC 9110: a 405 lists the allowed methods


def _error_response(e: OpenAIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)
