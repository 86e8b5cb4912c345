"""Who closes a variant's engine: Ray Serve (replica shutdown) or the ingress (`in_ingress`)."""

import inspect

from serving.variant import VariantDeployment, VariantServer


def test_a_deployed_replica_closes_on_shutdown_and_an_inline_one_when_the_ingress_says():
    # Ray Serve awaits a replica's async __del__ when it stops the replica.
    assert inspect.iscoroutinefunction(VariantDeployment.__del__)
    # A server inside the ingress has none: the garbage collector would make a coroutine that
    # nobody awaits ("never awaited" at exit); `InIngress.close` awaits `close()` instead.
    assert not hasattr(VariantServer, "__del__")
