"""What shadow mirroring costs the student's users, and how many pairs/s it can store (not a test).

A. User-visible latency, shadowing off vs on, with fake engines (student 16 tokens, teacher 24,
   no delays). One gateway (`protege serve`, the real CLI), two routes on the same student
   variant: `off` (no shadow) and `on` (every request mirrored to the fake teacher, sample_rate
   1.0; shadow limits generous so nothing drops, no semantic scorer). Chat requests, non-streamed
   and streamed (latency to the end of the stream), at concurrency 1 and 8. Cells take turns
   off/on for several rounds; before each measured cell the bench waits until every mirror sent
   so far is stored or dropped, so one cell's teacher/store work does not leak into the next.
   (The `on` cells do include their own mirrors' work: that is the cost being measured.)
   Reports p50/p99 per mode, on-off in ms and on/off; the goal is a p99 difference < 1 ms.
B. Highest rate of mirrored pairs stored without drops, same gateway: open-loop load on `on` at
   increasing rates (requests start on a fixed schedule, at most --b-cap at once; a slot whose
   start finds the cap full is counted `missed`, not sent). After each step the bench waits
   (bounded) for the store to catch up. Stored pairs are counted in the SQLite file itself,
   drops from /metrics. Stops once drops or errors appear or the client falls behind.
C. --packaged (needs `make models`; minutes): the packaged student (SmolLM2, llama.cpp) and
   teacher (Qwen2.5-Coder-0.5B, nice 10) as in examples/default.yaml (n_threads 1 each, shadow
   max_concurrency 1, max_in_flight 1, semantic scorer on), routes `off` and `on` (sample_rate
   0.5), greedy requests (max_tokens 32) one at a time, alternating off/on. Because a teacher
   call outlasts the next student request, alternating exposes `off` requests to teacher work
   too; so `off` is also measured with no mirroring running (before any mirroring, and after
   the teacher went idle), each phase with the same prompt mix.
   Does mirroring to the real teacher on the same 2 cores slow the student's users?

    .venv/bin/python loadtests/bench_shadow.py                 # A and B (about 5 min, 2 cores)
    .venv/bin/python loadtests/bench_shadow.py --packaged      # A, B and C
    .venv/bin/python loadtests/bench_shadow.py --packaged --skip-fake   # C only
    .venv/bin/python loadtests/bench_shadow.py --quick         # a smoke run of the script itself

The load generator runs on the same cores as the gateway. Prints tables on stdout and writes
loadtests/out/bench_shadow_<timestamp>.json; stores and logs go to a temp dir; every gateway it
starts is stopped on exit, Ctrl-C and SIGTERM included.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import httpx
import yaml

from core.metrics import sample_total
from loadtests.bench_gateway import BenchGateway, Meter, loadavg  # Gateway + Ctrl-C reaping
from loadtests.bench_stats import fmt_added_ms, fmt_num, fmt_ratio, percentile, table
from loadtests.benchrun import BenchRun, post
from shadow.store import SqliteStore

PROMPT = "Say something short about rivers and stones."
C_PROMPTS = (
    "What is the capital of France?", "Name three primary colors.", "What is 12 times 7?",
    "Give a synonym for happy.", "What does a thermometer measure?",
    "Write one sentence about the moon.", "What language is spoken in Brazil?",
    "Explain what a noun is in one sentence.",
)
MIRROR_OUTCOMES = ("sent", "budget", "queue_full", "failed", "cancelled")
LATE_S = 0.05  # B: a start this far behind its slot counts as late


# -- configurations -----------------------------------------------------------------------------


def fake_config(tmp: Path) -> dict:
    """examples/fake.yaml's instant student and fake teacher; routes `off` and `on`."""
    base = yaml.safe_load((REPO / "examples" / "fake.yaml").read_text())
    student, teacher = base["variants"]["fake-instant"], base["variants"]["fake-teacher"]
    assert student["engine"]["completion_tokens"] == 16 and not student["engine"]["ttft_s"]
    assert teacher["engine"]["completion_tokens"] == 24
    for v in (student, teacher):  # B's open loop has up to --b-cap requests at once
        v.update(max_ongoing_requests=128, max_queued_requests=1024)
    base["variants"] = {"fake-instant": student, "fake-teacher": teacher}
    base["routes"] = {"off": {"variant": "fake-instant"},
                      "on": {"variant": "fake-instant",
                             "shadow": {"variant": "fake-teacher", "sample_rate": 1.0}}}
    base["shadow"] = {"store_path": str(tmp / "pairs.sqlite"), "spill_dir": str(tmp / "spill"),
                      "max_pending": 1000, "max_concurrency": 64, "max_in_flight": 1000,
                      "semantic_model": None}
    base.pop("feedback", None)  # no response logging: only the mirroring differs off vs on
    return base


