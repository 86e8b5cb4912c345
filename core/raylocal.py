"""A Ray instance of this process's own, for `protege serve` and `protege distill run` on one node.

`ray.init()` with no address joins the last cluster `ray start` left on the machine; here the
instance is always new (`address="local"`), so two processes never share one and neither can
stop the other's. Ray's internal servers (GCS, raylet, workers, agents) listen on every
interface, and Ray has no setting to bind them to loopback (it turns a node address of 127.0.0.1
into the machine's address), so the instance runs with Ray's token authentication: a random
token made for this run, held only in the environment of this process and of the Ray processes
it starts (never written to disk). Ray reads its authentication mode when it is first imported,
so `arm_token` must run before anything imports `ray`. README "Network exposure" lists what
listens where.
"""

from __future__ import annotations

import os
import secrets
import sys


def arm_token() -> bool:
    """Make the next local Ray instance require a fresh random token; True when it will.

    A no-op returning True when RAY_AUTH_MODE is already `token` (this process armed it, or the
    operator set it with a token of their own); False once `ray` is imported without it.
    """
    if os.environ.get("RAY_AUTH_MODE") == "token":
        return True
    if "ray" in sys.modules:
        return False
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    return True


def start_local_ray(**options) -> bool:
    """`ray.init` a new single-node Ray instance; `options` pass on to it.

    Returns whether the instance requires the token (see `arm_token`).
    """
    authenticated = arm_token()
    import ray

    ray.init(address="local", **options)
    return authenticated
