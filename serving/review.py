"""The review page at `/review`: the ML team's view of stored pairs, and their labels.

`ReviewSite.handle` answers every `/review...` request, in the gateway's ingress or on its own
(`protege review`, `asgi_app`). It owns the HTTP side only: auth, routing, static files and
JSON; the queries are `shadow.review_queries`'s and the store's (`ReviewStore`).

    GET  /review                       the page (serving/static/review.html), or the key form
    POST /review/login, /review/logout the page's cookie from an API key, and its removal
    GET  /review/static/review.{js,css}
    GET  /review/api/facets            routes, student versions, feedback metrics, verdicts
    GET  /review/api/pairs?filters     a page of pairs (shadow.review_queries.ReviewQuery)
    GET  /review/api/summary?filters   the summary panel
    GET  /review/api/pairs/{id}        one pair: prompt, answers, word diff, scores, feedback,
                                       labels
    POST /review/api/pairs/{id}/label  {"verdict", "corrected", "reviewer"}

With API keys configured, a request needs `Authorization: Bearer KEY` or the session cookie the
login form sets (HttpOnly, SameSite=Strict, Secure unless `server.review_secure_cookie` is off):
a session id, its issue and expiry times and an HMAC of them under a secret derived from the
keys (so every ingress replica checks it alike), which opens the review and nothing else.
Logging out revokes the session in this process; it expires after `SESSION_S` anyway. Failed
logins from one client are throttled (`MAX_FAILED_LOGINS` a minute, then 429).
A label must be posted as JSON, which a cross-site form cannot send. Every answer carries a
strict Content-Security-Policy: the page runs only its own script, so text in a pair can never
run as code even if it reached the DOM as HTML (the page puts it there as text).
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import hmac
import html
import secrets
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import parse_qs

from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response

from core.errors import OpenAIError, clip
from core.logging import get_logger
from serving.auth import bearer_key_ok, host_allowed, host_error
from shadow.labels import LabelError, parse_label
from shadow.review_queries import ReviewError, ReviewQuery, pair_view

STATIC = Path(__file__).parent / "static"
ASSETS = {"review.js": "text/javascript; charset=utf-8", "review.css": "text/css; charset=utf-8"}
COOKIE = "protege_review"
SESSION_S = 8 * 3600
MAX_FAILED_LOGINS = 5  # per client and minute
FAILED_LOGIN_WINDOW_S = 60.0
MAX_LABEL_BODY = 512 * 1024
MAX_LOGIN_BODY = 4096
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; "
                               "script-src 'self'; object-src 'none'; base-uri 'none'; "
                               "form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
log = get_logger("serving.review")


def session_secret(api_keys: tuple[str, ...]) -> bytes:
    """The HMAC key of review sessions: from the API keys, so replicas agree and a changed key
    set ends every session."""
    return hashlib.sha256(b"protege-review-session\x00" + "\x00".join(sorted(api_keys))
                          .encode()).digest()


def session_token(secret: bytes, now: float, lifetime_s: float = SESSION_S) -> str:
    """A new session cookie value: `id.issued.expires.mac`."""
    body = f"{secrets.token_urlsafe(16)}.{int(now)}.{int(now + lifetime_s)}"
    return f"{body}.{_mac(secret, body)}"


def session_of(secret: bytes, token: str, now: float) -> tuple[str, float] | None:
    """`(session id, expiry)` of a cookie value signed with `secret` and not expired; None
    for anything else."""
    body, _, mac = token.rpartition(".")
    parts = body.split(".")
    if len(parts) != 3 or not hmac.compare_digest(mac, _mac(secret, body)):
        return None
    sid, issued, expires = parts
    try:
        issued_at, expiry = int(issued), int(expires)
    except ValueError:
        return None
    return (sid, expiry) if issued_at <= now + 60 and now < expiry else None


def _mac(secret: bytes, body: str) -> str:
    return hmac.new(secret, body.encode(), hashlib.sha256).hexdigest()


def login_page(error: str | None = None) -> str:
    message = f'<p class="login-error" id="login-error">{html.escape(error)}</p>' if error else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>protege review: sign in</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><link rel="icon" href="data:,">
<link rel="stylesheet" href="/review/static/review.css"></head>
<body class="login"><form method="post" action="/review/login" class="login-form">
<h1>protege review</h1><p>Sign in with one of the gateway's API keys.</p>{message}
<label for="key">API key</label>
<input id="key" name="key" type="password" autocomplete="current-password" required autofocus>
<button id="login" type="submit">Sign in</button></form></body></html>"""


