"""The `protege serve` process: Ray, the deployment, a watch over it, and the drain.

Without RAY_ADDRESS the process starts a Ray instance of its own (`core.raylocal`): two gateways
on one machine never share one, and stopping one never touches the other. With RAY_ADDRESS it
joins that cluster, refuses to start when the cluster already runs an application of the same
name (it would replace it), and on exit deletes only the application it deployed. While serving
it checks that its application still exists; when it is gone (deleted from outside, or Ray lost)
the process exits with an error instead of answering 404.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time

from ray import serve

from core.logging import configure_logging, get_logger
from core.metrics import HUB_NAME, HUB_NAMESPACE
from core.raylocal import start_local_ray
from serving.wiring import APP_NAME, SERVE_LOGGING, build_app

WATCH_S = 2.0  # how often the application's presence is checked
WATCH_PATIENCE = 3  # failed checks in a row before Ray counts as lost


class ServeError(RuntimeError):
    """The gateway could not start, or its application disappeared; the message says why."""


def serve_forever(settings) -> None:
    """Start (or join, with RAY_ADDRESS) Ray, deploy, serve until SIGINT/SIGTERM, then drain.

    Raises `ServeError` when a joined cluster already has an application named `APP_NAME`, or
    when the application disappears while serving.
    """
    import ray


    configure_logging(settings.logging.level, settings.logging.json_logs)
    log = get_logger("serving.app")
    address = os.environ.get("RAY_ADDRESS")
    own_ray = not address
    if own_ray:
        authenticated = start_local_ray(namespace="protege", include_dashboard=False,
                                        log_to_driver=True, object_store_memory=512 * 1024 * 1024)
        if not authenticated:  # `protege serve` arms it before Ray loads; another caller may not
            log.warning("serving.app.ray_without_auth",
                        hint="core.raylocal.arm_token() must run before `ray` is imported")
    else:
        ray.init(address=address, namespace="protege", log_to_driver=True)
        if APP_NAME in _applications():
            ray.shutdown()
            raise ServeError(
                f"the Ray cluster at {address} already runs an application named {APP_NAME!r} "
                "(another gateway); stop it first, or serve from a Ray of this process's own "
                "(unset RAY_ADDRESS)")
    stop = threading.Event()

    def on_signal(signum, _frame):
        log.info("serving.app.stopping", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    host, port = settings.server.host, settings.server.port
    deployed, lost = False, None
    try:
        serve.start(http_options={"host": host, "port": port}, logging_config=SERVE_LOGGING)
        _print(f"protege: deploying {len(settings.variants)} variant(s) and the ingress "
               f"(models load now; this can take a while)...")
        progress = threading.Thread(target=_report_progress, args=(stop,), daemon=True)
        progress.start()
        deployed = True
        serve.run(build_app(settings), name=APP_NAME, route_prefix="/", blocking=False)
        _print(f"protege: serving on http://{host}:{port}  "
               f"(routes: {', '.join(settings.routes)}; Ctrl-C stops)")
        if settings.server.review:
            _print(f"protege: pair review on http://{host}:{port}/review")
        log.info("serving.app.started", host=host, port=port, routes=list(settings.routes),
                 ray=ray.get_runtime_context().gcs_address, own_ray=own_ray)
        lost = _watch(stop)
        if lost:
            log.error("serving.app.lost", reason=lost)
            raise ServeError(f"{lost}; the gateway stops")
    finally:
        stop.set()
        _print("protege: draining in-flight requests...")
        if deployed and not lost:  # an application that vanished may be someone else's now
            with contextlib.suppress(Exception):
                serve.delete(APP_NAME)
            with contextlib.suppress(Exception):
                _kill_hub()
        if own_ray:  # a cluster we joined keeps running; one we started goes
            with contextlib.suppress(Exception):
                serve.shutdown()
        ray.shutdown()
        _print("protege: stopped")


def _applications() -> set[str]:
    with contextlib.suppress(Exception):  # no Serve controller yet: no applications
        return set(serve.status().applications)
    return set()


def _watch(stop: threading.Event) -> str | None:
    """Block until `stop` is set (None) or the application is gone (the reason)."""
    failures = 0
    while not stop.wait(WATCH_S):
        try:
            present = APP_NAME in serve.status().applications
        except Exception as e:  # noqa: BLE001 - Ray unreachable: counted, then given up on
            failures += 1
            if failures >= WATCH_PATIENCE:
                return f"Ray Serve is unreachable ({type(e).__name__}: {e})"
            continue
        failures = 0
        if not present and not stop.is_set():
            return f"the application {APP_NAME!r} is no longer deployed in Ray Serve"
    return None


def _kill_hub() -> None:
    import ray


    ray.kill(ray.get_actor(HUB_NAME, namespace=HUB_NAMESPACE))


def _report_progress(stop: threading.Event) -> None:
    """Print each deployment's status while the app comes up (a progress indication)."""
    started, seen = time.monotonic(), {}
    while not stop.wait(2.0):
        try:
            app = serve.status().applications.get(APP_NAME)
        except Exception:  # noqa: BLE001 - status is best effort
            continue
        if app is None:
            continue
        states = {n: d.status.value for n, d in app.deployments.items()}
        if states != seen:
            seen = states
            line = ", ".join(f"{n}: {s.lower()}" for n, s in sorted(states.items()))
            _print(f"protege: [{time.monotonic() - started:5.0f}s] {line}")
        if app.status.value == "RUNNING":
            return


def _print(line: str) -> None:
    print(line, flush=True)