def packaged_config(tmp: Path, sample_rate: float) -> dict:
    """examples/default.yaml: its student and teacher, routes `off` and `on`."""
    base = yaml.safe_load((REPO / "examples" / "default.yaml").read_text())
    shadow_route = base["routes"]["student"]
    student = shadow_route["variant"]
    base["routes"] = {"off": {"variant": student},
                      "on": {"variant": student, "shadow": {**shadow_route["shadow"],
                                                            "sample_rate": sample_rate}}}
    base["shadow"].update(store_path=str(tmp / "pairs.sqlite"), spill_dir=str(tmp / "spill"))
    s = base["shadow"]
    assert s["max_concurrency"] == 1 and s["max_in_flight"] == 1, s
    return base


# -- /metrics -----------------------------------------------------------------------------------


def shadow_counts(text: str) -> dict[str, float]:
    """The shadow counters of one /metrics page (pairs only); the page is parsed once."""
    names = ("protege_shadow_mirrored_total", "protege_shadow_records_total",
             "protege_shadow_dropped_total", "protege_shadow_requests_total")
    page = "\n".join(line for line in text.splitlines()
                     if line.startswith(names) or line.startswith(("# TYPE", "# HELP")))
    out = {f"mirrored_{o}": sample_total(page, names[0], outcome=o) for o in MIRROR_OUTCOMES}
    out["mirrored"] = sum(out[f"mirrored_{o}"] for o in MIRROR_OUTCOMES)
    for o in ("stored", "spilled"):
        out[o] = sample_total(page, names[1], kind="pair", outcome=o)
    out["dropped"] = sample_total(page, names[2], kind="pair")
    for line in page.splitlines():  # every drop reason that appears, zeros included
        if line.startswith(names[2] + "{") and 'kind="pair"' in line:
            reason = line.split('reason="', 1)[1].split('"', 1)[0]
            out[f"drop_{reason}"] = sample_total(page, names[2], kind="pair", reason=reason)
    for o in ("completed", "failed", "timeout"):
        out[f"teacher_{o}"] = sample_total(page, names[3], outcome=o)
    return out


def accounted(c: dict[str, float]) -> bool:
    """Every mirror sampled so far has ended: stored, spilled or dropped."""
    return c["stored"] + c["spilled"] + c["dropped"] >= c["mirrored"]


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items()}


def drops_by_reason(d: dict[str, float]) -> str:
    parts = [f"{k[5:]} {v:.0f}" for k, v in sorted(d.items()) if k.startswith("drop_") and v]
    return ", ".join(parts) or "0"


async def scrape(client: httpx.AsyncClient, base: str) -> dict[str, float]:
    r = await client.get(base + "/metrics")
    r.raise_for_status()
    return shadow_counts(r.text)


