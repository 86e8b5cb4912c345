"""Wiring: the Ray Serve application for one `Settings` (`ops.settings`): a deployment per
model variant (but one the ingress serves, `in_ingress`), the shadow worker when a route
mirrors or feedback is on, and the ingress that fronts them. Promotable variants get the
registry as their `PromotionSource`. `serving.launch` runs the process around the
application; `ops.rayservice` builds it for a RayService."""

from __future__ import annotations

import time
import uuid

from ray import serve

from distill.registry import RegistryPromotions
from serving.defaults import sampling_defaults
from serving.engines.structured import choice_of
from serving.ingress import Ingress, IngressParams
from serving.router import Arm, RouteTarget, ShadowPlan
from serving.variant import VariantDeployment
from shadow.worker import ShadowWorker

APP_NAME = "protege"
# Ray Serve's own access lines would triple the per-request log work; ours is the canonical one.
SERVE_LOGGING = {"enable_access_log": False}


def build_app(settings) -> serve.Application:
    """The Ray Serve application for `settings` (an `ops.settings.Settings`)."""

    log = settings.logging
    base_dir = str(settings.base_dir)  # relative paths, in every replica
    drain_s = settings.server.drain_timeout_s
    run = f"{int(time.time())}-{uuid.uuid4().hex[:8]}"  # names this run's ledger files
    promotions = RegistryPromotions(settings.registry_root(),
                                    str(settings.resolve_path(settings.registry.cache_dir)),
                                    settings.registry.poll_s)
    variants = {}
    defaults = {name: sampling_defaults(v, settings.resolve_path)
                for name, v in settings.variants.items()}
    targets = {r: route.shadow for r, route in settings.routes.items() if route.shadow is not None}
    teachers = {t.variant for t in targets.values() if t.variant is not None}
    for name, v in settings.variants.items():
        if v.in_ingress and name not in teachers:  # a teacher is the shadow worker's to call
            continue
        deployment = serve.deployment(VariantDeployment).options(
            name=f"variant-{name}",
            num_replicas=v.replicas,
            ray_actor_options={"num_cpus": v.num_cpus, "num_gpus": v.num_gpus},
            max_ongoing_requests=v.max_ongoing_requests,
            max_queued_requests=v.max_queued_requests,
            graceful_shutdown_timeout_s=drain_s,
            health_check_timeout_s=60,
            logging_config=SERVE_LOGGING,
        )
        variants[name] = deployment.bind(name, v, log.level, log.json_logs, base_dir,
                                         promotions if v.promotable else None)
    shadows = {r: ShadowPlan(t.name, t.sample_rate, t.sample_key, t.store_prompt,
                             tuple(settings.routes[r].labels or ()))
               for r, t in targets.items()}
    shadow = None
    if targets or settings.feedback:
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
            base_dir, log.level, log.json_logs, run,
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
        repo_root=base_dir,
        in_ingress={name: v for name, v in settings.variants.items() if v.in_ingress},
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
