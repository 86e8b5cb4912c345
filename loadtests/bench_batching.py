"""Concurrent users on the packaged student: llama.cpp decoding one sequence at a time
(`n_parallel: 1`) against continuous batching (`n_parallel: 8`), side by side in one run.

One gateway (`protege serve`, its own Ray) serves the packaged SmolLM2-135M Q4_1 three times, as
the default config does (llama.cpp, n_threads 1 or --threads, n_ctx 2048, the replica's
max_ongoing_requests 8): route `sequential` with n_parallel 1, `batched` with n_parallel 8, and
`batched-fa` with n_parallel 8 and flash attention. `--requantize Q8_0 Q4_0` adds routes
`sequential-q8_0`, `batched-q8_0`, ... serving the student requantized by llama.cpp to those
types (into a temporary folder; a second rounding on top of Q4_1's): types whose CPU kernels
differ. At each concurrency c (1, 2, 4, 8, 16), c clients each stream chat completions back to
back (greedy, max_tokens 64, fixed prompts; at least 16 requests a cell); the routes take turns,
in one order and then the other (--rounds). Per cell: aggregate completion tokens/s (all tokens
/ the cell's wall time), and per stream TTFT (to the first content chunk) and ITL (the stream's
mean time between tokens after the first: (last chunk - first chunk) / (tokens - 1)), p50 and
p99.

    .venv/bin/python loadtests/bench_batching.py            # the full run (about 9 min, 2 cores)
    .venv/bin/python loadtests/bench_batching.py --concurrency 1 8 16 --requantize Q8_0 Q4_0
    .venv/bin/python loadtests/bench_batching.py --quick    # a smoke run of the script itself

Prints the table on stdout and writes loadtests/out/bench_batching_<timestamp>.json. The
gateway listens on 127.0.0.1 only and is stopped on exit, Ctrl-C and SIGTERM included.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
import yaml  # noqa: E402

from loadtests.bench_gateway import B_PROMPTS, BenchGateway, loadavg  # noqa: E402
from loadtests.bench_stats import fmt_num, fmt_ratio, median, stream_summary, table  # noqa: E402
from loadtests.benchrun import JSON_HEADERS, BenchRun  # noqa: E402

ENGINES = {"sequential": {"n_parallel": 1}, "batched": {"n_parallel": 8},
           "batched-fa": {"n_parallel": 8, "flash_attn": True}}  # route -> engine settings
REQUANTIZED = {"sequential": {"n_parallel": 1}, "batched": {"n_parallel": 8}}  # per --requantize
CONCURRENCY = (1, 2, 4, 8, 16)


def routes(files: dict[str, str]) -> dict[str, dict]:
    """Route -> engine settings: ENGINES on the packaged file, REQUANTIZED on each of `files`
    (GGUF type -> path), as `sequential-q8_0`, ..."""
    out = dict(ENGINES)
    for qtype, path in files.items():
        out.update({f"{route}-{qtype.lower()}": {**settings, "path": path}
                    for route, settings in REQUANTIZED.items()})
    return out


def config(threads: int | None = None, files: dict[str, str] | None = None) -> dict:
    """examples/default.yaml's student once per route (each reserving 0.1 of a Ray CPU, so that
    they all fit beside the ingress); no shadow, no feedback."""
    base = yaml.safe_load((REPO / "examples" / "default.yaml").read_text())
    student = base["variants"][base["routes"]["student"]["variant"]]
    engine = {**student["engine"], **({"n_threads": threads} if threads else {})}
    engines = routes(files or {})
    base["variants"] = {
        route: {**student, "promotable": False, "version": f"smollm2-{route}", "num_cpus": 0.1,
                "engine": {**engine, **settings}}
        for route, settings in engines.items()}
    base["routes"] = {route: {"variant": route} for route in engines}
    base.pop("feedback", None)
    return base


def packaged_student() -> Path:
    """The GGUF file examples/default.yaml's student route serves."""
    base = yaml.safe_load((REPO / "examples" / "default.yaml").read_text())
    return REPO / base["variants"][base["routes"]["student"]["variant"]]["engine"]["path"]


def requantized(qtypes: list[str], into: Path, say) -> dict[str, str]:
    """The packaged student requantized by llama.cpp to each of `qtypes`, written in `into`:
    type -> path. A quantized type whose kernels batch differently, at the cost of a second
    rounding on top of Q4_1's."""
    from distill.gguf import quantize_gguf

    student = packaged_student()
    files = {}
    for qtype in qtypes:
        files[qtype] = str(into / f"{student.stem.rsplit('.', 1)[0]}.{qtype}.gguf")
        say(f"requantizing {student.name} to {qtype}")
        quantize_gguf(student, Path(files[qtype]), qtype, say, requantize=True)
    return files


async def one_stream(client: httpx.AsyncClient, route: str, prompt: str, max_tokens: int
                     ) -> dict:
    """One streamed chat completion: its start, the arrival of each content chunk, and the
    completion tokens the usage chunk reports."""
    body = {"model": route, "messages": [{"role": "user", "content": prompt}], "stream": True,
            "max_tokens": max_tokens, "temperature": 0,
            "stream_options": {"include_usage": True}}
    started, chunks, tokens = time.perf_counter(), [], 0
    async with client.stream("POST", "/v1/chat/completions", content=json.dumps(body).encode(),
                             headers=JSON_HEADERS) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if any(c["delta"].get("content") for c in event.get("choices", ())):
                chunks.append(time.perf_counter())
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    return {"start": started, "chunks": chunks, "tokens": tokens}


