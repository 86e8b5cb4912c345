"""Merging the exposition texts of several replicas into one /metrics page."""

from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from core.metrics import GAUGE_STALE_S, GatewayMetrics, Snapshot, merge_expositions


def replica(requests: int, in_flight: int, latencies=(0.02,)) -> str:
    m = GatewayMetrics()
    labels = {"route": "r", "variant": "v"}
    m.requests.labels(**labels, status="200").inc(requests)
    m.in_flight.labels(**labels).set(in_flight)
    for x in latencies:
        m.latency.labels(**labels, stream="false").observe(x)
    return generate_latest(m.registry).decode()


def values(text: str) -> dict[tuple[str, tuple], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


def test_counters_histograms_and_gauges_are_summed():
    now = 1000.0
    merged = values(merge_expositions(
        [Snapshot(replica(3, 1, (0.02, 3.0)), now), Snapshot(replica(4, 2, (0.02,)), now)], now))
    labels = (("route", "r"), ("status", "200"), ("variant", "v"))
    assert merged[("protege_requests_total", labels)] == 7
    assert merged[("protege_requests_in_flight", (("route", "r"), ("variant", "v")))] == 3
    hist = (("route", "r"), ("stream", "false"), ("variant", "v"))
    assert merged[("protege_request_duration_seconds_count", hist)] == 3
    assert merged[("protege_request_duration_seconds_sum", hist)] == 3.04
    assert merged[("protege_request_duration_seconds_bucket", (("le", "0.025"), *hist))] == 2
    assert merged[("protege_request_duration_seconds_bucket", (("le", "+Inf"), *hist))] == 3


def test_stale_replica_keeps_counters_but_not_gauges():
    now = 1000.0
    old = Snapshot(replica(5, 9), now - GAUGE_STALE_S - 1)
    merged = values(merge_expositions([old, Snapshot(replica(1, 1), now)], now))
    assert merged[("protege_requests_total",
                   (("route", "r"), ("status", "200"), ("variant", "v")))] == 6
    assert merged[("protege_requests_in_flight", (("route", "r"), ("variant", "v")))] == 1


def test_output_is_valid_exposition_with_help_and_type():
    now = 5.0
    text = merge_expositions([Snapshot(replica(2, 0), now)], now)
    assert "# TYPE protege_requests counter" in text
    assert "# TYPE protege_request_duration_seconds histogram" in text
    families = {f.name: f.type for f in text_string_to_metric_families(text)}
    assert families["protege_requests_in_flight"] == "gauge"
    # Buckets stay in ascending order of `le`, as Prometheus expects.
    les = [line.split('le="')[1].split('"')[0] for line in text.splitlines()
           if line.startswith("protege_request_duration_seconds_bucket")]
    assert [float(x) for x in les] == sorted(float(x) for x in les)


def test_no_snapshots_gives_empty_page():
    assert merge_expositions([], 0.0).strip() == ""


def test_label_values_are_escaped():
    m = GatewayMetrics()
    m.requests.labels(route='a"b\\c', variant="v", status="200").inc()
    text = merge_expositions([Snapshot(generate_latest(m.registry).decode(), 0.0)], 0.0)
    merged = values(text)
    assert merged[("protege_requests_total",
                   (("route", 'a"b\\c'), ("status", "200"), ("variant", "v")))] == 1


def test_the_fidelity_gap_every_replica_reports_alike_is_not_summed():
    from core.metrics import VariantMetrics

    def variant(gap: float, up: int) -> str:
        m = VariantMetrics()
        m.fidelity_gap.labels(variant="student").set(gap)
        m.replica_up.labels(variant="student", version="v2").set(up)
        return generate_latest(m.registry).decode()

    now = 10.0
    merged = values(merge_expositions([Snapshot(variant(0.25, 1), now),
                                       Snapshot(variant(0.25, 1), now)], now))
    assert merged[("protege_student_fidelity_gap", (("variant", "student"),))] == 0.25
    assert merged[("protege_engine_replica_up", (("variant", "student"), ("version", "v2")))] == 2
