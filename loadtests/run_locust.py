"""`make loadtest`: locust against a real gateway, then a summary an SRE can read (not a test).

Starts `protege serve` (the real CLI) with loadtests/loadtest.yaml on a free 127.0.0.1 port, with a
random API key and its shadow store in a temporary directory; waits for /health and the app; runs
`locust --headless -f loadtests/locustfile.py` against it; reads the gateway's shadow counters from
/metrics; stops the gateway with SIGTERM. Then prints, from locust's CSV:

    per row       requests, failures, p50/p95/p99 ms, req/s (chat non-stream, chat stream to
                  [DONE], chat stream TTFT; one row per route)
    shadowed/plain  the same numbers as ratios, per scenario: what mirroring costs the user
    shadow        mirrors sent or dropped and teacher calls by outcome, from /metrics

and writes loadtests/out/locust_<time>_stats.csv (and locust's other CSVs) and
loadtests/out/locust_<time>_summary.txt. The load generator shares the machine's cores with the
gateway: compare the ratios, not absolute numbers.

    .venv/bin/python loadtests/run_locust.py                      # 8 users, 30 s
    .venv/bin/python loadtests/run_locust.py -u 16 -r 8 -t 60s
    .venv/bin/python loadtests/run_locust.py --host http://127.0.0.1:8000   # a running gateway

The locust scenarios take LOADTEST_* environment variables (see loadtests/locustfile.py). Exits
with locust's status: non-zero when any request failed.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import httpx
import yaml

from loadtests.bench_stats import fmt_num, fmt_ratio, table
from loadtests.benchrun import OUT_DIR, on_sigterm

LOCUSTFILE = REPO / "loadtests" / "locustfile.py"
DEFAULT_CONFIG = REPO / "loadtests" / "loadtest.yaml"
COMPARE = ("shadowed", "plain")  # ratio = first / second


# -- reading locust's CSV (pure) ------------------------------------------------------------------


def _num(x: str) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def read_stats(text: str) -> list[dict]:
    """Rows of locust's `<prefix>_stats.csv`: type, name, requests, failures, p50/p95/p99 ms,
    rps, in file order (the `Aggregated` row last)."""
    rows = []
    for r in csv.DictReader(io.StringIO(text)):
        rows.append({
            "type": r["Type"], "name": r["Name"],
            "requests": int(r["Request Count"]), "failures": int(r["Failure Count"]),
            "p50": _num(r["50%"]), "p95": _num(r["95%"]), "p99": _num(r["99%"]),
            "median": _num(r["Median Response Time"]), "rps": _num(r["Requests/s"]),
        })
    return rows


def split_route(name: str) -> tuple[str, str | None]:
    """'chat stream [plain]' -> ('chat stream', 'plain'); a name without a route: (name, None)."""
    if name.endswith("]") and " [" in name:
        scenario, route = name[:-1].rsplit(" [", 1)
        return scenario, route
    return name, None


SCENARIOS = ("chat non-stream", "chat stream", "chat stream TTFT")


def ordered(rows: list[dict]) -> list[dict]:
    """Rows by scenario (non-stream, stream, TTFT, others), then route; `Aggregated` last."""
    def key(r: dict) -> tuple:
        scenario, route = split_route(r["name"])
        rank = SCENARIOS.index(scenario) if scenario in SCENARIOS else len(SCENARIOS)
        return (r["name"] == "Aggregated", rank, scenario, route or "")
    return sorted(rows, key=key)


def stats_table(rows: list[dict]) -> str:
    return table(
        ["row", "requests", "failures", "p50 ms", "p95 ms", "p99 ms", "req/s"],
        [[f"{r['type']} {r['name']}".strip(), r["requests"], r["failures"],
          fmt_num(r["p50"], 0), fmt_num(r["p95"], 0), fmt_num(r["p99"], 0),
          fmt_num(r["rps"], 1)] for r in ordered(rows)])


def ratio_table(rows: list[dict], compare: tuple[str, str] = COMPARE) -> str | None:
    """`compare[0]` / `compare[1]` per scenario (p50, p95, p99, req/s); None: nothing to pair."""
    by: dict[str, dict[str, dict]] = {}
    for r in rows:
        scenario, route = split_route(r["name"])
        if route in compare:
            by.setdefault(scenario, {})[route] = r
    out = []
    rank = {s: i for i, s in enumerate(SCENARIOS)}
    for scenario, pair in sorted(by.items(), key=lambda kv: (rank.get(kv[0], len(rank)), kv[0])):
        if len(pair) == 2:
            a, b = pair[compare[0]], pair[compare[1]]
            out.append([scenario, fmt_ratio(a["p50"], b["p50"]), fmt_ratio(a["p95"], b["p95"]),
                        fmt_ratio(a["p99"], b["p99"]), fmt_ratio(a["rps"], b["rps"])])
    if not out:
        return None
    return table([f"{compare[0]} / {compare[1]}", "p50", "p95", "p99", "req/s"], out)


def shadow_counters(metrics_text: str) -> dict[str, float]:
    """{'mirrored <route> <outcome>': n, 'teacher <route> <outcome>': n, 'dropped <kind>
    <reason>': n} from a /metrics page, non-zero values only."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics_text):
        for s in family.samples:
            if s.name == "protege_shadow_mirrored_total":
                key = f"mirrored {s.labels.get('route')} {s.labels.get('outcome')}"
            elif s.name == "protege_shadow_requests_total":
                key = f"teacher {s.labels.get('route')} {s.labels.get('outcome')}"
            elif s.name == "protege_shadow_dropped_total":
                key = f"dropped {s.labels.get('kind')} {s.labels.get('reason')}"
            else:
                continue
            out[key] = out.get(key, 0.0) + s.value
    return {k: v for k, v in sorted(out.items()) if v}


def summary(rows: list[dict], shadow: dict[str, float] | None, header: str) -> str:
    legend = ("latency: non-stream to the whole answer, stream to [DONE], TTFT to the first "
              "content chunk")
    parts = [header, "", legend, "", stats_table(rows)]
    if (ratios := ratio_table(rows)) is not None:
        parts += ["", ratios]
    if shadow is not None:
        parts += ["", "shadow (gateway /metrics)"]
        parts += [f"  {k}: {v:.0f}" for k, v in shadow.items()] or ["  (no mirrors counted)"]
    return "\n".join(parts)


# -- running ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-u", "--users", type=int, default=8, help="concurrent users (default 8)")
    p.add_argument("-r", "--spawn-rate", type=float, default=4, help="users started per second")
    p.add_argument("-t", "--run-time", default="30s", help="locust run time (default 30s)")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                   help="gateway config (default loadtests/loadtest.yaml)")
    p.add_argument("--host", default=None,
                   help="an already running gateway (127.0.0.1 or localhost) instead of a new one")
    p.add_argument("--out-dir", type=Path, default=OUT_DIR, help="where CSVs and summary go")
    p.add_argument("--startup-s", type=float, default=300, help="gateway start timeout")
    return p.parse_args(argv)