async def cell(base: str, route: str, c: int, requests: int, max_tokens: int) -> dict:
    """`requests` streams from `c` clients in a closed loop."""
    limits = httpx.Limits(max_connections=c, max_keepalive_connections=c)
    remaining = list(range(requests))
    records: list[dict] = []

    async def client_loop(client: httpx.AsyncClient) -> None:
        while remaining:
            i = remaining.pop()
            records.append(await one_stream(client, route, B_PROMPTS[i % len(B_PROMPTS)],
                                            max_tokens))

    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=600,
                                 trust_env=False) as client:
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(c)))
        wall = time.perf_counter() - started
    return {"route": route, "c": c, **stream_summary(records, wall)}


async def measure(base: str, args, log) -> list[dict]:
    cells = []
    for rnd in range(args.rounds):
        order = list(args.routes) if rnd % 2 == 0 else list(reversed(args.routes))
        for c in args.concurrency:
            for route in order:
                result = await cell(base, route, c, max(args.requests, c), args.max_tokens)
                log(f"round {rnd + 1} c={c} {route}: {result['tok_s']:.1f} tok/s, ITL p50 "
                    f"{fmt_num(result['itl_p50_ms'])} ms")
                cells.append({"round": rnd + 1, **result})
    return cells


def median_of(cells: list[dict], route: str, c: int, key: str) -> float | None:
    return median([x[key] for x in cells if x["route"] == route and x["c"] == c])


def tables(cells: list[dict], args) -> str:
    """Per concurrency and engine: medians over rounds, tokens/s against `sequential` (the
    packaged file, one sequence at a time)."""
    rows = []
    for c in args.concurrency:
        seq = median_of(cells, "sequential", c, "tok_s")
        for route in args.routes:
            m = {key: median_of(cells, route, c, key) for key in
                 ("tok_s", "itl_p50_ms", "itl_p99_ms", "ttft_p50_ms", "ttft_p99_ms")}
            rows.append([c, route, fmt_num(m["tok_s"]), fmt_ratio(m["tok_s"], seq),
                         f"{fmt_num(m['itl_p50_ms'])} / {fmt_num(m['itl_p99_ms'])}",
                         f"{fmt_num(m['ttft_p50_ms'], 0)} / {fmt_num(m['ttft_p99_ms'], 0)}"])
    return table(["c", "engine", "tok/s", "vs sequential", "ITL p50 / p99 ms",
                  "TTFT p50 / p99 ms"], rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=2, help="rounds, the order flipped each time")
    p.add_argument("--requests", type=int, default=16, help="requests per cell (at least c)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=None, help="the student's n_threads "
                   "(default: examples/default.yaml's)")
    p.add_argument("--concurrency", type=int, nargs="+", default=list(CONCURRENCY))
    p.add_argument("--requantize", nargs="*", default=[], choices=("Q8_0", "Q4_0"),
                   help="also serve the student requantized to these types (sequential and "
                   "batched)")
    p.add_argument("--quick", action="store_true", help="c=1 and 4, 4 requests, 16 tokens")
    p.add_argument("--out", type=Path, default=None, help="the JSON results file")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.requests, args.max_tokens, args.concurrency = 1, 4, 16, [1, 4]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run = BenchRun("bench_batching", args.out)
    result: dict = {"started": run.stamp, "args": {k: str(v) for k, v in vars(args).items()},
                    "cpus": os.cpu_count(), "loadavg_before": loadavg()}
    with tempfile.TemporaryDirectory(prefix="protege-bench-") as tmp:
        files = requantized(args.requantize, Path(tmp), run.log)
        result["config"] = config(args.threads, files)
        args.routes = list(result["config"]["routes"])
        run.log(f"starting the gateway (the student as {', '.join(args.routes)})...")
        with BenchGateway(result["config"], Path(tmp), startup_s=300, cwd=REPO) as gw:
            run.log(f"serving on {gw.base}; warming every route up")
            asyncio.run(measure(gw.base, argparse.Namespace(**{**vars(args), "rounds": 1,
                                                              "concurrency": [2],
                                                              "requests": 2}), run.log))
            result["cells"] = asyncio.run(measure(gw.base, args, run.log))
    result["loadavg_after"] = loadavg()
    result["seconds"] = time.time() - run.started
    threads = next(iter(result["config"]["variants"].values()))["engine"]["n_threads"]
    print(f"\nConcurrent streams on the packaged student (SmolLM2-135M Q4_1, llama.cpp n_threads "
          f"{threads}, greedy, max_tokens {args.max_tokens}), through the gateway; medians of "
          f"{args.rounds} rounds, {os.cpu_count()} CPUs, load avg before "
          f"{result['loadavg_before'][0]:.2f}\n")
    print(tables(result["cells"], args))
    return run.write(result)


if __name__ == "__main__":
    sys.exit(main())
