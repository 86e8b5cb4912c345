"""API-key checks shared by the OpenAI endpoints and the review page. Pure."""

from __future__ import annotations

import hmac


def bearer_key_ok(authorization: str, keys: tuple[bytes, ...]) -> bool:
    """True when an `Authorization: Bearer KEY` header value names one of `keys` (compared in
    constant time)."""
    scheme, _, token = authorization.partition(" ")
    given = token.strip().encode()
    return scheme.lower() == "bearer" and any(hmac.compare_digest(given, k) for k in keys)
