"""tests.metricnames: the exported names, and the names a PromQL expression reads."""

from tests.metricnames import exported, referenced


def test_exported_names_have_prometheus_suffixes():
    names = exported()
    assert {"protege_requests_total", "protege_request_duration_seconds_bucket",
            "protege_request_duration_seconds_count", "protege_requests_in_flight",
            "protege_student_fidelity_gap", "protege_loop_runs_total",
            "protege_shadow_dropped_total"} <= names
    assert "protege_requests" not in names


def test_referenced_skips_functions_labels_strings_and_grouping():
    expr = ('sum by (route) (rate(protege_requests_total{status=~"5..", route="$route"}'
            '[$__rate_interval])) / on(route) group_left(version) sum(rate('
            'protege_requests_total[5m] offset 1h)) > bool 0.05 or vector(0)')
    assert referenced(expr) == {"protege_requests_total"}
    assert referenced("histogram_quantile(0.99, sum by (le) (rate(a_bucket[5m]))) * b") == {
        "a_bucket", "b"}
    assert referenced('label_replace(up, "x", "$1", "job", "(.*)")') == {"up"}