async def wait_settled(client: httpx.AsyncClient, base: str, expected: int | None,
                       timeout_s: float) -> tuple[dict[str, float], float, bool]:
    """Poll until `expected` mirrors are counted (None: until the counts stop moving for 2.5 s)
    and all of them have ended; (counts, seconds waited, settled?)."""
    t0 = time.monotonic()
    last, since = None, t0
    while True:
        c = await scrape(client, base)
        now = time.monotonic()
        if c != last:
            last, since = c, now
        done = accounted(c) and (c["mirrored"] >= expected if expected is not None
                                 else now - since >= 2.5)
        if done or now - t0 > timeout_s:
            return c, now - t0, done
        await asyncio.sleep(0.25)


# -- requests -----------------------------------------------------------------------------------


def chat_body(route: str, stream: bool, prompt: str = PROMPT, **extra) -> bytes:
    body = {"model": route, "messages": [{"role": "user", "content": prompt}], **extra}
    if stream:
        body["stream"] = True
    return json.dumps(body).encode()


async def timed_post(client, url: str, body: bytes, stream: bool, latencies: list[float],
                     errors: list[str]) -> None:
    """One request: its latency in ms appended to `latencies`, or its error to `errors`."""
    t0 = time.perf_counter()
    try:
        await post(client, url, body, stream)
    except Exception as e:  # noqa: BLE001 - counted and reported
        errors.append(f"{type(e).__name__}: {e}"[:300])
    else:
        latencies.append((time.perf_counter() - t0) * 1000)


async def closed_loop(client, url: str, body: bytes, stream: bool, n: int, c: int) -> dict:
    """`n` requests from `c` concurrent workers; latencies in ms."""
    latencies: list[float] = []
    errors: list[str] = []
    remaining = n

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await timed_post(client, url, body, stream, latencies, errors)

    await asyncio.gather(*(worker() for _ in range(c)))
    return {"latencies_ms": latencies, "errors": len(errors),
            "first_error": errors[0] if errors else None}


async def open_loop(client, url: str, body: bytes, rate: float, duration_s: float,
                    cap: int) -> dict:
    """Start requests on a fixed schedule (`rate`/s for `duration_s`), at most `cap` at once."""
    n = max(1, round(rate * duration_s))
    latencies: list[float] = []
    errors: list[str] = []
    missed = late = in_flight = 0
    tasks: set[asyncio.Task] = set()

    async def one() -> None:
        nonlocal in_flight
        try:
            await timed_post(client, url, body, False, latencies, errors)
        finally:
            in_flight -= 1

    t0 = time.perf_counter()
    for i in range(n):
        wait = t0 + i / rate - time.perf_counter()
        if wait > 0:
            await asyncio.sleep(wait)
        elif -wait > LATE_S:
            late += 1
        if in_flight >= cap:
            missed += 1
            continue
        in_flight += 1
        task = asyncio.create_task(one())
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await asyncio.gather(*tasks)
    wall = time.perf_counter() - t0
    return {"scheduled": n, "sent": n - missed, "ok": len(latencies), "errors": len(errors),
            "first_error": errors[0] if errors else None, "missed": missed, "late": late,
            "wall_s": wall, "achieved_rps": len(latencies) / wall,
            "p50_ms": percentile(latencies, 50) if latencies else None,
            "p99_ms": percentile(latencies, 99) if latencies else None}


# -- part A -------------------------------------------------------------------------------------


