"""API-key checks shared by the OpenAI endpoints and the review page, and the rules for who
may reach a gateway without keys. Pure.

Without API keys a gateway listens on loopback only (`exposure_problem`: anything else needs
`server.insecure_no_auth`), and answers only requests whose `Host` is a loopback name or one of
`server.allowed_hosts` (`host_allowed`): a web page cannot reach it by DNS rebinding.
"""

from __future__ import annotations

import hmac
import ipaddress

from core.errors import OpenAIError, clip

LOOPBACK_NAMES = frozenset({"localhost", "localhost.", "ip6-localhost"})


def is_loopback(host: str) -> bool:
    """Whether a listen address or a Host name is this machine only."""
    host = host.strip().strip("[]").lower()
    if host in LOOPBACK_NAMES or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def exposure_problem(host: str, has_keys: bool, insecure_no_auth: bool) -> str | None:
    """Why listening on `host` is refused (no keys, reachable from the network), or None."""
    if has_keys or insecure_no_auth or is_loopback(host):
        return None
    return (f"no API keys are set and {host} is reachable from the network: anyone who reaches "
            "it could call the models, read the stored prompts on /review and write labels. "
            "Set keys (PROTEGE_API_KEYS or api_keys), listen on 127.0.0.1, or pass "
            "--insecure-no-auth (server.insecure_no_auth: true) to serve openly on purpose")


def checked_hosts(listen: str, has_keys: bool, allowed: list[str]) -> frozenset[str] | None:
    """The Host names a gateway on `listen` answers besides loopback ones; None: any (it has
    keys, or listens beyond loopback on purpose)."""
    return None if has_keys or not is_loopback(listen) else frozenset(h.lower() for h in allowed)


def host_error(header: str | None) -> OpenAIError:
    """The 400 for a request whose Host is not answered."""
    return OpenAIError(400, "This gateway has no API keys and answers only requests addressed "
                       "to a loopback name (or one of server.allowed_hosts), not "
                       f"{clip(header or 'none', 100)!r}.", code="invalid_host")


def host_allowed(header: str | None, allowed: frozenset[str]) -> bool:
    """Whether a request's `Host` header (port ignored) is loopback or in `allowed`."""
    if not header:
        return False
    host = header.strip().lower()
    if host.startswith("["):
        host = host[: host.find("]") + 1]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    return is_loopback(host) or host.strip("[]") in allowed


def bearer_key_ok(authorization: str, keys: tuple[bytes, ...]) -> bool:
    """True when an `Authorization: Bearer KEY` header value names one of `keys` (compared in
    constant time)."""
    scheme, _, token = authorization.partition(" ")
    given = token.strip().encode()
    return scheme.lower() == "bearer" and any(hmac.compare_digest(given, k) for k in keys)
