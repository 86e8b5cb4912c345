"""Which key picks a request's A/B arm, and which key a user-sampled shadow hashes."""

from serving.router import Arm, RouteTarget, sticky_key, user_key


def route(sticky: str) -> RouteTarget:
    return RouteTarget("r", (Arm("a", "1", 1.0), Arm("b", "1", 1.0)), sticky)


def test_session_header_beats_user():
    assert user_key("s", "u") == ("s", "session")
    assert user_key(None, "u") == ("u", "user")
    assert user_key("", "u") == ("u", "user")
    assert user_key(None, None) is None


def test_sticky_key_uses_the_user_only_for_user_sticky_routes():
    user = ("u", "user")
    assert sticky_key(user, route("user"), "id-1") == user
    assert sticky_key(None, route("user"), "id-1") == ("id-1", "request")
    # An arm chosen per request does not stop a shadow from sampling by user.
    assert sticky_key(user, route("request"), "id-1") == ("id-1", "request")
