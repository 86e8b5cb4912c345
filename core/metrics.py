"""Metric definitions, and how the metrics of many replicas become one `/metrics` page.

Every Ray Serve replica is its own process with its own `prometheus_client` registry. Each
replica pushes its exposition text to one `MetricsHub` actor about once a second; `/metrics`
asks the hub to merge them: counters and histograms are summed over every process that ever
reported (a replica that stops keeps its last counts, so totals never go down); gauges are summed
over the processes that reported recently, except the per-model facts in `MAX_GAUGES` that every
replica reports alike (the highest value is kept).

`merge_expositions` is pure; the hub and the reporter are thin I/O around it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable
from dataclasses import dataclass

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

prometheus_client.disable_created_metrics()

HUB_NAME = "protege-metrics-hub"
HUB_NAMESPACE = "protege"
GAUGE_STALE_S = 15.0
MAX_GAUGES = frozenset({"protege_student_fidelity_gap"})  # the same fact from every replica

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TOKEN_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)

LEDGER_ERRORS = "protege_shadow_ledger_errors"
LEDGER_ERRORS_HELP = ("Mirror ledger lines that could not be written (a full or failing disk): "
                      "the shadow's crash accounting misses them; answers are not affected.")


class GatewayMetrics:
    """What the ingress records: one set per process, in its own registry."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        by_route = ("route", "variant")
        self.requests = Counter(
            "protege_requests", "Requests answered, by HTTP status.", (*by_route, "status"),
            registry=r,
        )
        self.latency = Histogram(
            "protege_request_duration_seconds", "Time from request to last byte.",
            (*by_route, "stream"), buckets=LATENCY_BUCKETS, registry=r,
        )
        self.ttft = Histogram(
            "protege_time_to_first_token_seconds", "Time from request to the first token.",
            (*by_route, "stream"), buckets=LATENCY_BUCKETS, registry=r,
        )
        self.inter_token = Histogram(
            "protege_inter_token_latency_seconds", "Gap between consecutive tokens of a choice.",
            by_route, buckets=TOKEN_GAP_BUCKETS, registry=r,
        )
        self.tokens = Counter(
            "protege_tokens", "Tokens processed, by kind (prompt or completion).",
            (*by_route, "kind"), registry=r,
        )
        self.in_flight = Gauge(
            "protege_requests_in_flight", "Requests being answered now.", by_route, registry=r,
        )
        self.mirrored = Counter(
            "protege_shadow_mirrored", "Requests sampled for the shadow, by outcome: sent to the "
            "worker, or dropped (budget: the teacher is saturated; queue_full: the worker's "
            "queue is; failed; cancelled: the gateway stopped).", ("route", "target", "outcome"),
            registry=r,
        )
        self.shadow_dropped = Counter(  # the ingress's share of ShadowMetrics.dropped
            "protege_shadow_dropped", "Records lost, by kind and reason.", ("kind", "reason"),
            registry=r,
        )
        for reason in ("budget", "worker_busy", "handoff_failed", "cancelled"):
            self.shadow_dropped.labels(kind="pair", reason=reason)
        self.ledger_errors = Counter(LEDGER_ERRORS, LEDGER_ERRORS_HELP, registry=r)
        self.responses_logged = Counter(
            "protege_feedback_responses_logged", "Answered responses sent to the shadow worker "
            "so feedback can find them, by outcome (sent, failed, cancelled).", ("outcome",),
            registry=r,
        )
        self.structured = Counter(
            "protege_structured_outputs", "Choices of requests with a response_format, by "
            "outcome: valid (parses and matches the schema), invalid (a finished answer that "
            "does not: only a remote upstream can give one) or truncated (cut by max_tokens).",
            (*by_route, "outcome"), registry=r,
        )
        self.rejections = Counter(
            "protege_rejections", "Requests refused before generation, by reason.",
            ("reason",), registry=r,
        )


