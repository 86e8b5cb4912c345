"""Locust users for `POST /v1/chat/completions`: non-streamed and streamed, shadowed and plain.

Each user takes turns over the routes in LOADTEST_ROUTES (default `shadowed,plain`, the routes of
loadtests/loadtest.yaml), so every scenario gets one row per route, measured side by side:

    POST  chat non-stream [plain]      request to the whole JSON answer
    POST  chat stream [plain]          request to `data: [DONE]`: the whole stream, not just the
                                       headers (locust's own timer stops at the headers)
    TTFT  chat stream TTFT [plain]     request to the first chunk with content

A non-streamed request fails on a status other than 200 or a body without `choices`. A streamed
one fails on a status other than 200, a `data:` payload that is not JSON, an `error` event, data
after `[DONE]`, or a stream that ends without `[DONE]`. A TTFT row gets one sample per successful
stream that had content; failures are counted in the stream row only.

Bounded: the whole run sends at most LOADTEST_MAX_REQUESTS requests and stops after
LOADTEST_MAX_SECONDS, whichever comes first (earlier with `-t`; requests still in flight then
finish within `--stop-timeout`, or are cut and not counted). Only http://127.0.0.1 or
http://localhost hosts are accepted; any other --host stops locust before a request is sent.

    locust --headless -f loadtests/locustfile.py --host http://127.0.0.1:8000 -u 8 -r 4 -t 30s

Environment (all optional):
    LOADTEST_ROUTES         comma-separated routes to take turns on    shadowed,plain
    LOADTEST_CHAT_WEIGHT    weight of the non-streamed task (0: off)   1
    LOADTEST_STREAM_WEIGHT  weight of the streamed task (0: off)       1
    LOADTEST_MAX_TOKENS     max_tokens of every request                (the route's default)
    LOADTEST_WAIT_S         pause between a user's requests            0
    LOADTEST_TIMEOUT_S      per-request read timeout                   30
    LOADTEST_MAX_REQUESTS   requests in the whole run, then it stops   20000
    LOADTEST_MAX_SECONDS    the run stops after this, whatever -t says 600
    LOADTEST_API_KEY        bearer key sent with every request         unused
    LOADTEST_PATH           the endpoint                               /v1/chat/completions
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

import gevent
import requests
from locust import HttpUser, constant, events, task
from locust.exception import StopUser
from locust.stats import CSV_STATS_INTERVAL_SEC

ALLOWED_HOSTS = ("127.0.0.1", "localhost")
DONE = b"[DONE]"
log = logging.getLogger("loadtest")


def _env_int(name: str, default: int, low: int = 0) -> int:
    raw = os.environ.get(name, "")
    try:
        value = int(raw) if raw.strip() else default
    except ValueError:
        raise SystemExit(f"{name}={raw!r}: expected an integer >= {low}") from None
    if value < low:
        raise SystemExit(f"{name}={value}: expected an integer >= {low}")
    return value


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name, "")
    try:
        value = float(raw) if raw.strip() else default
    except ValueError:
        raise SystemExit(f"{name}={raw!r}: expected a number >= 0") from None
    if value < 0:
        raise SystemExit(f"{name}={value}: expected a number >= 0")
    return value


ROUTES = tuple(r.strip() for r in os.environ.get("LOADTEST_ROUTES", "shadowed,plain").split(",")
               if r.strip())
CHAT_WEIGHT = _env_int("LOADTEST_CHAT_WEIGHT", 1)
STREAM_WEIGHT = _env_int("LOADTEST_STREAM_WEIGHT", 1)
MAX_TOKENS = _env_int("LOADTEST_MAX_TOKENS", 0) or None
WAIT_S = _env_float("LOADTEST_WAIT_S", 0.0)
TIMEOUT_S = _env_float("LOADTEST_TIMEOUT_S", 30.0) or 30.0
MAX_REQUESTS = _env_int("LOADTEST_MAX_REQUESTS", 20000, low=1)
MAX_SECONDS = _env_float("LOADTEST_MAX_SECONDS", 600.0) or 600.0
API_KEY = os.environ.get("LOADTEST_API_KEY", "unused")
PATH = os.environ.get("LOADTEST_PATH", "/v1/chat/completions")
if not ROUTES:
    raise SystemExit("LOADTEST_ROUTES is empty: name at least one route")
if CHAT_WEIGHT + STREAM_WEIGHT == 0:
    raise SystemExit("LOADTEST_CHAT_WEIGHT and LOADTEST_STREAM_WEIGHT are both 0: nothing to run")


def check_host(host: str | None) -> str:
    """`host` when it is http(s)://127.0.0.1 or localhost (any port); else a ValueError."""
    if not host:
        raise ValueError("no host: pass --host http://127.0.0.1:<port>")
    parts = urlsplit(host)
    if parts.scheme not in ("http", "https") or parts.hostname not in ALLOWED_HOSTS:
        raise ValueError(f"refusing host {host!r}: load tests only target http://127.0.0.1 "
                         "or http://localhost")
    return host