async def part_a(gw, client, metrics, args, log: Callable[[str], None]) -> dict:
    url = gw.base + "/v1/chat/completions"
    on_ok = 0  # every answered `on` request is mirrored (sample_rate 1.0)
    cells: list[dict] = []
    for stream in (False, True):  # a warm-up of both routes and both modes
        for route in ("off", "on"):
            r = await closed_loop(client, url, chat_body(route, stream), stream, 20, 4)
            on_ok += len(r["latencies_ms"]) if route == "on" else 0
    for stream in (False, True):
        for c in (1, 8):
            for rnd in range(args.rounds):
                for mode in ("off", "on"):
                    body = chat_body(mode, stream)
                    w = await closed_loop(client, url, body, stream, 2 * c, c)  # connections
                    on_ok += len(w["latencies_ms"]) if mode == "on" else 0
                    before, waited, ok = await wait_settled(metrics, gw.base, on_ok, 60)
                    if not ok:
                        log(f"A: mirrors not settled after {waited:.0f} s: {before}")
                    meter = Meter()
                    r = await closed_loop(client, url, body, stream, args.n, c)
                    r["other_cores"] = meter.read()["other_cores"]
                    on_ok += len(r["latencies_ms"]) if mode == "on" else 0
                    after, _, _ = await wait_settled(metrics, gw.base, on_ok, 60)
                    d = delta(after, before)
                    r.update(stream=stream, c=c, round=rnd, mode=mode, settle_s=waited,
                             mirrored=d["mirrored"], stored=d["stored"], dropped=d["dropped"])
                    cells.append(r)
                    lat = r["latencies_ms"]
                    log(f"A: {'stream' if stream else 'json':6} c={c} round {rnd} {mode:3} "
                        f"p50 {percentile(lat, 50):6.2f} ms  p99 {percentile(lat, 99):6.2f} ms  "
                        f"errors {r['errors']}  pairs stored {d['stored']:.0f} "
                        f"dropped {d['dropped']:.0f}  (waited {waited:.1f} s before)")
    return {"n": args.n, "rounds": args.rounds, "cells": cells}


def a_table(a: dict) -> str:
    rows, met, total = [], 0, 0
    for stream in (False, True):
        for c in (1, 8):
            sel = [x for x in a["cells"] if (x["stream"], x["c"]) == (stream, c)]
            if not sel:
                continue
            lat = {m: [v for x in sel if x["mode"] == m for v in x["latencies_ms"]]
                   for m in ("off", "on")}
            p = {(m, q): percentile(lat[m], q) for m in lat for q in (50, 99)}
            by_round = [{x["mode"]: percentile(x["latencies_ms"], 99) for x in sel
                         if x["round"] == r} for r in range(a["rounds"])]
            off_p99s = [r["off"] for r in by_round]
            total += 1
            met += p["on", 99] - p["off", 99] < 1.0
            rows.append([f"{'stream' if stream else 'json'} c={c}",
                         fmt_num(p["off", 50], 2), fmt_num(p["on", 50], 2),
                         fmt_added_ms(p["on", 50], p["off", 50], 2),
                         fmt_ratio(p["on", 50], p["off", 50]),
                         fmt_num(p["off", 99], 2), fmt_num(p["on", 99], 2),
                         fmt_added_ms(p["on", 99], p["off", 99], 2),
                         fmt_ratio(p["on", 99], p["off", 99]),
                         " ".join(f"{r['on'] - r['off']:+.2f}" for r in by_round),
                         fmt_num(max(off_p99s) - min(off_p99s), 2),
                         f"{len(lat['off'])}/{len(lat['on'])}",
                         sum(x["errors"] for x in sel),
                         "{:.0f}/{:.0f}".format(sum(x["stored"] for x in sel),
                                                sum(x["dropped"] for x in sel)),
                         fmt_num(max(x["other_cores"] for x in sel), 2)])
    out = table(["cell", "p50 off", "p50 on", "p50 on-off", "on/off", "p99 off", "p99 on",
                 "p99 on-off", "on/off", "p99 on-off by round", "off p99 spread",
                 "n off/on", "errors", "pairs stored/dropped", "others max"], rows)
    return (out + f"\n\ngoal: p99 on-off < 1 ms (in the noise): met in {met} of {total} cells "
            "(pooled over rounds). 'off p99 spread' = max - min of the off p99s across rounds "
            "(the noise floor);\n'pairs stored/dropped' counts the measured on cells' mirrors; "
            "'others max': cores used by processes not ours during a cell (max over its cells).")


# -- part B -------------------------------------------------------------------------------------