class VariantMetrics:
    """What a model deployment replica records about its engine."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.active = Gauge(
            "protege_engine_generations_active",
            "Generations running or waiting in the engine.", ("variant", "version"), registry=r,
        )
        self.queued = Gauge(
            "protege_engine_queue_depth",
            "Generations waiting for a free engine slot.", ("variant", "version"), registry=r,
        )
        self.generations = Counter(
            "protege_engine_generations", "Generations finished, by outcome.",
            ("variant", "version", "outcome"), registry=r,
        )
        self.replica_up = Gauge(
            "protege_engine_replica_up", "1 for each loaded replica.", ("variant", "version"),
            registry=r,
        )
        self.fidelity_gap = Gauge(
            "protege_student_fidelity_gap",
            "1 - the served registry version's fidelity to its teacher (from its gate report); "
            "rises when a new student drifts further from the teacher.", ("variant",),
            registry=r,
        )


class ShadowMetrics:
    """What the shadow worker records: teacher calls, scores, and the fate of every record.

    Records are pairs (`kind="pair"`) and, on routes with feedback, answered responses
    (`kind="response"`); each one offered ends up stored, spilled (then replayed) or dropped.
    """

    OUTCOMES = ("stored", "spilled", "replayed")
    DROP_REASONS = ("queue_full", "closed", "invalid", "store_error", "spill_corrupt",
                    "spill_full", "teacher_failed", "teacher_timeout", "worker_busy")
    KINDS = ("pair", "response")

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.records = Counter(
            "protege_shadow_records",
            "Records written to the store (stored), to the spill file (spilled), or from the "
            "spill file to the store (replayed), by kind (pair, response).", ("kind", "outcome"),
            registry=r,
        )
        self.dropped = Counter(
            "protege_shadow_dropped", "Records lost, by kind and reason.", ("kind", "reason"),
            registry=r,
        )
        self.queue_depth = Gauge(
            "protege_shadow_queue_depth", "Records waiting for the store writer.", registry=r,
        )
        self.ledger_errors = Counter(LEDGER_ERRORS, LEDGER_ERRORS_HELP, registry=r)
        self.requests = Counter(
            "protege_shadow_requests", "Teacher calls by the shadow worker, by outcome "
            "(completed, failed, timeout).", ("route", "target", "outcome"), registry=r,
        )
        self.in_flight = Gauge(
            "protege_shadow_requests_in_flight", "Teacher calls running now.",
            ("route", "target"), registry=r,
        )
        self.teacher_latency = Histogram(
            "protege_shadow_teacher_duration_seconds", "Teacher call time, request to last byte.",
            ("route", "target"), buckets=LATENCY_BUCKETS, registry=r,
        )
        self.teacher_ttft = Histogram(
            "protege_shadow_teacher_ttft_seconds", "Teacher time to first token.",
            ("route", "target"), buckets=LATENCY_BUCKETS, registry=r,
        )
        self.scorer_latency = Histogram(
            "protege_shadow_scorer_duration_seconds", "Time to score one pair.",
            buckets=TOKEN_GAP_BUCKETS, registry=r,
        )
        self.disagreement = Histogram(
            "protege_shadow_disagreement", "Combined disagreement of scored pairs (0 agree, 1 not).",
            ("route", "variant", "version"), buckets=(0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8,
                                                      0.9, 1.0), registry=r,
        )
        self.redactions = Counter(
            "protege_shadow_redactions", "Personal data replaced before storing, by kind.",
            ("kind",), registry=r,
        )
        self.feedback = Counter(
            "protege_feedback", "Feedback received, by route, arm, model version and metric.",
            ("route", "variant", "version", "metric"), registry=r,
        )
        self.feedback_value = Counter(
            "protege_feedback_value_sum", "Sum of numeric feedback values (booleans count 1); "
            "divide by protege_feedback_total for the mean.",
            ("route", "variant", "version", "metric"), registry=r,
        )
        for kind in self.KINDS:  # zeros are exported before the first record
            for outcome in self.OUTCOMES:
                self.records.labels(kind=kind, outcome=outcome)
            for reason in self.DROP_REASONS:
                self.dropped.labels(kind=kind, reason=reason)


def sample_total(text: str, name: str, **labels: str) -> float:
    """The sum of the samples `name` in the exposition `text` whose labels include `labels`."""
    return sum(s.value for family in text_string_to_metric_families(text)
               for s in family.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


@dataclass(frozen=True)
class Snapshot:
    text: str
    at: float  # when it was pushed (time.time())


def merge_expositions(snapshots: Iterable[Snapshot], now: float) -> str:
    """Sum the samples of several exposition texts into one (gauges: fresh snapshots only)."""
    kinds: dict[str, str] = {}
    helps: dict[str, str] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for snap in snapshots:
        fresh = now - snap.at <= GAUGE_STALE_S
        for family in text_string_to_metric_families(snap.text):
            if family.type == "gauge" and not fresh:
                continue
            kinds.setdefault(family.name, family.type)
            helps.setdefault(family.name, family.documentation)
            samples = values.setdefault(family.name, {})
            keep_max = family.name in MAX_GAUGES
            for s in family.samples:
                key = (s.name, tuple(sorted(s.labels.items())))
                if key not in samples:
                    samples[key] = s.value
                else:
                    samples[key] = max(samples[key], s.value) if keep_max else samples[key] + s.value
    lines: list[str] = []
    for name in sorted(values):
        lines.append(f"# HELP {name} {_escape_help(helps[name])}")
        lines.append(f"# TYPE {name} {kinds[name]}")
        for (sample, labels), value in sorted(values[name].items(), key=_sample_order):
            lines.append(f"{sample}{_labels(labels)} {_number(value)}")
    return "\n".join(lines) + "\n"


def _sample_order(item: tuple[tuple[str, tuple[tuple[str, str], ...]], float]) -> tuple:
    (sample, labels), _ = item
    plain = tuple((k, v) for k, v in labels if k != "le")
    le = dict(labels).get("le")
    return (plain, sample.endswith("_bucket") is False, float(le) if le is not None else 0.0, sample)


def _labels(labels: tuple[tuple[str, str], ...]) -> str:
    if not labels:
        return ""
    esc = (v.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"") for _, v in labels)
    return "{" + ",".join(f'{k}="{v}"' for (k, _), v in zip(labels, esc, strict=True)) + "}"


def _escape_help(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n")


def _number(value: float) -> str:
    if value == int(value) and abs(value) < 2**53:
        return str(int(value))
    return repr(value)


class MetricsHub:
    """A Ray actor holding the latest exposition text of every process (see module doc)."""

    def __init__(self) -> None:
        self._snapshots: dict[str, Snapshot] = {}

    def push(self, process: str, text: str) -> None:
        self._snapshots[process] = Snapshot(text, time.time())

    def render(self) -> str:
        return merge_expositions(self._snapshots.values(), time.time())


def get_hub():
    """The cluster's hub actor, created on first use."""
    import ray

    return (
        ray.remote(MetricsHub)
        .options(
            name=HUB_NAME,
            namespace=HUB_NAMESPACE,
            get_if_exists=True,
            lifetime="detached",
            num_cpus=0,
            max_concurrency=64,
        )
        .remote()
    )


class MetricsReporter:
    """Pushes one process's registry to the hub every `interval_s` while the loop runs."""

    def __init__(self, registry: CollectorRegistry, process: str, interval_s: float = 1.0):
        self.registry, self.process, self.interval_s = registry, process, interval_s
        self._hub = get_hub()
        self._last = b""
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def push_now(self) -> None:
        text = generate_latest(self.registry)
        self._last = text
        await self._hub.push.remote(self.process, text.decode())

    async def render(self) -> str:
        await self.push_now()
        return await self._hub.render.remote()

    async def _loop(self) -> None:
        last_push = 0.0
        while True:
            await asyncio.sleep(self.interval_s)
            text = generate_latest(self.registry)
            # Unchanged text is pushed again now and then so gauges stay fresh in the hub.
            if text != self._last or time.monotonic() - last_push > GAUGE_STALE_S / 3:
                with contextlib.suppress(Exception):
                    await self._hub.push.remote(self.process, text.decode())
                    self._last, last_push = text, time.monotonic()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        with contextlib.suppress(Exception):
            await self.push_now()