class ReviewSite:
    """Answers `/review...` requests from a `ReviewStore` (opened on first use by `open_store`)."""

    def __init__(self, open_store: Callable[[], object], api_keys: tuple[str, ...],
                 redactor=None, *, secure_cookie: bool = True,
                 clock: Callable[[], float] = time.time):
        self._open_store = open_store
        self._redactor = redactor  # a corrected answer is redacted as pairs are
        self._store = None
        self._keys = tuple(k.encode() for k in api_keys)
        self._secret = session_secret(api_keys)
        self._secure = secure_cookie
        self._clock = clock
        self._revoked: dict[str, float] = {}  # session id -> its expiry (then forgotten)
        self._failures: dict[str, collections.deque] = {}  # client -> failed login times
        self._shell = (STATIC / "review.html").read_bytes()
        self._assets = {name: (STATIC / name).read_bytes() for name in ASSETS}

    @property
    def store(self):
        if self._store is None:
            self._store = self._open_store()
        return self._store

    async def handle(self, request: Request) -> Response:
        path = request.url.path.rstrip("/") or "/"
        try:
            response = await self._route(request, path, request.method)
        except OpenAIError as e:
            response = JSONResponse(e.body(), e.status, headers=e.headers)
        response.headers.update(HEADERS)
        return response

    async def _route(self, request: Request, path: str, method: str) -> Response:
        if path.startswith("/review/static/"):
            name = path.removeprefix("/review/static/")
            if name not in ASSETS:
                raise OpenAIError(404, f"No review asset {clip(name, 100)!r}.", "not_found_error")
            _method(method, "GET")
            return Response(self._assets[name], media_type=ASSETS[name])
        if path == "/review/login":
            _method(method, "POST")
            return await self._login(request)
        if path == "/review/logout":
            _method(method, "POST")
            session = session_of(self._secret, request.cookies.get(COOKIE, ""), self._clock())
            if session is not None:
                self._revoked[session[0]] = session[1]
            response = RedirectResponse("/review", 303)
            response.delete_cookie(COOKIE, path="/review", secure=self._secure,
                                   httponly=True, samesite="strict")
            return response
        if path == "/review":
            _method(method, "GET")
            if not self._authorized(request):
                return Response(login_page(), 401, media_type="text/html; charset=utf-8")
            return Response(self._shell, media_type="text/html; charset=utf-8")
        if not path.startswith("/review/api/"):
            raise OpenAIError(404, f"Unknown path {clip(path, 100)!r}.", "not_found_error",
                              code="unknown_url")
        if not self._authorized(request):
            raise OpenAIError.unauthorized()
        return await self._api(request, path.removeprefix("/review/api/"), method)

    async def _api(self, request: Request, path: str, method: str) -> Response:
        if path == "facets":
            _method(method, "GET")
            return JSONResponse(await self._call(self.store.review_facets))
        if path in ("pairs", "summary"):
            _method(method, "GET")
            try:
                query = ReviewQuery.parse(dict(request.query_params))
            except ReviewError as e:
                raise OpenAIError.invalid_value(e.param, str(e)) from None
            read = self.store.review_page if path == "pairs" else self.store.review_summary
            return JSONResponse(await self._call(read, query))
        if path.startswith("pairs/") and path.endswith("/label"):
            _method(method, "POST")
            return await self._label(request, path.removeprefix("pairs/").removesuffix("/label"))
        if path.startswith("pairs/"):
            _method(method, "GET")
            return JSONResponse(await self._call(self._pair, path.removeprefix("pairs/")))
        raise OpenAIError(404, f"Unknown review API {clip(path, 100)!r}.", "not_found_error",
                          code="unknown_url")

    # -- reads and writes (the store blocks: a thread each) ------------------------------------

    async def _call(self, fn, *args):
        try:
            return await asyncio.to_thread(fn, *args)
        except OpenAIError:
            raise
        except Exception as e:  # noqa: BLE001 - an unreachable store: the page says so
            log.warning("serving.review.store_failed", error=str(e)[:300])
            raise OpenAIError(503, "The pair store is unavailable; try again.", "server_error",
                              code="store_unavailable", headers={"Retry-After": "5"}) from None

    def _pair(self, pair_id: str) -> dict:
        pair = self.store.get(pair_id)
        if pair is None:
            raise _no_pair(pair_id)
        return pair_view(pair, self.store.feedback_for(pair_id), self.store.labels_for(pair_id))

    async def _label(self, request: Request, pair_id: str) -> Response:
        data = OpenAIError.load_json(await _read(request, MAX_LABEL_BODY, "application/json"))
        try:
            label = parse_label(data, pair_id, datetime.now(UTC).isoformat(timespec="microseconds"),
                                self._redactor)
        except LabelError as e:
            raise OpenAIError.invalid_value(e.param, str(e)) from None
        if not await self._call(self.store.add_label, label):
            raise _no_pair(pair_id)
        log.info("serving.review.labelled", pair_id=pair_id, verdict=label.verdict,
                 reviewer=label.reviewer, corrected=label.corrected is not None)
        return JSONResponse({"label": label.public()}, 201)

    # -- auth --------------------------------------------------------------------------------------

    def _authorized(self, request: Request) -> bool:
        if not self._keys:
            return True
        header = request.headers.get("authorization", "")
        if header.partition(" ")[0].lower() == "bearer":
            return bearer_key_ok(header, self._keys)
        now = self._clock()
        session = session_of(self._secret, request.cookies.get(COOKIE, ""), now)
        if len(self._revoked) > 1000:  # forget revocations whose sessions expired anyway
            self._revoked = {sid: exp for sid, exp in self._revoked.items() if exp > now}
        return session is not None and session[0] not in self._revoked

    async def _login(self, request: Request) -> Response:
        body = await _read(request, MAX_LOGIN_BODY, "application/x-www-form-urlencoded")
        key = (parse_qs(body.decode("utf-8", "replace")).get("key") or [""])[0].strip()
        client = request.client.host if request.client else "-"
        now = self._clock()
        if len(self._failures) > 10_000:  # forget clients whose failures are old
            self._failures = {c: f for c, f in self._failures.items()
                              if f and f[-1] > now - FAILED_LOGIN_WINDOW_S}
        failures = self._failures.setdefault(client, collections.deque())
        while failures and failures[0] <= now - FAILED_LOGIN_WINDOW_S:
            failures.popleft()
        if len(failures) >= MAX_FAILED_LOGINS:
            wait = int(failures[0] + FAILED_LOGIN_WINDOW_S - now) + 1
            raise OpenAIError(429, f"Too many failed sign-ins from this client; try again in "
                              f"{wait} s.", "rate_limit_error", code="too_many_logins",
                              headers={"Retry-After": str(wait)})
        if self._keys and not any(hmac.compare_digest(key.encode(), k) for k in self._keys):
            failures.append(now)
            log.warning("serving.review.login_failed", client=client)
            return Response(login_page("That key is not one of the gateway's API keys."), 401,
                            media_type="text/html; charset=utf-8")
        if not failures:
            self._failures.pop(client, None)
        response = RedirectResponse("/review", 303)
        if self._keys:
            response.set_cookie(COOKIE, session_token(self._secret, now), max_age=SESSION_S,
                                path="/review", httponly=True, samesite="strict",
                                secure=self._secure or request.url.scheme == "https")
        return response