# -- reading a stream ---------------------------------------------------------------------------


class StreamError(Exception):
    """The stream broke the protocol: no [DONE], a bad chunk, or an error event."""


@dataclass
class StreamResult:
    chunks: int                      # JSON chunks before [DONE]
    content_chars: int               # characters of delta content, all choices
    first_content_s: float | None    # clock() at the first chunk with content; None: none came
    nbytes: int                      # bytes of the SSE lines read


def read_sse(lines: Iterable[bytes], clock: Callable[[], float] = time.perf_counter
             ) -> StreamResult:
    """Read an OpenAI SSE stream (`data: {...}` lines, then `data: [DONE]`) to its end.

    Returns what was read; raises StreamError when a `data:` payload is not JSON or is an `error`
    event, when data follows `[DONE]`, or when the lines end without `[DONE]`. Blank lines,
    SSE comments (`:`) and other fields are skipped. `clock` stamps the first content chunk.
    """
    chunks = chars = nbytes = 0
    first: float | None = None
    done = False
    for raw in lines:
        nbytes += len(raw) + 1
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if done:
            raise StreamError(f"data after [DONE]: {data[:80]!r}")
        if data == DONE:
            done = True
            continue
        try:
            event = json.loads(data)
        except ValueError:
            raise StreamError(f"chunk {chunks + 1} is not JSON: {data[:80]!r}") from None
        if not isinstance(event, dict):
            raise StreamError(f"chunk {chunks + 1} is not a JSON object: {data[:80]!r}")
        if "error" in event:
            raise StreamError(f"error event: {json.dumps(event['error'])[:200]}")
        chunks += 1
        text = "".join(((c.get("delta") or {}).get("content") or "")
                       for c in event.get("choices") or () if isinstance(c, dict))
        if text:
            chars += len(text)
            if first is None:
                first = clock()
    if not done:
        raise StreamError(f"stream ended without [DONE] after {chunks} chunks")
    return StreamResult(chunks, chars, first, nbytes)


# -- the users ----------------------------------------------------------------------------------


class _Budget:
    """Requests left in this locust process; at zero the run is stopped."""

    def __init__(self, n: int) -> None:
        self.left = n
        self.csv = False  # whether locust writes CSV files (--csv)
        self.stopping = False

    def take(self, environment) -> None:
        if self.left <= 0:
            if environment.runner is not None and not self.stopping:
                self.stopping = True
                log.warning("LOADTEST_MAX_REQUESTS=%d reached: stopping the run", MAX_REQUESTS)
                gevent.spawn(environment.runner.quit)
            raise StopUser()
        self.left -= 1


BUDGET = _Budget(MAX_REQUESTS)


@events.init.add_listener
def _on_init(environment, **_kw) -> None:
    BUDGET.csv = bool(getattr(environment.parsed_options, "csv_prefix", None))
    try:
        check_host(environment.host)
    except ValueError as e:
        log.error("%s", e)
        raise  # an exception in an init listener makes locust exit before any request


