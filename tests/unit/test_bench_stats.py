import math

import pytest

from loadtests.bench_stats import (
    fmt_added_ms,
    fmt_num,
    fmt_ratio,
    median,
    percentile,
    proc_stat_cpu,
    ratio,
    stream_summary,
    summarize,
    table,
    tokens_per_s,
)


def test_percentile_interpolates_like_numpy():
    xs = [4.0, 1.0, 3.0, 2.0]  # unsorted on purpose
    assert percentile(xs, 0) == 1.0
    assert percentile(xs, 100) == 4.0
    assert percentile(xs, 50) == 2.5
    assert percentile(xs, 99) == pytest.approx(3.97)  # numpy.percentile(xs, 99)
    assert percentile([7.0], 99) == 7.0


def test_percentile_rejects_empty_and_out_of_range():
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_summarize_in_ms_and_requests_per_second():
    s = summarize([0.010, 0.020, 0.030, 0.040], wall_s=0.05)
    assert s["n"] == 4
    assert s["p50_ms"] == pytest.approx(25.0)
    assert s["mean_ms"] == pytest.approx(25.0)
    assert s["p99_ms"] == pytest.approx(39.7)
    assert s["rps"] == pytest.approx(80.0)


def test_summarize_of_nothing_is_nan_not_an_error():
    s = summarize([], wall_s=1.0)
    assert s["n"] == 0 and s["rps"] == 0.0 and math.isnan(s["p50_ms"])


def test_ratio_and_its_format():
    assert ratio(3.0, 2.0) == 1.5
    assert ratio(1.0, 0.0) is None
    assert ratio(None, 2.0) is None
    assert ratio(math.nan, 2.0) is None
    assert fmt_ratio(3.0, 2.0) == "1.50x"
    assert fmt_ratio(1.0, 3.0, digits=3) == "0.333x"
    assert fmt_ratio(1.0, 0.0) == "n/a"


def test_added_ms_is_signed():
    assert fmt_added_ms(12.34, 2.0) == "+10.3 ms"
    assert fmt_added_ms(1.0, 2.5) == "-1.5 ms"
    assert fmt_added_ms(None, 2.0) == "n/a"
    assert fmt_added_ms(math.nan, 2.0) == "n/a"


def test_tokens_per_s_and_numbers():
    assert tokens_per_s(128, 2.0) == 64.0
    assert math.isnan(tokens_per_s(5, 0.0))
    assert fmt_num(1.234, 2) == "1.23"
    assert fmt_num(None) == "n/a"
    assert fmt_num(math.nan) == "n/a"


def test_table_aligns_columns():
    text = table(["cell", "ms"], [["a", "1.5"], ["longer", "12.25"]])
    lines = text.splitlines()
    assert lines[0] == "cell       ms"
    assert lines[1] == "------  -----"
    assert lines[2] == "a         1.5"
    assert lines[3] == "longer  12.25"


def test_proc_stat_cpu_sums_busy_fields_and_keeps_steal_apart():
    text = ("cpu  100 5 50 1000 7 3 2 11 0 0\n"
            "cpu0 50 2 25 500 3 1 1 5 0 0\n"
            "intr 12345\n")
    assert proc_stat_cpu(text) == (100 + 5 + 50 + 3 + 2, 11)
    with pytest.raises(ValueError):
        proc_stat_cpu("intr 1\n")


def test_stream_summary_times_first_chunks_and_tokens_between():
    records = [{"start": 0.0, "chunks": [0.1, 0.5, 0.9], "tokens": 5},  # ITL 0.8 s / 4
               {"start": 1.0, "chunks": [1.3], "tokens": 1},            # no ITL: one token
               {"start": 2.0, "chunks": [], "tokens": 0}]               # nothing came
    s = stream_summary(records, wall_s=3.0)
    assert (s["requests"], s["tokens"], s["tok_s"]) == (3, 6, 2.0)
    assert s["ttft_p50_ms"] == pytest.approx(200.0) and s["ttft_p99_ms"] == pytest.approx(298.0)
    assert s["itl_p50_ms"] == s["itl_p99_ms"] == pytest.approx(200.0)
    assert stream_summary([], 1.0)["itl_p50_ms"] is None


def test_median_skips_missing_values():
    assert median([3.0, None, 1.0]) == 2.0  # even count: the mean of the middle two
    assert median([5.0, 1.0, 3.0]) == 3.0
    assert median([None]) is None and median([]) is None