def _method(method: str, allowed: str) -> None:
    if method != allowed:
        raise OpenAIError(405, f"Method {method} is not allowed here; use {allowed}.",
                          code="method_not_allowed", headers={"Allow": allowed})


def _no_pair(pair_id: str) -> OpenAIError:
    return OpenAIError(404, f"No pair with id {clip(pair_id, 100)!r}.", "not_found_error",
                       "pair_id", "pair_not_found")


async def _read(request: Request, limit: int, content_type: str) -> bytes:
    given = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if given != content_type:
        raise OpenAIError(415, f"Unsupported Content-Type {clip(given or 'none', 100)!r}: send "
                          f"the body as {content_type}.", code="unsupported_media_type")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise OpenAIError.body_too_large(limit)
    return bytes(body)


def asgi_app(site: ReviewSite, hosts: frozenset[str] | None = None):
    """`site` as an ASGI app (for `protege review`): every path goes to `ReviewSite.handle`;
    with `hosts` (`serving.auth.checked_hosts`), only requests addressed to them or loopback."""

    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] != "http":
            return
        request = Request(scope, receive)
        if hosts is not None and not host_allowed(request.headers.get("host"), hosts):
            error = host_error(request.headers.get("host"))
            response: Response = JSONResponse(error.body(), error.status, headers=HEADERS)
        elif not request.url.path.startswith("/review"):
            response = RedirectResponse("/review", 307)
        else:
            response = await site.handle(request)
        await response(scope, receive, send)

    return app
