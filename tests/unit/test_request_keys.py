"""Which key picks a request's A/B arm, and which key a user-sampled shadow hashes."""

from types import SimpleNamespace

from starlette.requests import Request

from serving.app import Arm, RouteTarget, _sticky_key, _user_key


def request(headers: dict[str, str]) -> Request:
    raw = [(k.encode(), v.encode()) for k, v in headers.items()]
    return Request({"type": "http", "method": "POST", "path": "/", "headers": raw})


def route(sticky: str) -> RouteTarget:
    return RouteTarget("r", (Arm("a", "1", 1.0), Arm("b", "1", 1.0)), sticky)


def test_session_header_beats_user():
    assert _user_key(request({"x-session-id": "s"}), SimpleNamespace(user="u")) == ("s", "session")
    assert _user_key(request({}), SimpleNamespace(user="u")) == ("u", "user")
    assert _user_key(request({}), SimpleNamespace(user=None)) is None


def test_sticky_key_uses_the_user_only_for_user_sticky_routes():
    user = ("u", "user")
    assert _sticky_key(user, route("user"), "id-1") == user
    assert _sticky_key(None, route("user"), "id-1") == ("id-1", "request")
    # An arm chosen per request does not stop a shadow from sampling by user.
    assert _sticky_key(user, route("request"), "id-1") == ("id-1", "request")
