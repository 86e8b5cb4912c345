"""Which Prometheus metric names protege exports, and which ones a PromQL expression reads:
the dashboards and alert rules may only use the first.

`exported()` instantiates every metric set the code defines (gateway, variant, shadow, the
loop's) and lists each sample name Prometheus would see (`_total`, `_bucket`, `_sum`, `_count`
included). `referenced(expr)` is the set of metric names an expression reads, from a small
tokenizer that skips strings, label matchers, durations, functions and keywords.
"""

from __future__ import annotations

import re

from prometheus_client import CollectorRegistry

PROMQL_WORDS = frozenset("""
and or unless by without on ignoring group_left group_right bool offset
sum min max avg group stddev stdvar count count_values bottomk topk quantile
abs absent absent_over_time ceil changes clamp clamp_max clamp_min day_of_month day_of_week
day_of_year days_in_month delta deriv exp floor histogram_quantile histogram_count histogram_sum
histogram_fraction holt_winters hour idelta increase irate label_join label_replace ln log2
log10 minute month predict_linear rate resets round scalar sgn sort sort_desc sqrt time
timestamp vector year avg_over_time min_over_time max_over_time sum_over_time count_over_time
quantile_over_time stddev_over_time stdvar_over_time last_over_time present_over_time
inf nan
""".split())


def exported() -> set[str]:
    from core.metrics import GatewayMetrics, ShadowMetrics, VariantMetrics
    from distill.loop import loop_metrics

    registries: list[CollectorRegistry] = [m().registry for m in
                                           (GatewayMetrics, VariantMetrics, ShadowMetrics)]
    registries.append(loop_metrics({}))
    names: set[str] = set()
    for registry in registries:
        for family in registry.collect():
            kind = family.type
            base = family.name
            if kind == "counter":
                names.add(base + "_total")
            elif kind == "histogram":
                names.update(base + s for s in ("_bucket", "_sum", "_count"))
            else:
                names.add(base)
    return names


_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGES = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"(?<![\w:.])[a-zA-Z_:][a-zA-Z0-9_:]*")


def referenced(expr: str) -> set[str]:
    """Metric names read by a PromQL expression (Grafana's $variables are ignored)."""
    text = _STRINGS.sub('""', expr)
    text = re.sub(r"\$\{?\w+\}?", "", text)  # Grafana variables ($__rate_interval, ${route})
    text = _MATCHERS.sub("", text)
    text = _RANGES.sub("", text)
    text = _GROUPING.sub("", text)
    names = set()
    for m in _IDENT.finditer(text):
        word = m.group(0)
        after = text[m.end():].lstrip()
        if word.lower() in PROMQL_WORDS or after.startswith("("):
            continue
        if re.fullmatch(r"\d+[smhdwy]", word) or word in ("e",):
            continue
        names.add(word)
    return names
