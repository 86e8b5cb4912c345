"""The Ray Serve application: one ingress deployment and one deployment per model variant.

`Ingress` speaks HTTP (OpenAI protocol, auth, limits, metrics, the canonical log line) and
forwards each request to the variant of its route's A/B arm (`serving.router`: sticky per user or
session). `VariantServer` owns one loaded engine and runs the `n` choices of a request.
`build_app` wires them from `Settings`; `serving.launch` runs the process around them.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from ops.logging import configure_logging, get_logger
from ops.metrics import GatewayMetrics, MetricsReporter, VariantMetrics
from ops.priority import lower_priority
from serving import protocol, responses
from serving.auth import bearer_key_ok, checked_hosts, host_allowed, host_error
from serving.config import ServerConfig, VariantConfig
from serving.defaults import SamplingDefaults, sampling_defaults
from serving.engines import build_engine
from serving.engines.base import (
    Delta,
    EngineError,
    GenerationRequest,
    PromptTooLong,
    Unsupported,
    merge_deltas,
)
from serving.errors import OpenAIError, clip
from serving.structured import ResponseFormat, check_answer, choice_of
from serving.review import ReviewSite
from serving.router import choose_arm, sample
from shadow.config import FeedbackMetric, ShadowSettings
from shadow.feedback import parse_feedback
from shadow.ledger import Ledger
from shadow.mirror import MirrorJob, teacher_key
from shadow.records import Answer, ResponseRecord
from shadow.store import open_store

APP_NAME = "protege"
# Ray Serve's own access lines would triple the per-request log work; ours is the canonical one.
SERVE_LOGGING = {"enable_access_log": False}
MIRROR_BATCH = 64  # mirrored jobs per call to the shadow worker, at most
MIRROR_LINGER_S = 0.1  # how long a job waits for others to share its call
RESPONSE_FLUSH_S = 0.5  # answered responses go to the shadow worker in batches this often
RESPONSE_BATCH = 512  # or as soon as this many are waiting


@dataclass(frozen=True)
class Arm:
    variant: str
    version: str
    weight: float
    sampling: SamplingDefaults = SamplingDefaults()  # for requests that omit temperature/top_p


@dataclass(frozen=True)
class RouteTarget:
    route: str
    arms: tuple[Arm, ...]  # in config order: the order is part of the split
    sticky_key: str = "user"
    choice: ResponseFormat | None = None  # a label-constrained route: one label per answer

    def choose(self, key: str) -> Arm:
        """The arm for `key` (a session, user or request id): the same key, the same arm."""
        if len(self.arms) == 1:
            return self.arms[0]
        variant = choose_arm([(a.variant, a.weight) for a in self.arms], key, self.route)
        return next(a for a in self.arms if a.variant == variant)


@dataclass(frozen=True)
class ShadowPlan:
    target: str  # a variant name or "remote:<model>"
    rate: float
    sample_key: str  # "request" or "user"
    store_prompt: bool = True
    labels: tuple[str, ...] = ()  # the route's label set (classification routes)


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


class VariantServer:
    """One replica of one model variant: a loaded engine and the fan-out of `n` choices.

    A `promotable` variant serves the registry version `protege promote` picked for it
    (`distill.registry`), checking every `registry.poll_s`: a new version's engine is loaded
    next to the old one, new generations go to it, and the old engine is closed once its last
    generation ends, so a promotion fails no request.
    """

    async def __init__(
        self, name: str, config: VariantConfig, log_level: str, json_logs: bool, repo_root: str,
        registry: dict | None = None,
    ):
        configure_logging(log_level, json_logs)
        self.name, self.config, self.repo_root = name, config, repo_root
        self.log = get_logger("serving.variant").bind(variant=name)
        self.metrics = VariantMetrics()
        self._n_active = 0
        self._users: dict[int, int] = {}  # id(engine) -> generations running on it
        started = time.monotonic()
        if config.nice:
            lower_priority(config.nice)
        self.registry = self._follow = None
        promoted = None
        if config.promotable and registry is not None:
            from distill.registry import Registry

            self.registry = Registry(registry["root"])
            self.registry_options = registry
            promoted = await asyncio.to_thread(self.registry.promoted, name)
        self.engine, self.version = await self._load(config.engine, config.version, promoted)
        self._label(self.version)
        self.reporter = MetricsReporter(
            self.metrics.registry, f"variant:{name}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        )
        self.reporter.start()
        self.log.info(
            "serving.variant.loaded", engine=config.engine.engine, version=self.version,
            model=self.engine.info.model, seconds=round(time.monotonic() - started, 2),
        )
        if self.registry is not None:
            self._follow = asyncio.create_task(self._follow_promotions())

    async def _load(self, engine_config, version: str, promoted: dict | None):
        """A started engine: the promoted registry version when there is one and it loads,
        else the configured model."""
        if promoted is not None:
            try:
                return await self._load_promoted(promoted), promoted["version"]
            except Exception as e:  # noqa: BLE001 - a bad artifact must not stop the replica
                self.log.error("serving.promotion.failed", version=promoted["version"],
                               error=str(e), serving=version)
        engine = build_engine(engine_config, lambda p: _resolve(self.repo_root, p))
        await engine.start()
        return engine, version

    async def _load_promoted(self, promoted: dict):
        from distill.registry import fidelity_gap
        from serving.config import with_model

        path = await asyncio.to_thread(self.registry.fetch, promoted["version"],
                                       self.registry_options["cache_dir"])
        engine = build_engine(with_model(self.config.engine, str(path)),
                              lambda p: _resolve(self.repo_root, p))
        await engine.start()
        gap = fidelity_gap(await asyncio.to_thread(self.registry.manifest, promoted["version"]))
        if gap is not None:
            self.metrics.fidelity_gap.labels(variant=self.name).set(gap)
        return engine

    async def _follow_promotions(self) -> None:
        while True:
            await asyncio.sleep(self.registry_options["poll_s"])
            try:
                promoted = await asyncio.to_thread(self.registry.promoted, self.name)
                if promoted is not None and promoted["version"] != self.version:
                    await self._swap(promoted)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - keep serving the current version
                self.log.error("serving.promotion.failed", error=str(e), serving=self.version)
                await asyncio.sleep(self.registry_options["poll_s"] * 4)

    async def _swap(self, promoted: dict) -> None:
        started = time.monotonic()
        engine = await self._load_promoted(promoted)
        old, old_version = self.engine, self.version
        self.engine, self.version = engine, promoted["version"]
        self._active.set(0)
        self._queued.set(0)
        self.metrics.replica_up.labels(variant=self.name, version=old_version).set(0)
        self._label(self.version)
        self.log.info("serving.variant.promoted", version=self.version, previous=old_version,
                      model=engine.info.model, seconds=round(time.monotonic() - started, 2))
        while self._users.get(id(old)):  # the old engine's last generations finish on it
            await asyncio.sleep(0.05)
        await old.close()

    def _label(self, version: str) -> None:
        labels = {"variant": self.name, "version": version}
        self._active = self.metrics.active.labels(**labels)
        self._queued = self.metrics.queued.labels(**labels)
        self._outcomes = {o: self.metrics.generations.labels(**labels, outcome=o)
                          for o in ("completed", "finish_assumed", "aborted", "rejected",
                                    "failed")}
        self.metrics.replica_up.labels(**labels).set(1)
        self._set_active(0)

    async def complete(self, requests: list[GenerationRequest]) -> list[Delta]:
        """Generate every choice to the end; one merged delta per choice, in order."""
        return list(await asyncio.gather(*(self._collect(r) for r in requests)))

    async def stream(self, requests: list[GenerationRequest]) -> AsyncIterator[list[tuple[int, Delta]]]:
        """Yield batches of `(choice index, delta)` as the choices produce them.

        Whatever has queued up since the last batch goes out as one batch: every item that
        crosses Ray costs CPU, so a fast engine is not charged one item per token. With
        `stream_interval_s`, batches after the first one with text wait until that long after
        the previous one, unless a choice has just finished.
        """
        queue: asyncio.Queue[tuple[int, Delta] | BaseException | None] = asyncio.Queue()
        interval, loop, last = self.config.stream_interval_s, asyncio.get_running_loop(), None

        async def pump(index: int, request: GenerationRequest) -> None:
            try:
                async for delta in self._generate(request):
                    queue.put_nowait((index, delta))
            except BaseException as e:  # noqa: BLE001 - handed to the consumer below
                queue.put_nowait(e)
                return
            queue.put_nowait(None)

        tasks = [asyncio.create_task(pump(i, r)) for i, r in enumerate(requests)]
        try:
            remaining = len(tasks)
            while remaining:
                batch: list[tuple[int, Delta]] = []
                item = await queue.get()
                if interval and last is not None and isinstance(item, tuple) \
                        and item[1].finish_reason is None:
                    await asyncio.sleep(last + interval - loop.time())  # <= 0: no wait
                while True:
                    if item is None:
                        remaining -= 1
                    elif isinstance(item, BaseException):
                        raise item
                    else:
                        batch.append(item)
                    if queue.empty():
                        break
                    item = queue.get_nowait()
                if batch:
                    yield batch
                    if last is None and not any(d.text for _, d in batch):
                        continue  # nothing visible yet: the first text still goes at once
                    last = loop.time()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _collect(self, request: GenerationRequest) -> Delta:
        return merge_deltas([d async for d in self._generate(request)])

    async def _generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        engine, version, outcomes = self.engine, self.version, self._outcomes
        self._users[id(engine)] = self._users.get(id(engine), 0) + 1
        self._set_active(+1)
        outcome = "aborted"
        gen = None
        try:
            gen = engine.generate(request)
            first = True
            assumed = False
            async for delta in gen:
                if first:
                    delta.model_version, first = version, False
                assumed = assumed or delta.finish_assumed
                yield delta
            outcome = "finish_assumed" if assumed else "completed"
        except (PromptTooLong, Unsupported):
            outcome = "rejected"
            raise
        except Exception:
            outcome = "failed"
            raise
        finally:
            if gen is not None:
                await gen.aclose()
            self._users[id(engine)] -= 1
            if not self._users[id(engine)]:
                del self._users[id(engine)]
            self._set_active(-1)
            outcomes[outcome].inc()
            if outcome == "aborted":
                self.log.info("serving.generation.aborted", request_id=request.request_id)

    def _set_active(self, change: int) -> None:
        self._n_active += change
        self._active.set(self._n_active)
        self._queued.set(max(0, self._n_active - self.engine.info.max_concurrency))

    async def __del__(self) -> None:
        if self._follow is not None:
            self._follow.cancel()
        await self.reporter.stop()
        await self.engine.close()


class Ingress:
    """The HTTP front door: OpenAI protocol, auth, limits, metrics and logs."""

    async def __init__(self, params: IngressParams, variants: dict[str, DeploymentHandle],
                       shadow: DeploymentHandle | None = None):
        configure_logging(params.log_level, params.json_logs)
        self.p = params
        self.variants = variants
        self.shadow = shadow
        self._mirrors: set[asyncio.Task] = set()  # fire-and-forget handoffs still running
        # By teacher (`teacher_key`): each has its own budget and its own batches, so a teacher
        # that hangs holds up only the routes that mirror to it.
        self._outbox: dict[str, list[MirrorJob]] = {}  # sampled jobs waiting for a batch
        self._linger: asyncio.TimerHandle | None = None
        self._unfinished: collections.Counter[str] = collections.Counter()  # not yet finished
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
        self._responses: list[ResponseRecord] = []  # answered, not yet sent to the worker
        self.review = None
        if params.server.review:
            self.review = ReviewSite(
                lambda: open_store(params.store, Path(params.repo_root)), params.api_keys,
                params.store.redaction.redactor(),
                secure_cookie=params.server.review_secure_cookie)
        self._flusher = None
        if params.feedback and shadow is not None:
            self._flusher = asyncio.get_running_loop().create_task(
                self._flush_responses_forever(), context=contextvars.Context())

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
                code=e.code, param=e.param, latency_ms=round((time.monotonic() - started) * 1000, 2),
            )
            raise
        request_id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        user = _user_key(request, req)
        key, key_kind = _sticky_key(user, target, request_id)
        arm = target.choose(key)
        meta = responses.ResponseMeta(
            id=request_id, created=int(time.time()), model=req.model,
            system_fingerprint=f"{arm.variant}:{arm.version}",
        )
        gen_requests = req.to_generation_requests(request_id, arm.sampling, target.choice)
        call = _Call(self, target, arm, key_kind, request_id, req.stream, started,
                     gen_requests[0].params.response_format)
        plan = self.p.shadows.get(target.route)
        if plan is not None and self.shadow is not None:
            sample_by = user[0] if plan.sample_key == "user" and user else request_id
            if sample(plan.rate, sample_by, f"{target.route}:shadow"):
                call.mirror = (plan, gen_requests[0])
                call.created_at = datetime.now(UTC).isoformat()
                call.answers = {}
        if self.p.log_prompts:
            call.prompt = gen_requests[0].prompt or [
                {"role": m.role, "content": m.content} for m in gen_requests[0].messages or ()]
            call.answers = {}
        call.begin()
        handle = self.variants[arm.variant]
        timeout = self.p.server.request_timeout_s
        headers = {
            "x-request-id": request_id,
            "x-protege-variant": arm.variant,
            "x-protege-version": arm.version,
        }
        try:
            if not req.stream:
                pending = handle.complete.remote(gen_requests)
                try:
                    choices = await asyncio.wait_for(_await(pending), timeout)
                except TimeoutError:
                    pending.cancel()
                    raise OpenAIError.timeout(timeout) from None
                except asyncio.CancelledError:
                    pending.cancel()  # the client went away: stop its generation
                    raise
                version = call.served_by(c.model_version for c in choices)
                meta = replace(meta, system_fingerprint=f"{arm.variant}:{version}")
                headers["x-protege-version"] = version
                if kind == "chat":
                    body_out = responses.chat_completion(meta, choices, _tool_names(req))
                else:
                    body_out = responses.completion(meta, choices)
                call.finish(200, choices)
                if call.format is not None:  # does every choice conform? (a remote may not)
                    headers["x-protege-format-valid"] = str(call.format_valid).lower()
                return JSONResponse(body_out, headers=headers)
            stream = handle.options(stream=True).stream.remote(gen_requests)
            try:
                first = await asyncio.wait_for(stream.__anext__(), timeout)
            except TimeoutError:
                stream.cancel()
                raise OpenAIError.timeout(timeout) from None
            except StopAsyncIteration:
                first = []
            version = call.served_by(d.model_version for _, d in first)
            meta = replace(meta, system_fingerprint=f"{arm.variant}:{version}")
            headers["x-protege-version"] = version
            events = self._sse(kind, meta, req, call, first, stream, started + timeout)
            return StreamingResponse(
                events, media_type="text/event-stream",
                headers={**headers, "cache-control": "no-cache", "x-accel-buffering": "no"},
            )
        except OpenAIError as e:
            call.finish(e.status)
            raise
        except PromptTooLong as e:
            call.finish(400)
            # from the fields: a replica's error, re-raised by Ray, also carries its traceback
            message = PromptTooLong(e.prompt_tokens, e.max_tokens, e.context_window).args[0]
            raise OpenAIError.context_length_exceeded(message, req.PROMPT_PARAM) from None
        except Unsupported as e:
            call.finish(400)
            raise OpenAIError.invalid_value(e.param, e.message) from None
        except BackPressureError:
            call.finish(503)
            raise OpenAIError.busy(self.p.server.retry_after_s) from None
        except EngineError as e:
            call.finish(502)
            self.log.warning("serving.backend.failed", request_id=request_id, error=str(e))
            raise _backend_error() from None
        except asyncio.CancelledError:
            call.finish(499)
            raise
        except Exception as e:
            call.finish(500)
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
                kind, meta, batches(), req.n, req.include_usage, on_delta=call.on_delta,
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
            call.finish(status)

    def hand_off(self, job: MirrorJob) -> None:
        """Give a mirrored request to the shadow worker; never waits, never fails the user.

        Jobs leave in batches of one teacher (`MIRROR_BATCH`, or after `MIRROR_LINGER_S`): one
        call to the worker per batch keeps this process's share of the mirror's cost small.
        While this replica has `mirror_budget` jobs a teacher has not finished, that teacher is
        saturated: the sample is dropped (`budget`), so the effective sample rate falls to what
        the teacher keeps up with and no work queues up behind the users. Each teacher has a
        budget of its own: one that hangs costs only the routes that mirror to it.
        """
        self.ledger.sampled(job.pair_id)
        key = teacher_key(job)
        if self._unfinished[key] >= self.p.mirror_budget:
            self._count_mirror(job, "budget")
            return
        self._unfinished[key] += 1
        box = self._outbox.setdefault(key, [])
        box.append(job)
        if len(box) >= MIRROR_BATCH:
            self._send_mirrors()
        elif self._linger is None:
            self._linger = asyncio.get_running_loop().call_later(
                MIRROR_LINGER_S, self._send_mirrors)

    def _ledger_failed(self, error: OSError) -> None:
        self.metrics.ledger_errors.inc()
        self.log.warning("shadow.ledger.write_failed", error=repr(error)[:300])

    def _send_mirrors(self) -> None:
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        boxes, self._outbox = self._outbox, {}
        for key, jobs in boxes.items():
            # A fresh context: the handoff is no child of the user's request, so Ray Serve
            # does not cancel it when that request ends (a streaming client closes right after
            # [DONE]).
            task = asyncio.get_running_loop().create_task(
                self._hand_off(key, jobs), context=contextvars.Context())
            self._mirrors.add(task)
            task.add_done_callback(self._mirrors.discard)

    async def _hand_off(self, key: str, jobs: list[MirrorJob]) -> None:
        outcome = "sent"
        try:
            await self.shadow.mirror_batch.remote(jobs)  # returns once the teacher is done
        except BackPressureError:
            outcome = "queue_full"
        except asyncio.CancelledError:  # the ingress is stopping
            outcome = "cancelled"
            raise
        except Exception as e:  # noqa: BLE001 - counted; the users have their answers already
            outcome = "failed"
            self.log.info("shadow.handoff.failed", pairs=len(jobs), error=str(e)[:300])
        finally:
            self._unfinished[key] -= len(jobs)
            for job in jobs:
                self._count_mirror(job, outcome)

    def _count_mirror(self, job: MirrorJob, outcome: str) -> None:
        self.metrics.mirrored.labels(route=job.route, target=job.target, outcome=outcome).inc()
        if outcome != "sent":  # the pair will never exist: one of the shadow's counted losses
            self.metrics.shadow_dropped.labels(kind="pair", reason=_DROP_REASON[outcome]).inc()
            self.ledger.dropped(job.pair_id, _DROP_REASON[outcome])

    # -- feedback ---------------------------------------------------------------------------

    def log_response(self, row: ResponseRecord) -> None:
        """Keep an answered response for feedback; the flusher sends them in batches."""
        self._responses.append(row)
        if len(self._responses) >= RESPONSE_BATCH:
            asyncio.get_running_loop().create_task(
                self._flush_responses(), context=contextvars.Context())

    async def _flush_responses_forever(self) -> None:
        while True:
            await asyncio.sleep(RESPONSE_FLUSH_S)
            await self._flush_responses()

    async def _flush_responses(self) -> None:
        batch, self._responses = self._responses, []
        if not batch:
            return
        outcome = "sent"
        try:
            await self.shadow.record_responses.remote(batch)
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        except Exception as e:  # noqa: BLE001 - counted; feedback on these ids will 404
            outcome = "failed"
            self.log.warning("feedback.responses.not_sent", responses=len(batch),
                             error=str(e)[:300])
        finally:
            self.metrics.responses_logged.labels(outcome=outcome).inc(len(batch))

    async def _feedback(self, request: Request) -> Response:
        post = parse_feedback(await self._read_body(request), self.p.feedback)
        await self._flush_responses()  # a response this replica answered is known first
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
        self._send_mirrors()  # what waited for a batch goes now (counted if it cannot finish)
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(BaseException):
                await self._flusher
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._flush_responses(), 5)
        if self.ledger is not None:
            self.ledger.close()
        await self.reporter.stop()


class _Call:
    """Timing, tokens, metrics and the canonical log line of one generation request."""

    def __init__(self, ingress: Ingress, target: RouteTarget, arm: Arm, arm_key: str,
                 request_id: str, stream: bool, started: float,
                 response_format: ResponseFormat | None = None):
        self.i, self.t, self.arm, self.arm_key = ingress, target, arm, arm_key
        self.request_id, self.stream, self.started = request_id, stream, started
        self.labels = {"route": target.route, "variant": arm.variant}
        self.first_token_at: float | None = None
        self.last_token_at: dict[int, float] = {}
        self.prompt_tokens = 0
        self.completion_tokens: dict[int, int] = {}
        self.prompt: object = None  # the prompt as logged, with log_prompts only
        self.mirror: tuple[ShadowPlan, GenerationRequest] | None = None  # sampled for shadowing
        self.answers: dict[int, str] | None = None  # each choice's text: mirrored or logged only
        self.created_at = ""  # when the request arrived (ISO 8601 UTC), set only when mirrored
        self.version = arm.version  # the configured version until the replica says which served
        self.format = response_format  # what the answers must be; each is checked at the end
        if response_format is not None:
            self.answers = {}
        self.format_valid = True
        self.finish_reasons: dict[int, str] = {}  # choice index -> why it ended
        self.done = False

    def served_by(self, versions) -> str:
        """The model version the replica reported on the first deltas (after a promotion it
        differs from the configured one)."""
        self.version = next((v for v in versions if v), self.version)
        return self.version

    def begin(self) -> None:
        self.i.metrics.in_flight.labels(**self.labels).inc()

    def on_delta(self, index: int, delta: Delta) -> None:
        now = time.monotonic()
        if delta.text or delta.token_ids:
            if self.first_token_at is None:
                self.first_token_at = now
            elif index in self.last_token_at:
                self.i.metrics.inter_token.labels(**self.labels).observe(
                    now - self.last_token_at[index])
            self.last_token_at[index] = now
            if self.answers is not None:
                self.answers[index] = self.answers.get(index, "") + delta.text
        if delta.finish_reason is not None:
            self.finish_reasons[index] = delta.finish_reason
        if delta.prompt_tokens is not None:
            self.prompt_tokens = delta.prompt_tokens
        if delta.completion_tokens is not None:
            self.completion_tokens[index] = delta.completion_tokens

    def finish(self, status: int, choices: list[Delta] | None = None) -> None:
        if self.done:
            return
        self.done = True
        now = time.monotonic()
        m, labels = self.i.metrics, self.labels
        stream = "true" if self.stream else "false"
        if choices is not None:
            self.first_token_at = now
            for index, c in enumerate(choices):
                self.on_delta(index, Delta(c.text, (), None, c.finish_reason, c.prompt_tokens,
                                           c.completion_tokens))
        m.in_flight.labels(**labels).dec()
        m.requests.labels(**labels, status=str(status)).inc()
        m.latency.labels(**labels, stream=stream).observe(now - self.started)
        ttft = None
        if self.first_token_at is not None and status == 200:
            ttft = self.first_token_at - self.started
            m.ttft.labels(**labels, stream=stream).observe(ttft)
        completion = sum(self.completion_tokens.values())
        if self.prompt_tokens:
            m.tokens.labels(**labels, kind="prompt").inc(self.prompt_tokens)
        if completion:
            m.tokens.labels(**labels, kind="completion").inc(completion)
        if self.format is not None and status == 200:
            self._check_format()
        try:  # the log line and the shadow's bookkeeping: no failure here fails the answer
            self.i.log.info(
                "serving.request.completed", request_id=self.request_id, route=self.t.route,
                variant=self.arm.variant, version=self.version, arm_key=self.arm_key,
                status=status, stream=self.stream,
                latency_ms=round((now - self.started) * 1000, 2),
                ttft_ms=round(ttft * 1000, 2) if ttft is not None else None,
                prompt_tokens=self.prompt_tokens, completion_tokens=completion,
                **({"prompt": self.prompt, "answers": self.answers} if self.prompt is not None
                   else {}),
            )
            if status == 200 and self.i.p.feedback:
                self.i.log_response(ResponseRecord(
                    self.request_id, self.t.route, self.arm.variant, self.version,
                    self.created_at or datetime.now(UTC).isoformat()))
            if self.mirror is not None and status == 200:
                plan, request = self.mirror
                student = Answer(
                    model=self.arm.variant, version=self.version, text=self.answers.get(0, ""),
                    finish_reason=self.finish_reasons.get(0), prompt_tokens=self.prompt_tokens,
                    completion_tokens=self.completion_tokens.get(0),
                    ttft_ms=round(ttft * 1000, 3) if ttft is not None else None,
                    latency_ms=round((now - self.started) * 1000, 3),
                )
                self.i.hand_off(MirrorJob(
                    pair_id=self.request_id, route=self.t.route, variant=self.arm.variant,
                    target=plan.target, request=request, stream=self.stream, student=student,
                    created_at=self.created_at, store_prompt=plan.store_prompt,
                    labels=plan.labels,
                ))
        except Exception as e:  # noqa: BLE001 - counted; the user has the answer
            self.i.log.warning("shadow.bookkeeping.failed", request_id=self.request_id,
                               error=repr(e)[:300])
            if self.mirror is not None and status == 200:
                m.shadow_dropped.labels(kind="pair", reason="handoff_failed").inc()

    def _check_format(self) -> None:
        """Count each choice as valid, invalid or truncated against the response_format."""
        for index, reason in sorted(self.finish_reasons.items()):
            if reason == "length":
                outcome = "truncated"
            else:
                problem = check_answer(self.format, self.answers.get(index, ""))
                outcome = "valid" if problem is None else "invalid"
                if problem is not None:  # the reason may quote the answer: not logged
                    self.i.log.warning("serving.format.invalid", request_id=self.request_id,
                                       choice=index)
            self.format_valid = self.format_valid and outcome == "valid"
            self.i.metrics.structured.labels(**self.labels, outcome=outcome).inc()


def _tool_names(req) -> tuple[str, ...] | None:
    """The functions a chat request lets the model call; None when it may call none."""
    use = getattr(req, "tool_use", None)
    return None if use is None else tuple(t.name for t in use.tools)


async def _await(response):
    return await response


def _user_key(request: Request, req) -> tuple[str, str] | None:
    """Who is asking, and how we know: the x-session-id header, else the `user` field."""
    session = request.headers.get("x-session-id")
    if session:
        return session, "session"
    return (req.user, "user") if req.user else None


def _sticky_key(user: tuple[str, str] | None, target: RouteTarget,
                request_id: str) -> tuple[str, str]:
    """What picks the arm, and which kind it is: the user key, or the request id."""
    if target.sticky_key == "user" and user is not None:
        return user
    return request_id, "request"


_DROP_REASON = {"budget": "budget", "queue_full": "worker_busy", "failed": "handoff_failed",
                "cancelled": "cancelled"}


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


def _resolve(repo_root: str, path: str):
    from pathlib import Path

    p = Path(os.path.expanduser(path))
    return p if p.is_absolute() else Path(repo_root) / p


# -- wiring -----------------------------------------------------------------------------------


def build_app(settings) -> serve.Application:
    """The Ray Serve application for `settings` (an `ops.settings.Settings`)."""
    from ops.settings import REPO_ROOT

    log = settings.logging
    drain_s = settings.server.drain_timeout_s
    run = f"{int(time.time())}-{uuid.uuid4().hex[:8]}"  # names this run's ledger files
    registry = {"root": settings.registry_root(), "poll_s": settings.registry.poll_s,
                "cache_dir": str(settings.resolve_path(settings.registry.cache_dir))}
    variants = {}
    defaults = {name: sampling_defaults(v, lambda p: _resolve(str(REPO_ROOT), p))
                for name, v in settings.variants.items()}
    for name, v in settings.variants.items():
        deployment = serve.deployment(VariantServer).options(
            name=f"variant-{name}",
            num_replicas=v.replicas,
            ray_actor_options={"num_cpus": v.num_cpus, "num_gpus": v.num_gpus},
            max_ongoing_requests=v.max_ongoing_requests,
            max_queued_requests=v.max_queued_requests,
            graceful_shutdown_timeout_s=drain_s,
            health_check_timeout_s=60,
            logging_config=SERVE_LOGGING,
        )
        variants[name] = deployment.bind(name, v, log.level, log.json_logs, str(REPO_ROOT),
                                         registry if v.promotable else None)
    targets = {r: route.shadow for r, route in settings.routes.items() if route.shadow is not None}
    shadows = {r: ShadowPlan(t.name, t.sample_rate, t.sample_key, t.store_prompt,
                             tuple(settings.routes[r].labels or ()))
               for r, t in targets.items()}
    shadow = None
    if targets or settings.feedback:
        from shadow.worker import ShadowWorker

        sh = settings.shadow
        shadow = serve.deployment(ShadowWorker).options(
            name="shadow", num_replicas=1,  # one writer for the embedded SQLite store
            ray_actor_options={"num_cpus": sh.num_cpus},
            # Calls carry batches of jobs; the worker bounds teacher calls and waiting jobs.
            max_ongoing_requests=1000, max_queued_requests=-1,
            graceful_shutdown_timeout_s=drain_s, health_check_timeout_s=60,
            logging_config=SERVE_LOGGING,
        ).bind(
            sh,
            {r: t.remote for r, t in targets.items() if t.remote is not None},  # by route
            {t.variant: variants[t.variant] for t in targets.values() if t.variant is not None},
            {t.variant: settings.variants[t.variant].version for t in targets.values()
             if t.variant is not None},
            str(REPO_ROOT), log.level, log.json_logs, run,
        )
    ing = settings.server.ingress
    params = IngressParams(
        server=settings.server,
        api_keys=settings.api_keys,
        routes={
            r: RouteTarget(
                r,
                tuple(Arm(v, settings.variants[v].version, w, defaults[v])
                      for v, w in route.split()),
                route.sticky_key,
                choice_of(route.labels) if route.constrain else None,
            )
            for r, route in settings.routes.items()
        },
        shadows=shadows,
        feedback=dict(settings.feedback),
        mirror_budget=settings.shadow.max_in_flight or settings.shadow.max_concurrency,
        ledger_dir=str(settings.resolve_path(settings.shadow.spill_dir) / "ledger"),
        run=run,
        log_level=log.level,
        json_logs=log.json_logs,
        log_prompts=log.log_prompts,
        created=int(time.time()),
        store=settings.shadow,
        repo_root=str(REPO_ROOT),
    )
    ingress = serve.deployment(Ingress).options(
        name="ingress",
        num_replicas=ing.replicas,
        ray_actor_options={"num_cpus": ing.num_cpus},
        max_ongoing_requests=ing.max_ongoing_requests,
        graceful_shutdown_timeout_s=drain_s,
        logging_config=SERVE_LOGGING,
    )
    return ingress.bind(params, variants, shadow)


def app_builder(args: dict) -> serve.Application:
    """The application for a Serve config (`import_path: serving.app:app_builder`, as the helm
    chart's RayService renders it): `args["config"]` names the settings file; env applies."""
    from ops.settings import load_settings

    if not args.get("config"):
        raise ValueError("args.config: missing (the path of a protege settings file)")
    return build_app(load_settings(args["config"]))