@events.quit.add_listener
def _on_quit(**_kw) -> None:
    # Locust rewrites its CSV files once a second and not again at exit: one more turn of its
    # writer makes <prefix>_stats.csv hold the final numbers (the ones printed).
    if BUDGET.csv:
        gevent.sleep(CSV_STATS_INTERVAL_SEC + 0.3)


@events.test_start.add_listener
def _on_test_start(environment, **_kw) -> None:
    def stop() -> None:
        log.warning("LOADTEST_MAX_SECONDS=%g reached: stopping the run", MAX_SECONDS)
        environment.runner.quit()

    if environment.runner is not None:
        gevent.spawn_later(MAX_SECONDS, stop)


def _failed_status(resp) -> str:
    """Why a response that is not a 200 failed (no connection at all: locust's status 0)."""
    if getattr(resp, "error", None) is not None:
        return f"no response: {type(resp.error).__name__}: {resp.error}"[:300]
    try:
        text = resp.text
    except (requests.RequestException, OSError) as e:
        text = f"(body unreadable: {type(e).__name__})"
    return f"status {resp.status_code}: {text[:200]}"


class ChatUser(HttpUser):
    """One application: chat requests in a closed loop, taking turns over the routes."""

    wait_time = constant(WAIT_S)

    def on_start(self) -> None:
        try:
            check_host(self.host)
        except ValueError as e:
            log.error("%s", e)
            raise StopUser() from None
        self.client.headers["Authorization"] = f"Bearer {API_KEY}"
        self._chat_routes = itertools.cycle(ROUTES)
        self._stream_routes = itertools.cycle(ROUTES)
        self._n = 0

    def _body(self, route: str, stream: bool) -> dict:
        self._n += 1
        body: dict = {"model": route, "messages": [
            {"role": "user", "content": f"Request {self._n}: say something short about rivers."}]}
        if MAX_TOKENS is not None:
            body["max_tokens"] = MAX_TOKENS
        if stream:
            body["stream"] = True
        return body

    @task(CHAT_WEIGHT)
    def chat(self) -> None:
        BUDGET.take(self.environment)
        route = next(self._chat_routes)
        with self.client.post(PATH, json=self._body(route, False), catch_response=True,
                              name=f"chat non-stream [{route}]", timeout=TIMEOUT_S) as resp:
            if resp.status_code != 200:
                resp.failure(_failed_status(resp))
                return
            try:
                choices = resp.json().get("choices")
            except (ValueError, AttributeError):
                choices = None
            if not (isinstance(choices, list) and choices):
                resp.failure(f"no choices in the answer: {resp.text[:200]}")
                return
            resp.success()

    @task(STREAM_WEIGHT)
    def chat_stream(self) -> None:
        BUDGET.take(self.environment)
        route = next(self._stream_routes)
        name = f"chat stream [{route}]"
        t0 = time.perf_counter()
        with self.client.post(PATH, json=self._body(route, True), catch_response=True,
                              stream=True, name=name, timeout=TIMEOUT_S) as resp:
            result: StreamResult | None = None
            error: str | None = None
            if resp.status_code != 200:
                error = _failed_status(resp)
            else:
                try:
                    result = read_sse(resp.iter_lines())
                except StreamError as e:
                    error = str(e)
                except (requests.RequestException, OSError) as e:
                    error = f"stream broken: {type(e).__name__}: {e}"[:300]
            # The whole stream, from the request to its last byte, is this request's time.
            resp.request_meta["response_time"] = (time.perf_counter() - t0) * 1000
            if result is not None:
                resp.request_meta["response_length"] = result.nbytes
            if error is None:
                resp.success()
            else:
                resp.failure(error)
        if result is not None and result.first_content_s is not None:
            self.environment.events.request.fire(
                request_type="TTFT", name=f"chat stream TTFT [{route}]",
                response_time=(result.first_content_s - t0) * 1000, response_length=0,
                exception=None, context={})