async def count_rows(store: SqliteStore, out: list[tuple[float, int]]) -> None:
    """Append (seconds since start, pairs in the store) every 0.5 s until cancelled."""
    t0 = time.perf_counter()
    while True:
        out.append((time.perf_counter() - t0, await asyncio.to_thread(store.count)))
        await asyncio.sleep(0.5)


def steady_rate(counts: list[tuple[float, int]], t_from: float, t_to: float) -> float | None:
    """Rows/s: the least-squares slope of the samples taken between `t_from` and `t_to`
    (the store writes in batches, so two end points alone would be jumpy)."""
    window = [(t, n) for t, n in counts if t_from <= t <= t_to]
    if len(window) < 3:
        return None
    mt = sum(t for t, _ in window) / len(window)
    mn = sum(n for _, n in window) / len(window)
    var = sum((t - mt) ** 2 for t, _ in window)
    return sum((t - mt) * (n - mn) for t, n in window) / var if var > 0 else None


async def part_b(gw, client, metrics, store: SqliteStore, args, log) -> dict:
    url = gw.base + "/v1/chat/completions"
    body = chat_body("on", False)
    steps: list[dict] = []
    for rate in args.rates:
        before, _, _ = await wait_settled(metrics, gw.base, None, 60)
        stored0 = store.count()
        counts: list[tuple[float, int]] = []  # (time, pairs in the file) during the load
        sampler = asyncio.create_task(count_rows(store, counts))
        try:
            r = await open_loop(client, url, body, rate, args.step_s, args.b_cap)
        finally:
            sampler.cancel()
        stored_load = store.count() - stored0
        expected = int(before["mirrored"]) + r["ok"]
        after, catch_up, settled = await wait_settled(metrics, gw.base, expected, args.catch_up_s)
        stored = store.count() - stored0
        d = delta(after, before)
        r.update(rate=rate, stored_during_load=stored_load, stored=stored, catch_up_s=catch_up,
                 settled=settled, mirrored=d["mirrored"], sent_to_worker=d["mirrored_sent"],
                 dropped=d["dropped"], drops=drops_by_reason(d),
                 stored_per_s_steady=steady_rate(counts, args.step_s * 0.2, args.step_s),
                 stored_per_s_total=stored / (r["wall_s"] + catch_up))
        r["clean"] = (r["errors"] == 0 and d["dropped"] == 0 and r["missed"] == 0 and settled
                      and stored == r["ok"])
        steps.append(r)
        log(f"B: {rate:5.0f}/s offered: achieved {r['achieved_rps']:6.1f}/s, errors "
            f"{r['errors']}, missed {r['missed']}, late {r['late']}, stored {stored} "
            f"({stored_load} during load), drops {r['drops']}, catch-up {catch_up:.1f} s")
        behind = [why for why, yes in (
            (f"{r['missed']} slots missed (cap full: answers too slow)", r["missed"] > 0),
            ("achieved < 90% of offered", r["achieved_rps"] < 0.9 * rate),
            (f"{r['late']} starts late (client loop)", r["late"] > 0.1 * r["sent"])) if yes]
        if d["dropped"] or r["errors"] or behind or not settled:
            stop = ("drops" if d["dropped"] else "user errors" if r["errors"] else
                    "; ".join(behind) if behind else "the store did not catch up")
            log(f"B: stopping: {stop}")
            break
    else:
        stop = "all rates done (the limit may be higher)"
    clean = [s for s in steps if s["clean"]]
    return {"steps": steps, "cap": args.b_cap, "step_s": args.step_s, "stopped": stop,
            "best_rate": clean[-1]["rate"] if clean else None}