def local_host(host: str) -> str:
    """`host` without a trailing slash when it is http(s)://127.0.0.1 or localhost; else exit.

    (The locustfile checks again: it refuses any other host too.)"""
    parts = urlsplit(host)
    if parts.scheme not in ("http", "https") or parts.hostname not in ("127.0.0.1", "localhost"):
        raise SystemExit(f"refusing host {host!r}: load tests only target http://127.0.0.1 "
                         "or http://localhost")
    return host.rstrip("/")


def start_gateway(config_path: Path, tmp: Path, api_key: str):
    """The gateway of `config_path` on a free 127.0.0.1 port, its store and spill under `tmp`."""
    from loadtests.bench_gateway import BenchGateway

    cfg = yaml.safe_load(config_path.read_text())
    cfg["shadow"] = {**cfg.get("shadow", {}), "store_path": str(tmp / "pairs.sqlite"),
                     "spill_dir": str(tmp / "spill")}
    return BenchGateway(cfg, tmp, env={"PROTEGE_API_KEYS": api_key})


def run_locust(host: str, prefix: Path, args: argparse.Namespace, api_key: str) -> int:
    cmd = [sys.executable, "-m", "locust", "--headless", "-f", str(LOCUSTFILE), "--host", host,
           "-u", str(args.users), "-r", str(args.spawn_rate), "-t", args.run_time,
           "--stop-timeout", "10", "--csv", str(prefix), "--only-summary"]
    env = {**os.environ, "LOADTEST_API_KEY": api_key}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True)
    try:
        return proc.wait()
    except BaseException:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        raise


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, on_sigterm)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    prefix = args.out_dir / f"locust_{stamp}"
    started = time.monotonic()

    def log(line: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {line}", flush=True)

    shadow: dict[str, float] | None = None
    with tempfile.TemporaryDirectory(prefix="protege-loadtest-") as tmp:
        gw = None
        try:
            if args.host:
                host = local_host(args.host)
                api_key = os.environ.get("LOADTEST_API_KEY", "unused")
            else:
                api_key = secrets.token_urlsafe(16)
                log(f"starting the gateway ({args.config})...")
                gw = start_gateway(args.config, Path(tmp), api_key)
                host = gw.base
            log(f"gateway up on {host}; locust: {args.users} users, spawn rate "
                f"{args.spawn_rate}/s, {args.run_time}")
            code = run_locust(host, prefix, args, api_key)
            log(f"locust exited with {code}")
            try:
                time.sleep(2.5)  # replicas push their metrics each second
                shadow = shadow_counters(httpx.get(host + "/metrics", timeout=10).text)
            except httpx.HTTPError as e:
                log(f"could not read {host}/metrics: {e}")
        finally:
            if gw is not None:
                log("stopping the gateway (SIGTERM)...")
                gw.stop()
    stats_path = Path(f"{prefix}_stats.csv")
    if not stats_path.exists():
        log(f"locust wrote no {stats_path}")
        return code or 1
    rows = read_stats(stats_path.read_text())
    header = (f"protege load test  {stamp}  {args.users} users, {args.run_time}, "
              f"{os.cpu_count()} CPUs, load avg {os.getloadavg()[0]:.2f}")
    text = summary(rows, shadow, header)
    summary_path = Path(f"{prefix}_summary.txt")
    summary_path.write_text(text + "\n")
    print("\n" + text + "\n")
    print(f"wrote {stats_path} and {summary_path}")
    return code


if __name__ == "__main__":
    sys.exit(main())