def b_table(b: dict) -> str:
    rows = [[f"{s['rate']:.0f}", s["sent"], fmt_num(s["achieved_rps"], 1),
             fmt_num(s["p50_ms"], 2), fmt_num(s["p99_ms"], 2), s["errors"], s["missed"],
             s["late"], s["stored"], fmt_num(s["stored_per_s_steady"], 1),
             fmt_num(s["stored_per_s_total"], 1), fmt_num(s["catch_up_s"], 1), s["drops"],
             "<== highest clean" if s["rate"] == b["best_rate"] else ""]
            for s in b["steps"]]
    return table(["offered/s", "sent", "achieved/s", "p50 ms", "p99 ms", "errors", "missed",
                  f"late>{LATE_S * 1000:.0f}ms", "stored", "stored/s steady", "stored/s +catch-up",
                  "catch-up s", "drops (by reason)", ""], rows)


# -- part C -------------------------------------------------------------------------------------


def part_c(args, tmp: Path, log) -> dict:
    cfg = packaged_config(tmp, args.c_rate)
    log("C: starting the packaged gateway (student + teacher, llama.cpp)...")
    return {"config": cfg, **on_gateway(cfg, tmp, 600, log, "C: ",
                                        lambda gw: c_requests(gw, args.c_requests, log))}


async def c_requests(gw, k: int, log) -> dict:
    """Every phase gets the same prompt mix, prompts 0..k-1 (mod the list); `on` is shifted by
    half the list, so no request repeats the previous one's prompt (llama.cpp would reuse its
    cached prompt and answer faster)."""
    url = gw.base + "/v1/chat/completions"
    records: list[dict] = []
    async with httpx.AsyncClient(timeout=600, trust_env=False) as client:

        async def one(route: str, i: int, phase: str) -> None:
            prompt = C_PROMPTS[i % len(C_PROMPTS)]
            body = chat_body(route, False, prompt, max_tokens=32, temperature=0)
            t0 = time.perf_counter()
            j = json.loads(await post(client, url, body, False))
            records.append({"phase": phase, "route": route, "prompt": prompt,
                            "ms": (time.perf_counter() - t0) * 1000,
                            "tokens": j["usage"]["completion_tokens"],
                            "text": j["choices"][0]["message"]["content"]})

        await one("off", len(C_PROMPTS) - 1, "warm-up")
        start, _, _ = await wait_settled(client, gw.base, None, 30)
        meter = Meter()
        log(f"C: {k} requests on off, nothing mirrored yet")
        for i in range(k):
            await one("off", i, "off, no mirroring (before)")
        log(f"C: {k} requests per route, alternating off/on")
        for i in range(k):
            await one("off", i, "off (alternating)")
            await one("on", i + len(C_PROMPTS) // 2, "on (alternating)")
        end, waited, ok = await wait_settled(client, gw.base, None, 300)
        log(f"C: teacher idle after {waited:.1f} s (settled: {ok}); {k} more on off")
        for i in range(k):
            await one("off", i, "off, no mirroring (after)")
        others = meter.read()
    d = delta(end, start)
    log(f"C: mirrored {d['mirrored']:.0f} (sent {d['mirrored_sent']:.0f}, budget "
        f"{d['mirrored_budget']:.0f}), teacher completed {d['teacher_completed']:.0f}, "
        f"pairs stored {d['stored']:.0f}")
    records = [r for r in records if r["phase"] != "warm-up"]
    texts: dict[str, set[str]] = {}
    for r in records:
        texts.setdefault(r["prompt"], set()).add(r["text"])
    return {"requests_per_route": k, "records": records, "counts": d, "meter": others,
            "prompts_with_differing_outputs": sorted(p for p, v in texts.items() if len(v) > 1)}


def c_table(c: dict) -> str:
    ms: dict[str, list[float]] = {}
    for r in c["records"]:
        ms.setdefault(r["phase"], []).append(r["ms"])
    idle = ms["off, no mirroring (before)"] + ms.get("off, no mirroring (after)", [])
    on, off = ms["on (alternating)"], ms["off (alternating)"]
    ms["off, no mirroring (before + after)"] = idle
    ms["all users while mirroring (off + on alt.)"] = off + on

    def row(name: str) -> list:
        v = ms[name]
        return [name, len(v), *(fmt_num(x, 1) for x in (percentile(v, 50), percentile(v, 95),
                                                         sum(v) / len(v)))]

    out = table(["phase (user-visible latency)", "n", "p50 ms", "p95 ms", "mean ms"],
                [row(name) for name in ms])
    pairs = (("on (alternating)", "off (alternating)"),
             ("on (alternating)", "off, no mirroring (before + after)"),
             ("off (alternating)", "off, no mirroring (before + after)"),
             ("all users while mirroring (off + on alt.)", "off, no mirroring (before + after)"))
    rows = [[f"{a} / {b}", *(fmt_ratio(percentile(ms[a], q), percentile(ms[b], q))
                              for q in (50, 95))] for a, b in pairs]
    d, diff = c["counts"], c["prompts_with_differing_outputs"]
    return (out + "\n\n" + table(["ratio", "p50", "p95"], rows) +
            f"\n\non route `on` ({len(on)} requests): mirrored sent {d['mirrored_sent']:.0f}, "
            f"dropped for budget {d['mirrored_budget']:.0f}; teacher calls completed "
            f"{d['teacher_completed']:.0f}, failed {d['teacher_failed']:.0f}, timed out "
            f"{d['teacher_timeout']:.0f}; pairs stored {d['stored']:.0f}; drops "
            f"{drops_by_reason(d)}\nprocesses not ours used {c['meter']['other_cores']:.2f} "
            f"cores on average meanwhile ({c['meter']['wall_s']:.0f} s)\nstudent answers (greedy) "
            f"differing across requests of the same prompt: {len(diff)} of {len(C_PROMPTS)} "
            f"prompts {diff or ''}")


# -- main ---------------------------------------------------------------------------------------


async def fake_requests(gw, args, tmp: Path, log) -> dict:
    out: dict = {}
    limits = httpx.Limits(max_connections=args.b_cap, max_keepalive_connections=args.b_cap)
    async with (httpx.AsyncClient(limits=limits, timeout=60, trust_env=False) as client,
                httpx.AsyncClient(timeout=10, trust_env=False) as metrics):
        if not args.skip_a:
            out["a"] = await part_a(gw, client, metrics, args, log)
        if not args.skip_b:
            out["b"] = await part_b(gw, client, metrics, SqliteStore(tmp / "pairs.sqlite"),
                                    args, log)
    return out


def fake_parts(args, tmp: Path, log) -> dict:
    """Parts A and B on one gateway with fake engines."""
    cfg = fake_config(tmp)
    log("starting the gateway with fake engines (routes off and on)...")
    return {"config": cfg, **on_gateway(cfg, tmp, 300, log, "",
                                        lambda gw: fake_requests(gw, args, tmp, log))}


def on_gateway(cfg: dict, tmp: Path, startup_s: float, log, prefix: str, work) -> dict:
    """`work(gw)` (a coroutine) run on a gateway of `cfg`, stopped after; its log tail on
    stderr when it fails."""
    gw = BenchGateway(cfg, tmp, startup_s=startup_s)
    try:
        log(f"{prefix}gateway up on {gw.base}")
        return asyncio.run(work(gw))
    except BaseException:
        print(f"--- gateway log tail ---\n{gw.logs()[-3000:]}", file=sys.stderr)
        raise
    finally:
        log(f"{prefix}stopping the gateway...")
        gw.stop()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=200, help="A: measured requests per cell")
    p.add_argument("--rounds", type=int, default=3, help="A: off/on rounds per cell")
    p.add_argument("--rates", type=float, nargs="+", default=None,
                   help="B: offered rates (req/s), in order (default 25 50 100 200 400; "
                   "quick: 20 40)")
    p.add_argument("--step-s", type=float, default=10.0, help="B: seconds per rate")
    p.add_argument("--b-cap", type=int, default=64, help="B: most requests in flight")
    p.add_argument("--catch-up-s", type=float, default=60.0,
                   help="B: longest wait for the store to catch up after a step")
    p.add_argument("--packaged", action="store_true", help="run part C (needs `make models`)")
    p.add_argument("--c-requests", type=int, default=24, help="C: requests per route")
    p.add_argument("--c-rate", type=float, default=0.5, help="C: sample_rate of route `on`")
    p.add_argument("--skip-a", action="store_true")
    p.add_argument("--skip-b", action="store_true")
    p.add_argument("--skip-fake", action="store_true", help="skip A and B (C only)")
    p.add_argument("--quick", action="store_true",
                   help="small counts: checks the script works, measures nothing useful")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.rounds, args.step_s = 30, 2, 3.0
        args.catch_up_s, args.c_requests = 20.0, 6
    args.rates = args.rates or ([20, 40] if args.quick else [25, 50, 100, 200, 400])
    if args.skip_fake:
        args.skip_a = args.skip_b = True
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run = BenchRun("bench_shadow", args.out)
    stamp, log = run.stamp, run.log

    result: dict = {"started": stamp, "argv": sys.argv[1:],
                    "args": {k: str(v) for k, v in vars(args).items()},
                    "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                "python": platform.python_version()},
                    "loadavg_before": loadavg()}
    log(f"load average before: {result['loadavg_before']}")
    with tempfile.TemporaryDirectory(prefix="protege-bench-shadow-") as tmp:
        if not (args.skip_a and args.skip_b):
            (Path(tmp) / "fake").mkdir()
            result["fake"] = fake_parts(args, Path(tmp) / "fake", log)
        if args.packaged:
            (Path(tmp) / "packaged").mkdir()
            result["c"] = part_c(args, Path(tmp) / "packaged", log)
    result["loadavg_after"] = loadavg()
    result["seconds"] = time.time() - run.started

    print(f"\nprotege shadow benchmark ({stamp}, {os.cpu_count()} CPUs, load avg before "
          f"{result['loadavg_before']}, after {result['loadavg_after']}, "
          f"{result['seconds']:.0f} s{'; QUICK: counts too small to mean much' * args.quick})")
    fake = result.get("fake", {})
    if "a" in fake:
        print(f"\nA. User latency (ms), shadowing off vs on (sample_rate 1.0), fake engines, chat; "
              f"{args.n} requests per cell x {args.rounds} rounds per mode, pooled;\n"
              "   stream = to the end of the stream\n")
        print(a_table(fake["a"]))
    if "b" in fake:
        b = fake["b"]
        print(f"\nB. Mirrored pairs stored/s, open loop on route `on` (non-streamed, "
              f"{b['step_s']:.0f} s per rate, at most {b['cap']} in flight; missed: slots "
              f"not sent, cap full)\n   stored: pairs in the SQLite file after catch-up; "
              "stored/s steady: slope of the file's row count while the load ran (from 20% of "
              "the step\n   to its end); stored/s +catch-up: stored / (load time + catch-up "
              "until /metrics showed every mirror ended);\n   drops: from /metrics, all reasons\n")
        print(b_table(b))
        best = [s for s in b["steps"] if s["rate"] == b["best_rate"]]
        print("\nhighest step with zero drops and zero user errors: " + (
            f"{best[0]['rate']:.0f} req/s offered, {best[0]['stored']} pairs stored, "
            f"{fmt_num(best[0]['stored_per_s_steady'], 1)} pairs/s steady" if best else "none")
            + f"; stopped: {b['stopped']}")
    if "c" in result:
        c = result["c"]
        print(f"\nC. Packaged student (SmolLM2, llama.cpp) vs mirroring to the packaged teacher "
              f"(Qwen 0.5B, nice 10) at sample_rate {args.c_rate}, greedy, max_tokens 32, "
              f"one at a time\n")
        print(c_table(c))
    return run.write(result)


if __name__ == "__main__":
    sys.exit(main())
